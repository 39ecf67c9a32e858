"""Signed responses of attested upstream servers (docs/decisions/0017-signed-outcomes.md).

An attested (`nitro`) upstream makes an Ed25519 key when it starts and binds it in its NSM
attestation document's `user_data` (the `public_key` field stays free for KMS, as AWS intends it):

    user_data = deterministic CBOR (RFC 8949 §4.2.1) {"f": "cloister-upstream/1", "response_key": 32 bytes}

Every `tools/call` result it lets through (a grant verified) carries, in the result's `_meta`
under RESPONSE_SIG_META_KEY, base64 of an Ed25519 signature (RFC 8032 §5.1.6, pure Ed25519) over

    message = "cloister/response/v1" || 0x00 || grant nonce (16 bytes) || result hash (32 bytes)

A fixed-length message after a NUL-terminated context string, so it cannot be read as any other
Cloister signature (grants are COSE Sig_structure arrays, checkpoints signed notes); the same
construction as C2SP tlog-cosignature's "cosignature/v1" header, and the context strings of
RFC 8032 §8.3 carried in the message for pure Ed25519. The grant nonce is the enclave's, random
and unique per allowed call, so one signature answers exactly one call.

The result hash (`result_sha256`): SHA-256 of the RFC 8785 canonical JSON of the `tools/call`
result object as sent, with RESPONSE_SIG_META_KEY removed from its `_meta`, and `_meta` removed
when it is then empty (whether or not it held the signature). The upstream, the relay, the
enclave's check and an auditor holding the stored result body all compute it with this function.

`response_verdict` is the one judgement of a signature: the enclave records it in the outcome
entry, and `cloister audit replay` recomputes it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.verify.canonical import canonical_sha256
from cloister.verify.cose import decode_cbor
from cloister.verify.errors import DecodeError, VerificationError

RESPONSE_SIG_META_KEY: Final = "dev.cloister/response-sig"
UPSTREAM_BINDING_FORMAT: Final = "cloister-upstream/1"
CONTEXT: Final = b"cloister/response/v1\x00"
NONCE_BYTES: Final = 16
KEY_BYTES: Final = 32
SIG_BYTES: Final = 64
MAX_SIG_TEXT: Final = 128  # base64 of 64 bytes is 88 characters


class ResponseStatus(StrEnum):
    """What an outcome entry says about the upstream's signature (its `response` field)."""

    VERIFIED = "verified"  # a result, signed by the server's bound key over this call's nonce
    INVALID = "invalid"  # a result with a signature that does not verify (forged, another call's, malformed)
    MISSING = "missing"  # a result without a signature, from a server that must sign
    NO_RESULT = "no-result"  # no result to sign: an error, a timeout, a cancellation (proves nothing)
    UNCHECKED = "unchecked"  # signed, but the enclave knew no key for the server (a decision from before a restart)
    NOT_REQUIRED = "not-required"  # the server's identity kind (tls, checksum, none) binds no response key


@dataclass(frozen=True)
class UpstreamBinding:
    """What an attested upstream binds in its attestation document's user_data."""

    response_key: bytes

    def encode(self) -> bytes:
        if len(self.response_key) != KEY_BYTES:
            raise DecodeError(f"response key must be {KEY_BYTES} bytes, got {len(self.response_key)}")
        return cbor2.dumps({"f": UPSTREAM_BINDING_FORMAT, "response_key": self.response_key}, canonical=True)


def parse_upstream_binding(data: bytes | None) -> UpstreamBinding:
    """The response key an attested upstream's user_data binds, or DecodeError."""
    if data is None:
        raise DecodeError("the attestation document has no user_data: no response key is bound")
    m = decode_cbor(data, what="upstream binding (user_data)", max_items=8)
    if not isinstance(m, dict) or m.get("f") != UPSTREAM_BINDING_FORMAT:
        raise DecodeError(f"user_data is not a {UPSTREAM_BINDING_FORMAT} binding")
    key = m.get("response_key")
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise DecodeError(f"upstream binding: 'response_key' must be a {KEY_BYTES}-byte Ed25519 public key")
    binding = UpstreamBinding(response_key=key)
    if binding.encode() != data:
        raise DecodeError("upstream binding is not in deterministic CBOR encoding (or has extra fields)")
    return binding


