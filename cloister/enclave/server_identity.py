"""Checking an upstream server's evidence against the identity the policy bundle pins.

Each kind is one function: it returns a short description of what was verified, or raises
VerificationError/DecodeError naming what failed. The parent only carries the evidence.

- `nitro`: an NSM attestation document made with the enclave's fresh challenge nonce, verified
  per AWS's procedure against this enclave's trust root, with the pinned PCRs.
- `checksum`: the artifact the relay is about to launch (its bytes, hashed here) must have the
  pinned SHA-256. A compromised parent could still launch something else: this kind protects
  against a tampered or swapped artifact on a host that follows the protocol.
- `tls`: the server's certificate must carry the pinned SPKI SHA-256 (as in HPKP, RFC 7469 §2.4).
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.verify.attestation import AttestationPolicy, verify_attestation
from cloister.verify.errors import DecodeError, VerificationError

MAX_ARTIFACT_BYTES = 16 << 20


def check_nitro(document: bytes, policy: AttestationPolicy) -> tuple[str, bytes]:
    """Returns (detail, evidence hash). `policy` carries the trust root, the pinned PCRs, the
    challenge nonce and the enclave's time."""
    if not document:
        raise VerificationError("no attestation document was presented")
    doc = verify_attestation(document, policy)
    pinned = ", ".join(f"PCR{i}" for i in sorted(policy.expected_pcrs)) or "no PCRs pinned"
    return f"Nitro attestation from {doc.module_id}: {pinned} as pinned, fresh nonce", hashlib.sha256(document).digest()


def check_checksum(artifact: bytes, *, sha256_hex: str) -> tuple[str, bytes]:
    if not artifact:
        raise VerificationError("no artifact was presented (set `artifact` for this upstream in the relay config)")
    if len(artifact) > MAX_ARTIFACT_BYTES:
        raise DecodeError(f"artifact is {len(artifact)} bytes; at most {MAX_ARTIFACT_BYTES} are accepted")
    digest = hashlib.sha256(artifact).digest()
    if digest.hex() != sha256_hex:
        raise VerificationError(f"artifact SHA-256 is {digest.hex()}, pinned {sha256_hex}")
    return f"artifact SHA-256 {sha256_hex[:16]}... as pinned ({len(artifact)} bytes)", digest


def check_tls(certificates: list[bytes], *, spki_sha256_hex: str) -> tuple[str, bytes]:
    if not certificates:
        raise VerificationError("no TLS certificate was presented")
    try:
        leaf = x509.load_der_x509_certificate(certificates[0])
    except (ValueError, x509.InvalidVersion) as exc:
        raise DecodeError(f"TLS certificate is not DER X.509: {exc}") from exc
    try:
        spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (UnsupportedAlgorithm, ValueError) as exc:  # a key type `cryptography` cannot load
        raise DecodeError(f"TLS certificate's public key cannot be read: {exc}") from exc
    digest = hashlib.sha256(spki).digest()
    if digest.hex() != spki_sha256_hex:
        raise VerificationError(f"certificate SPKI SHA-256 is {digest.hex()}, pinned {spki_sha256_hex}")
    try:
        subject = leaf.subject.rfc4514_string()[:80]
    except ValueError:  # parsed lazily: a malformed name surfaces only here
        subject = "an unreadable subject"
    return f"TLS certificate for {subject} with the pinned key", digest
