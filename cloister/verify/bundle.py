"""Signed policy bundles: the container format and its verification.

A bundle is a directory of files (Cedar policies, schema, entities, issuers, limits). Signed,
it is a tagged COSE_Sign1 (RFC 9052 §4.2) made with an admin Ed25519 key (alg EdDSA, -8,
`kid` = the key id below), whose payload is deterministic CBOR:

    {"format": "cloister-bundle/2", "version": uint, "origin": text, "not_after": uint,
     "files": {path: bytes}}

`origin` names the one log (deployment) the bundle is for, as the enclave's measured config
names its own; `not_after` is the last instant (Unix seconds, UTC) at which an enclave may load
it. The enclave accepts a bundle only when an admin key pinned in its measured image signed it,
it names the enclave's origin, the enclave's clock is not past `not_after`, and its version is
above the one in force (decision 0012). Payloads of format `cloister-bundle/1` named neither
origin nor expiry; they are refused with a message that says how to re-sign them. The bundle
hash logged with every decision is the SHA-256 of the payload.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.verify.cose import decode_cbor, encode_cose_sign1, parse_cose_sign1, sig_structure
from cloister.verify.errors import DecodeError, VerificationError

FORMAT = "cloister-bundle/2"
OLD_FORMATS = frozenset({"cloister-bundle/1"})  # signed before bundles named their origin and expiry
MAX_ORIGIN_CHARS = 255
MAX_NOT_AFTER = 253402300799  # 9999-12-31T23:59:59Z, the last instant an ISO 8601 year can name
MAX_BUNDLE_BYTES = 8 << 20
MAX_FILES = 512
ALG_EDDSA = -8
_FIELDS = frozenset({"format", "version", "origin", "not_after", "files"})
_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}){0,3}$")


def admin_key_id(key: ed25519.Ed25519PublicKey) -> str:
    """Hex of the first 8 bytes of SHA-256 over the raw public key."""
    return hashlib.sha256(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


@dataclass(frozen=True)
class SignedBundle:
    version: int
    files: Mapping[str, bytes]
    sha256: bytes  # of the payload
    signer: str  # admin key id
    origin: str  # the log (deployment) it is for
    not_after: int  # Unix seconds: no enclave loads it after this instant


def origin_problem(origin: object) -> str | None:
    """Why `origin` cannot name a log, or None. One rule for enclave configs and bundles."""
    if not isinstance(origin, str) or not origin:
        return "an origin must be a non-empty string"
    if len(origin) > MAX_ORIGIN_CHARS:
        return f"an origin is at most {MAX_ORIGIN_CHARS} characters"
    if not origin.isprintable() or origin != origin.strip():
        return f"origin {origin!r} must be one line of printable characters without surrounding spaces"
    return None


def iso_time(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_scope(origin: object, not_after: object) -> tuple[str, int]:
    problem = origin_problem(origin)
    if problem is not None or not isinstance(origin, str):
        raise DecodeError(f"bundle origin: {problem}")
    if not isinstance(not_after, int) or isinstance(not_after, bool) or not 0 < not_after <= MAX_NOT_AFTER:
        raise DecodeError(f"bundle not_after must be Unix seconds between 1 and {MAX_NOT_AFTER}, got {not_after!r}")
    return origin, not_after


def check_path(path: str) -> None:
    if not _PATH.match(path) or ".." in path.split("/"):
        raise DecodeError(f"bundle file name {path!r} is not a plain relative path (letters, digits, _ . -)")


def pack_payload(files: Mapping[str, bytes], version: int, *, origin: str, not_after: int) -> bytes:
    """The payload to sign: for the log `origin` only, loadable until `not_after` (Unix seconds)."""
    if not 0 < version < 1 << 63:
        raise DecodeError(f"bundle version must be a positive integer, got {version}")
    _check_scope(origin, not_after)
    if len(files) > MAX_FILES:
        raise DecodeError(f"bundle has {len(files)} files; the limit is {MAX_FILES}")
    for path in files:
        check_path(path)
    body = {"format": FORMAT, "version": version, "origin": origin, "not_after": not_after, "files": dict(files)}
    payload = cbor2.dumps(body, canonical=True)
    if len(payload) > MAX_BUNDLE_BYTES:
        raise DecodeError(f"bundle is {len(payload)} bytes; the limit is {MAX_BUNDLE_BYTES}")
    return payload


def sign_bundle(
    files: Mapping[str, bytes], version: int, key: ed25519.Ed25519PrivateKey, *, origin: str, not_after: int
) -> bytes:
    payload = pack_payload(files, version, origin=origin, not_after=not_after)
    kid = admin_key_id(key.public_key()).encode()
    return encode_cose_sign1({1: ALG_EDDSA, 4: kid}, {}, payload, key.sign, tagged=True)


def verify_bundle(
    data: bytes, admin_keys: Mapping[str, ed25519.Ed25519PublicKey], *, origin: str, now_ms: int
) -> SignedBundle:
    """Verify a signed bundle for the log `origin` at time `now_ms` (the verifier's clock, Unix ms)
    against pinned admin keys (by key id). Returns its content or raises."""
    # 1. Parse the COSE_Sign1 envelope (RFC 9052 §4.2), capped in size.
    msg = parse_cose_sign1(data, max_size=MAX_BUNDLE_BYTES + 4096)
    # 2. Algorithm and key id come from the protected header, which the signature covers.
    if msg.protected_map.get(1) != ALG_EDDSA:
        raise VerificationError(f"bundle algorithm {msg.protected_map.get(1)!r} is not EdDSA (-8)")
    kid_raw = msg.protected_map.get(4)
    if not isinstance(kid_raw, bytes):
        raise VerificationError("bundle has no key id in its protected header")
    kid = kid_raw.decode("ascii", "replace")
    key = admin_keys.get(kid)
    if key is None:
        raise VerificationError(f"bundle is signed by key {kid!r}, which is not a pinned admin key")
    # 3. The signature over Sig_structure (RFC 9052 §4.4).
    try:
        key.verify(msg.signature, sig_structure(msg.protected, msg.payload))
    except InvalidSignature as exc:
        raise VerificationError(f"bundle signature by admin key {kid!r} does not verify") from exc
    # 4. The payload, now authenticated, must still be well-formed and within the size cap.
    if len(msg.payload) > MAX_BUNDLE_BYTES:
        raise DecodeError(f"bundle is {len(msg.payload)} bytes; the limit is {MAX_BUNDLE_BYTES}")
    body = decode_cbor(msg.payload, what="bundle payload")
    if isinstance(body, dict) and isinstance(body.get("format"), str) and body["format"] in OLD_FORMATS:
        raise VerificationError(
            f"bundle names no origin (format {body['format']}, signed before bundles named the log they are "
            "for and an expiry): re-sign it with cloister policy sign --origin ORIGIN --not-after TIME"
        )
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise DecodeError(f"bundle payload is not {FORMAT}")
    version, files = body.get("version"), body.get("files")
    if not isinstance(version, int) or isinstance(version, bool) or version <= 0:
        raise DecodeError("bundle payload has no positive integer version")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()):
        raise DecodeError("bundle payload 'files' must map names to bytes")
    if len(files) > MAX_FILES:
        raise DecodeError(f"bundle has {len(files)} files; the limit is {MAX_FILES}")
    for path in files:
        check_path(path)
    bundle_origin, not_after = _check_scope(body.get("origin"), body.get("not_after"))
    if set(body) != _FIELDS:
        raise DecodeError(f"bundle payload has unknown fields {sorted(map(str, set(body) - _FIELDS))}")
    # 5. The scope, now authenticated: this log, and not expired.
    if bundle_origin != origin:
        raise VerificationError(
            f"bundle is for the log {bundle_origin!r}, not this one ({origin!r}): sign it for this origin"
        )
    if now_ms // 1000 > not_after:  # valid through the whole second it names, as X.509 notAfter
        raise VerificationError(
            f"bundle expired: not after {iso_time(not_after)}, and it is {iso_time(now_ms // 1000)}; "
            "sign it again with a later --not-after (and a higher version)"
        )
    return SignedBundle(
        version=version,
        files=files,
        sha256=hashlib.sha256(msg.payload).digest(),
        signer=kid,
        origin=bundle_origin,
        not_after=not_after,
    )


def read_bundle_header(data: bytes) -> tuple[int, str]:
    """Version and signer of a signed bundle, unverified (for `cloister policy diff` and messages)."""
    msg = parse_cose_sign1(data, max_size=MAX_BUNDLE_BYTES + 4096)
    body = decode_cbor(msg.payload, what="bundle payload")
    kid = msg.protected_map.get(4)
    if not isinstance(body, dict) or not isinstance(body.get("version"), int):
        raise DecodeError("bundle payload has no version")
    return int(body["version"]), kid.decode("ascii", "replace") if isinstance(kid, bytes) else "?"


def read_bundle_scope(data: bytes) -> tuple[str | None, int | None]:
    """Origin and not-after of a signed bundle, unverified; None for a bundle that names none."""
    msg = parse_cose_sign1(data, max_size=MAX_BUNDLE_BYTES + 4096)
    body = decode_cbor(msg.payload, what="bundle payload")
    if not isinstance(body, dict):
        raise DecodeError("bundle payload is not a map")
    origin, not_after = body.get("origin"), body.get("not_after")
    return (
        origin if isinstance(origin, str) else None,
        not_after if isinstance(not_after, int) and not isinstance(not_after, bool) else None,
    )


def unsigned_files(data: bytes) -> dict[str, bytes]:
    """The files of a signed bundle without verifying it (for diffs and local validation only)."""
    msg = parse_cose_sign1(data, max_size=MAX_BUNDLE_BYTES + 4096)
    body = decode_cbor(msg.payload, what="bundle payload")
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, dict):
        raise DecodeError("bundle payload has no files")
    # Checked, not converted: bytes(v) of an integer would allocate that many zero bytes.
    if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()):
        raise DecodeError("bundle payload 'files' must map names to bytes")
    return dict(files)


def load_admin_key(data: bytes) -> ed25519.Ed25519PublicKey:
    """An admin public key from PEM, or raw 32 bytes as 64 hex characters."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = data.strip()
    if len(text) == 64 and all(c in b"0123456789abcdefABCDEF" for c in text):
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode()))
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise DecodeError("admin key is neither PEM nor 64 hex characters") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise DecodeError("admin keys must be Ed25519")
    return key
