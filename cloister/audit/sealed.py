"""Sealed bodies: tool-call arguments and results encrypted to an auditor's X25519 public key.

The relay seals every body it stores (when `body_encryption_public_key` is set), so neither
storage nor the relay's host later reads what it kept; only the holder of the private key opens
them. The format is RFC 9180 HPKE in base mode, single shot, with the suite
DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305 (0x0020, 0x0001, 0x0003):

    sealed body = magic "CLS1" | key id (8 bytes) | enc (32 bytes) | ciphertext (len(body) + 16)

- key id: the first 8 bytes of SHA-256 of the recipient's raw X25519 public key (which key to use);
- enc: HPKE's encapsulated key (a fresh ephemeral X25519 public key per body);
- info: the constant `INFO`;
- aad: magic | key id | log index (u64, big-endian) | kind (1 args, 2 result), so a body sealed
  for one entry does not open as another's.

Sealing gives confidentiality, not authenticity: anyone can seal to a public key. What makes a
body trustworthy is the log: the opened bytes must hash (RFC 8785 canonical JSON, SHA-256) to
the commitment in the entry the enclave signed. See docs/decisions/0011.

HPKE is written out here (about forty lines over `cryptography`'s X25519, HMAC and
ChaCha20-Poly1305) because only recent releases of `cryptography` offer it (Cloister accepts 43
and later), and without associated data; tests check this code against that implementation.
Imports neither grpc nor mcp.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from cloister.verify.errors import DecodeError, VerificationError

__all__ = [
    "INFO",
    "MAGIC",
    "SealedBody",
    "is_sealed",
    "key_id",
    "load_private_key",
    "load_public_key",
    "open_body",
    "parse_sealed",
    "seal_body",
]

MAGIC = b"CLS1"
INFO = b"cloister sealed body v1"
KINDS = {"args": 1, "result": 2}
_KEY_ID = 8
_NENC = 32
_TAG = 16
_HEADER = len(MAGIC) + _KEY_ID + _NENC

# RFC 9180 identifiers: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305.
_KEM_ID, _KDF_ID, _AEAD_ID = 0x0020, 0x0001, 0x0003
_KEM_SUITE = b"KEM" + struct.pack(">H", _KEM_ID)
_HPKE_SUITE = b"HPKE" + struct.pack(">HHH", _KEM_ID, _KDF_ID, _AEAD_ID)
_MODE_BASE = 0


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(pub: X25519PublicKey) -> bytes:
    """Which auditor key a body is sealed to: SHA-256 of the raw public key, first 8 bytes."""
    return hashlib.sha256(_raw(pub)).digest()[:_KEY_ID]


def load_public_key(path: Path) -> X25519PublicKey:
    """An X25519 public key from a PEM file (`openssl pkey -in body.key -pubout`)."""
    try:
        key = load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise DecodeError(f"{path}: not a PEM public key: {exc}") from exc
    if not isinstance(key, X25519PublicKey):
        raise DecodeError(f"{path}: not an X25519 public key ({type(key).__name__})")
    return key


def load_private_key(path: Path) -> X25519PrivateKey:
    """An X25519 private key from a PEM file (`openssl genpkey -algorithm X25519`)."""
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, X25519PrivateKey):
        raise DecodeError(f"{path}: not an X25519 private key ({type(key).__name__})")
    return key


# ---- RFC 9180, base mode, single shot ----------------------------------------------------------


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite + label + ikm)


def _labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, struct.pack(">H", length) + b"HPKE-v1" + suite + label + info, length)


def _shared_secret(dh: bytes, enc: bytes, pk_r: bytes) -> bytes:
    eae_prk = _labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE, eae_prk, b"shared_secret", enc + pk_r, 32)


def _key_and_nonce(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes]:
    psk_id_hash = _labeled_extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE, b"", b"info_hash", info)
    context = bytes([_MODE_BASE]) + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE, shared_secret, b"secret", b"")
    key = _labeled_expand(_HPKE_SUITE, secret, b"key", context, 32)
    nonce = _labeled_expand(_HPKE_SUITE, secret, b"base_nonce", context, 12)
    return key, nonce  # sequence number 0: the nonce is the base nonce


def hpke_seal(
    pk_r: X25519PublicKey, info: bytes, aad: bytes, plaintext: bytes, *, ephemeral: X25519PrivateKey | None = None
) -> tuple[bytes, bytes]:
    """RFC 9180 SealBase: (enc, ciphertext). `ephemeral` is for test vectors only."""
    sk_e = ephemeral or X25519PrivateKey.generate()
    enc = _raw(sk_e.public_key())
    key, nonce = _key_and_nonce(_shared_secret(sk_e.exchange(pk_r), enc, _raw(pk_r)), info)
    return enc, ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def hpke_open(sk_r: X25519PrivateKey, enc: bytes, info: bytes, aad: bytes, ciphertext: bytes) -> bytes:
    """RFC 9180 OpenBase; VerificationError if it does not authenticate."""
    try:
        dh = sk_r.exchange(X25519PublicKey.from_public_bytes(enc))
    except ValueError as exc:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise VerificationError(f"the sealed body's encapsulated key is unusable: {exc}") from exc
    key, nonce = _key_and_nonce(_shared_secret(dh, enc, _raw(sk_r.public_key())), info)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag as exc:
        raise VerificationError("the sealed body does not authenticate (wrong key, entry, kind or bytes)") from exc


# ---- the envelope ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedBody:
    key_id: bytes
    enc: bytes
    ciphertext: bytes


def _aad(kid: bytes, index: int, kind: str) -> bytes:
    code = KINDS.get(kind)
    if code is None:
        raise ValueError(f"body kind {kind!r} is not 'args' or 'result'")
    if not 0 <= index < 1 << 64:
        raise ValueError(f"log index {index} is outside [0, 2**64)")
    return MAGIC + kid + struct.pack(">QB", index, code)


def is_sealed(data: bytes) -> bool:
    """A sealed body starts with the magic; a JSON body never does."""
    return data[: len(MAGIC)] == MAGIC


def seal_body(pub: X25519PublicKey, index: int, kind: str, body: bytes) -> bytes:
    """Seal the `kind` body of log entry `index` to the auditor key `pub`."""
    kid = key_id(pub)
    enc, ct = hpke_seal(pub, INFO, _aad(kid, index, kind), body)
    return MAGIC + kid + enc + ct


def parse_sealed(data: bytes) -> SealedBody:
    if not is_sealed(data):
        raise DecodeError(f"not a sealed body: it does not start with {MAGIC!r}")
    if len(data) < _HEADER + _TAG:
        raise DecodeError(f"sealed body is {len(data)} bytes, shorter than its header and tag ({_HEADER + _TAG})")
    kid = data[len(MAGIC) : len(MAGIC) + _KEY_ID]
    return SealedBody(kid, data[len(MAGIC) + _KEY_ID : _HEADER], data[_HEADER:])


def open_body(key: X25519PrivateKey, index: int, kind: str, data: bytes) -> bytes:
    """The body sealed for entry `index`'s `kind`; DecodeError if malformed, VerificationError if
    sealed to another key or for another entry or kind, or altered."""
    sealed = parse_sealed(data)
    mine = key_id(key.public_key())
    if sealed.key_id != mine:
        raise VerificationError(
            f"the body is sealed to auditor key {sealed.key_id.hex()}, not to this key ({mine.hex()})"
        )
    return hpke_open(key, sealed.enc, INFO, _aad(sealed.key_id, index, kind), sealed.ciphertext)
