"""What a Cloister enclave's attestation document binds, and how clients verify it.

The NSM `user_data` field (at most 1024 bytes) carries deterministic CBOR (RFC 8949 §4.2.1):

    {"f": "cloister-enclave/1", "origin": text, "log_key": 32 bytes, "grant_key": 32 bytes,
     "checkpoint": SHA-256 of a signed checkpoint note, or null}

so one document proves which Ed25519 keys the measured enclave holds (the log key signs
checkpoints, the grant key signs grants) and, when asked, which checkpoint it vouches for.
The NSM `public_key` field is left for KMS (an RSA recipient key), as AWS intends it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cbor2
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.verify.attestation import AttestationDocument, AttestationError, AttestationPolicy, verify_attestation
from cloister.verify.cose import decode_cbor
from cloister.verify.errors import DecodeError
from cloister.verify.grant import grant_key_id
from cloister.verify.note import Ed25519NoteVerifier

FORMAT = "cloister-enclave/1"
MAX_USER_DATA = 1024


@dataclass(frozen=True)
class EnclaveBinding:
    origin: str
    log_key: bytes
    grant_key: bytes
    checkpoint_sha256: bytes | None = None

    def encode(self) -> bytes:
        data = cbor2.dumps(
            {
                "f": FORMAT,
                "origin": self.origin,
                "log_key": self.log_key,
                "grant_key": self.grant_key,
                "checkpoint": self.checkpoint_sha256,
            },
            canonical=True,
        )
        if len(data) > MAX_USER_DATA:
            raise DecodeError(f"enclave binding is {len(data)} bytes; user_data holds at most {MAX_USER_DATA}")
        return data

    def log_verifier(self) -> Ed25519NoteVerifier:
        return Ed25519NoteVerifier(self.origin, ed25519.Ed25519PublicKey.from_public_bytes(self.log_key))

    def grant_keys(self) -> dict[bytes, ed25519.Ed25519PublicKey]:
        return {grant_key_id(self.grant_key): ed25519.Ed25519PublicKey.from_public_bytes(self.grant_key)}


def parse_binding(data: bytes | None) -> EnclaveBinding:
    if data is None:
        raise DecodeError("attestation document has no user_data: not a Cloister enclave document")
    m = decode_cbor(data, what="enclave binding (user_data)")
    if not isinstance(m, dict) or m.get("f") != FORMAT:
        raise DecodeError(f"user_data is not a {FORMAT} binding")
    origin, log_key, grant_key, cp = m.get("origin"), m.get("log_key"), m.get("grant_key"), m.get("checkpoint")
    if not isinstance(origin, str) or not origin:
        raise DecodeError("enclave binding: 'origin' must be non-empty text")
    if not isinstance(log_key, bytes) or len(log_key) != 32:
        raise DecodeError("enclave binding: 'log_key' must be a 32-byte Ed25519 public key")
    if not isinstance(grant_key, bytes) or len(grant_key) != 32:
        raise DecodeError("enclave binding: 'grant_key' must be a 32-byte Ed25519 public key")
    if cp is not None and (not isinstance(cp, bytes) or len(cp) != 32):
        raise DecodeError("enclave binding: 'checkpoint' must be a 32-byte SHA-256 or null")
    binding = EnclaveBinding(origin=origin, log_key=log_key, grant_key=grant_key, checkpoint_sha256=cp)
    if binding.encode() != data:
        raise DecodeError("enclave binding is not in deterministic CBOR encoding")
    return binding


@dataclass(frozen=True)
class VerifiedEnclave:
    binding: EnclaveBinding
    document: AttestationDocument


def verify_enclave(
    document: bytes,
    policy: AttestationPolicy,
    *,
    origin: str | None = None,
    checkpoint: bytes | None = None,
) -> VerifiedEnclave:
    """Verify a Cloister enclave's attestation and return the keys it binds, or raise.

    1. The document verifies per AWS's procedure (cloister.verify.attestation) under `policy`:
       trust root, time, PCRs, nonce, debug allowance, age.
    2. Its user_data is a Cloister binding.
    3. The binding names the expected log origin, if one is given.
    4. When a checkpoint note is given, the binding commits to exactly that note.
    """
    doc = verify_attestation(document, policy)
    binding = parse_binding(doc.user_data)
    if origin is not None and binding.origin != origin:
        raise AttestationError("origin-mismatch", f"enclave serves log {binding.origin!r}, not {origin!r}")
    if checkpoint is not None and binding.checkpoint_sha256 != hashlib.sha256(checkpoint).digest():
        raise AttestationError("checkpoint-mismatch", "the attestation does not bind this checkpoint")
    return VerifiedEnclave(binding=binding, document=doc)