def without_signature(result: Mapping[str, Any]) -> dict[str, Any]:
    """The result object as it is hashed (and stored): RESPONSE_SIG_META_KEY removed from `_meta`,
    and `_meta` removed if it is then empty."""
    out = dict(result)
    meta = out.get("_meta")
    if isinstance(meta, Mapping):
        rest = {k: v for k, v in meta.items() if k != RESPONSE_SIG_META_KEY}
        # An empty `_meta` is dropped whether or not the signature was in it: signing adds the key
        # to a result whose `_meta` was empty, and both sides must then hash the same object.
        if rest:
            out["_meta"] = rest
        else:
            del out["_meta"]
    return out


def result_sha256(result: Mapping[str, Any]) -> bytes:
    """The result hash a response signature covers and an outcome entry records (see above)."""
    return canonical_sha256(without_signature(result))


def response_message(nonce: bytes, result_hash: bytes) -> bytes:
    if len(nonce) != NONCE_BYTES:
        raise DecodeError(f"grant nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    if len(result_hash) != 32:
        raise DecodeError(f"result hash must be 32 bytes (SHA-256), got {len(result_hash)}")
    return CONTEXT + nonce + result_hash


def sign_response(key: ed25519.Ed25519PrivateKey, nonce: bytes, result_hash: bytes) -> bytes:
    return key.sign(response_message(nonce, result_hash))


def signature_from_meta(meta: Any) -> bytes | None:
    """The signature a result's `_meta` carries: None when there is none; DecodeError when the value
    is not base64 of exactly SIG_BYTES bytes."""
    if not isinstance(meta, Mapping) or RESPONSE_SIG_META_KEY not in meta:
        return None
    value = meta[RESPONSE_SIG_META_KEY]
    if not isinstance(value, str) or len(value) > MAX_SIG_TEXT:
        raise DecodeError(f"_meta {RESPONSE_SIG_META_KEY!r} must be base64 text of at most {MAX_SIG_TEXT} characters")
    try:
        sig = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"_meta {RESPONSE_SIG_META_KEY!r} is not valid base64") from exc
    if len(sig) != SIG_BYTES:
        raise DecodeError(f"_meta {RESPONSE_SIG_META_KEY!r} must hold {SIG_BYTES} bytes, got {len(sig)}")
    return sig


def verify_response(response_key: bytes, signature: bytes, nonce: bytes, result_hash: bytes) -> None:
    """Verify one response signature, or raise VerificationError (DecodeError for malformed input)."""
    # 1. Lengths, before any cryptography (RFC 8032 §5.1.7 step 1 refuses other lengths too).
    if len(response_key) != KEY_BYTES:
        raise DecodeError(f"response key must be {KEY_BYTES} bytes, got {len(response_key)}")
    if len(signature) != SIG_BYTES:
        raise DecodeError(f"response signature must be {SIG_BYTES} bytes, got {len(signature)}")
    message = response_message(nonce, result_hash)
    # 2. The key must be a valid Ed25519 point encoding.
    try:
        public = ed25519.Ed25519PublicKey.from_public_bytes(response_key)
    except ValueError as exc:
        raise DecodeError("response key is not an Ed25519 public key") from exc
    # 3. RFC 8032 §5.1.7 verification of the signature over the message above.
    try:
        public.verify(signature, message)
    except InvalidSignature as exc:
        raise VerificationError("the response signature does not verify for this call's nonce and result") from exc


@dataclass(frozen=True)
class ResponseCheck:
    """What the enclave (or an auditor) knows about one outcome's response."""

    required: bool  # the server's identity kind is nitro: its responses must be signed
    response_key: bytes | None  # the key its verified attestation bound, if known
    nonce: bytes  # the grant nonce of the decision
    result_hash: bytes | None  # None: the call produced no result (error, timeout, cancellation)
    signature: bytes | None  # as carried; None when there was none


def response_verdict(check: ResponseCheck) -> ResponseStatus:
    """The one judgement of an outcome's response signature (see ResponseStatus)."""
    if not check.required:
        return ResponseStatus.NOT_REQUIRED
    if check.result_hash is None:
        return ResponseStatus.NO_RESULT
    if check.signature is None:
        return ResponseStatus.MISSING
    if len(check.signature) != SIG_BYTES:
        return ResponseStatus.INVALID
    if check.response_key is None:
        return ResponseStatus.UNCHECKED
    try:
        verify_response(check.response_key, check.signature, check.nonce, check.result_hash)
    except (DecodeError, VerificationError):
        return ResponseStatus.INVALID
    return ResponseStatus.VERIFIED
