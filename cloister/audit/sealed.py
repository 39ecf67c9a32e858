"""Sealed bodies: tool-call arguments and results encrypted to an auditor's X25519 public key.

The relay seals every body it stores (when `body_encryption_public_key` is set), so neither
storage nor the relay's host later reads what it kept; only the holder of the private key opens
them. The format is RFC 9180 HPKE in base mode with the suite DHKEM(X25519, HKDF-SHA256) /
HKDF-SHA256 / ChaCha20-Poly1305 (0x0020, 0x0001, 0x0003), in one of two envelopes:

    CLS1 = magic "CLS1" | key id (8) | enc (32) | ciphertext (len(body) + 16)
    CLS2 = magic "CLS2" | key id (8) | enc (32) | seq (u64, big-endian) | ciphertext (len(body) + 16)

- key id: the first 8 bytes of SHA-256 of the recipient's raw X25519 public key (which key to use);
- enc: HPKE's encapsulated key (an ephemeral X25519 public key);
- info: the constant `INFO`;
- aad: magic | key id | log index (u64, big-endian) | kind (1 args, 2 result), so a body sealed
  for one entry does not open as another's, nor a CLS1 body as a CLS2 one or back.

CLS1 is single shot: a fresh ephemeral key, DH and key schedule per body (about 80 us of relay
CPU). CLS2 (decision 0032) seals many bodies under one HPKE sender context (RFC 9180 §5.2):
body number `seq` of a context uses nonce = base_nonce XOR I2OSP(seq, 12), so the DH and key
schedule are paid once per context. `BodySealer` starts a new context (a new ephemeral key)
after `max_bodies` bodies or `max_age_s` seconds, because the context's key opens every body
sealed under it: a later read of the relay's memory exposes at most that window. The relay
seals CLS2; `seal_body` (CLS1) stays for compatibility, and `open_body`/`BodyOpener` open both.

Sealing gives confidentiality, not authenticity: anyone can seal to a public key. What makes a
body trustworthy is the log: the opened bytes must hash (RFC 8785 canonical JSON, SHA-256) to
the commitment in the entry the enclave signed. See docs/decisions/0011 and 0032.

HPKE is written out here (about sixty lines over `cryptography`'s X25519, HMAC and
ChaCha20-Poly1305) because only recent releases of `cryptography` offer it (Cloister accepts 43
and later), single shot and without associated data; tests check this code against RFC 9180's
vectors (Appendix A.2.1, sequence numbers 0 to 256) and against that implementation.
Imports neither grpc nor mcp.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
    "MAGIC_V2",
    "MAX_SEQ",
    "BodyOpener",
    "BodySealer",
    "RecipientContext",
    "SealedBody",
    "SealedBodyV2",
    "SenderContext",
    "is_sealed",
    "key_id",
    "load_private_key",
    "load_public_key",
    "open_body",
    "parse_sealed",
    "seal_body",
    "setup_base_r",
    "setup_base_s",
]

MAGIC = b"CLS1"  # single shot
MAGIC_V2 = b"CLS2"  # one sender context, many bodies
INFO = b"cloister sealed body v1"  # both envelopes: the magic in the aad tells them apart
KINDS = {"args": 1, "result": 2}
_KEY_ID = 8
_NENC = 32
_NN = 12  # ChaCha20-Poly1305's nonce length
_TAG = 16
_SEQ = 8
_HEADER = len(MAGIC) + _KEY_ID + _NENC
_HEADER_V2 = _HEADER + _SEQ
# The envelope carries seq in 64 bits; RFC 9180 would allow up to 2**96 - 1 (Nn = 12).
MAX_SEQ = (1 << 64) - 1

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


# ---- RFC 9180, base mode ----------------------------------------------------------------------


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
    # §4.1 DHKEM ExtractAndExpand, kem_context = enc | pkRm.
    eae_prk = _labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE, eae_prk, b"shared_secret", enc + pk_r, 32)


def _key_and_nonce(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes]:
    # §5.1 KeySchedule, mode_base (no PSK); the exporter secret is not needed here.
    psk_id_hash = _labeled_extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE, b"", b"info_hash", info)
    context = bytes([_MODE_BASE]) + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE, shared_secret, b"secret", b"")
    key = _labeled_expand(_HPKE_SUITE, secret, b"key", context, 32)
    nonce = _labeled_expand(_HPKE_SUITE, secret, b"base_nonce", context, _NN)
    return key, nonce


def _nonce(base_nonce: bytes, seq: int) -> bytes:
    # §5.2 ComputeNonce: base_nonce XOR I2OSP(seq, Nn).
    return (int.from_bytes(base_nonce, "big") ^ seq).to_bytes(_NN, "big")


class SenderContext:
    """RFC 9180 §5.2 encryption context, sender side: one key, one base nonce, and the sequence
    number of the next message, which only rises, so no (key, nonce) pair is used twice. Not
    thread-safe: one caller at a time."""

    __slots__ = ("_aead", "base_nonce", "key", "seq")

    def __init__(self, key: bytes, base_nonce: bytes) -> None:
        self.key, self.base_nonce, self.seq = key, base_nonce, 0
        self._aead = ChaCha20Poly1305(key)

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        """§5.2 ContextS.Seal: encrypt under ComputeNonce(seq), then IncrementSeq."""
        # Refused before encrypting (the RFC raises on the increment after): past MAX_SEQ the
        # envelope could not carry seq, and a wrapped one would reuse a nonce.
        if self.seq > MAX_SEQ:
            raise OverflowError(f"the sealing context has used all {MAX_SEQ + 1} sequence numbers")
        ct = self._aead.encrypt(_nonce(self.base_nonce, self.seq), plaintext, aad)
        self.seq += 1
        return ct


class RecipientContext:
    """RFC 9180 §5.2 encryption context, recipient side. Stored bodies are opened in any order,
    so the sequence number is given per message (the RFC's context counts them)."""

    __slots__ = ("_aead", "base_nonce", "key")

    def __init__(self, key: bytes, base_nonce: bytes) -> None:
        self.key, self.base_nonce = key, base_nonce
        self._aead = ChaCha20Poly1305(key)

    def open(self, seq: int, aad: bytes, ciphertext: bytes) -> bytes:
        """§5.2 ContextR.Open at sequence number `seq`; VerificationError if it does not authenticate."""
        if not 0 <= seq <= MAX_SEQ:
            raise VerificationError(f"sequence number {seq} is outside [0, 2**64)")
        try:
            return self._aead.decrypt(_nonce(self.base_nonce, seq), ciphertext, aad)
        except InvalidTag as exc:
            raise VerificationError(
                "the sealed body does not authenticate (wrong key, entry, kind, sequence number or bytes)"
            ) from exc


def setup_base_s(
    pk_r: X25519PublicKey, info: bytes, *, ephemeral: X25519PrivateKey | None = None
) -> tuple[bytes, SenderContext]:
    """RFC 9180 §5.1.1 SetupBaseS: (enc, sender context). `ephemeral` is for test vectors only."""
    sk_e = ephemeral or X25519PrivateKey.generate()
    enc = _raw(sk_e.public_key())
    key, nonce = _key_and_nonce(_shared_secret(sk_e.exchange(pk_r), enc, _raw(pk_r)), info)
    return enc, SenderContext(key, nonce)


def setup_base_r(enc: bytes, sk_r: X25519PrivateKey, info: bytes) -> RecipientContext:
    """RFC 9180 §5.1.1 SetupBaseR; VerificationError if `enc` gives no usable secret."""
    try:
        dh = sk_r.exchange(X25519PublicKey.from_public_bytes(enc))
    except ValueError as exc:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise VerificationError(f"the sealed body's encapsulated key is unusable: {exc}") from exc
    key, nonce = _key_and_nonce(_shared_secret(dh, enc, _raw(sk_r.public_key())), info)
    return RecipientContext(key, nonce)


def hpke_seal(
    pk_r: X25519PublicKey, info: bytes, aad: bytes, plaintext: bytes, *, ephemeral: X25519PrivateKey | None = None
) -> tuple[bytes, bytes]:
    """RFC 9180 §6.1 SealBase (single shot): (enc, ciphertext). `ephemeral` is for test vectors only."""
    enc, ctx = setup_base_s(pk_r, info, ephemeral=ephemeral)
    return enc, ctx.seal(aad, plaintext)


def hpke_open(sk_r: X25519PrivateKey, enc: bytes, info: bytes, aad: bytes, ciphertext: bytes) -> bytes:
    """RFC 9180 §6.1 OpenBase (single shot); VerificationError if it does not authenticate."""
    return setup_base_r(enc, sk_r, info).open(0, aad, ciphertext)


# ---- the envelopes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedBody:
    """A CLS1 envelope: single shot."""

    version: ClassVar[int] = 1
    key_id: bytes
    enc: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class SealedBodyV2:
    """A CLS2 envelope: message `seq` of the sender context `enc` set up."""

    version: ClassVar[int] = 2
    key_id: bytes
    enc: bytes
    seq: int
    ciphertext: bytes


def _aad(magic: bytes, kid: bytes, index: int, kind: str) -> bytes:
    code = KINDS.get(kind)
    if code is None:
        raise ValueError(f"body kind {kind!r} is not 'args' or 'result'")
    if not 0 <= index < 1 << 64:
        raise ValueError(f"log index {index} is outside [0, 2**64)")
    return magic + kid + struct.pack(">QB", index, code)


def is_sealed(data: bytes) -> bool:
    """A sealed body starts with a magic (CLS1 or CLS2); a JSON body never does."""
    return data[: len(MAGIC)] in (MAGIC, MAGIC_V2)


def seal_body(pub: X25519PublicKey, index: int, kind: str, body: bytes) -> bytes:
    """Seal the `kind` body of log entry `index` to the auditor key `pub`, single shot (CLS1)."""
    kid = key_id(pub)
    enc, ct = hpke_seal(pub, INFO, _aad(MAGIC, kid, index, kind), body)
    return MAGIC + kid + enc + ct


def parse_sealed(data: bytes) -> SealedBody | SealedBodyV2:
    """A CLS1 or CLS2 envelope's fields; DecodeError if it is neither or too short for its header and tag."""
    magic = data[: len(MAGIC)]
    if magic not in (MAGIC, MAGIC_V2):
        raise DecodeError(f"not a sealed body: it does not start with {MAGIC!r} or {MAGIC_V2!r}")
    header = _HEADER if magic == MAGIC else _HEADER_V2
    if len(data) < header + _TAG:
        raise DecodeError(
            f"sealed body ({magic.decode()}) is {len(data)} bytes, shorter than its header and tag ({header + _TAG})"
        )
    kid = data[len(MAGIC) : len(MAGIC) + _KEY_ID]
    enc = data[len(MAGIC) + _KEY_ID : _HEADER]
    if magic == MAGIC:
        return SealedBody(kid, enc, data[_HEADER:])
    (seq,) = struct.unpack(">Q", data[_HEADER:_HEADER_V2])
    return SealedBodyV2(kid, enc, seq, data[_HEADER_V2:])


class BodySealer:
    """Seals bodies (CLS2) to the auditor key `pub`, many under one HPKE sender context.

    A new context (a new ephemeral key, one DH and key schedule) is set up for the first body,
    after `max_bodies` bodies, and when `max_age_s` seconds of `clock` (monotonic seconds; the
    relay passes `time.monotonic`) have passed since it was set up: whoever reads the context's
    key out of this process can open every body sealed under it, so that is the window exposed.
    Not thread-safe: the relay calls it from its event loop only.
    """

    def __init__(
        self,
        pub: X25519PublicKey,
        *,
        clock: Callable[[], float],
        max_bodies: int = 4096,
        max_age_s: float = 60.0,
        keygen: Callable[[], X25519PrivateKey] = X25519PrivateKey.generate,  # injected for test vectors only
    ) -> None:
        if not 1 <= max_bodies <= MAX_SEQ + 1:
            raise ValueError(f"max_bodies {max_bodies} is outside [1, 2**64]")
        if not (math.isfinite(max_age_s) and max_age_s > 0):
            raise ValueError(f"max_age_s {max_age_s} is not a positive number of seconds")
        self._pub, self._kid = pub, key_id(pub)
        self._clock, self._keygen = clock, keygen
        self._max_bodies, self._max_age_s = max_bodies, max_age_s
        self._ctx: SenderContext | None = None
        self._enc = b""
        self._since = 0.0

    def seal(self, index: int, kind: str, body: bytes) -> bytes:
        """Seal the `kind` body of log entry `index`."""
        aad = _aad(MAGIC_V2, self._kid, index, kind)  # a bad index or kind spends no sequence number
        ctx = self._context()
        seq = ctx.seq
        return MAGIC_V2 + self._kid + self._enc + struct.pack(">Q", seq) + ctx.seal(aad, body)

    def _context(self) -> SenderContext:
        now = self._clock()
        ctx = self._ctx
        # A clock that went back counts as expired: the window is never stretched.
        if ctx is None or ctx.seq >= self._max_bodies or not 0 <= now - self._since < self._max_age_s:
            self._enc, ctx = setup_base_s(self._pub, INFO, ephemeral=self._keygen())
            self._ctx, self._since = ctx, now  # the previous context is dropped here
        return ctx


class BodyOpener:
    """Opens CLS1 and CLS2 bodies sealed to `key`. A CLS2 context's DH and key schedule are done
    once per `enc` and kept for the `max_contexts` most recently used, so an auditor opening many
    bodies of one context pays them once."""

    def __init__(self, key: X25519PrivateKey, *, max_contexts: int = 64) -> None:
        if max_contexts < 1:
            raise ValueError(f"max_contexts {max_contexts} is not positive")
        self._key, self._kid = key, key_id(key.public_key())
        self._max = max_contexts
        self._contexts: OrderedDict[bytes, RecipientContext] = OrderedDict()

    @property
    def key_id(self) -> bytes:
        return self._kid

    def open(self, index: int, kind: str, data: bytes) -> bytes:
        """The body sealed for entry `index`'s `kind`; DecodeError if malformed, VerificationError
        if sealed to another key or for another entry, kind or sequence number, or altered."""
        sealed = parse_sealed(data)
        if sealed.key_id != self._kid:
            raise VerificationError(
                f"the body is sealed to auditor key {sealed.key_id.hex()}, not to this key ({self._kid.hex()})"
            )
        if isinstance(sealed, SealedBody):
            return hpke_open(self._key, sealed.enc, INFO, _aad(MAGIC, sealed.key_id, index, kind), sealed.ciphertext)
        aad = _aad(MAGIC_V2, sealed.key_id, index, kind)
        return self._context(sealed.enc).open(sealed.seq, aad, sealed.ciphertext)

    def _context(self, enc: bytes) -> RecipientContext:
        ctx = self._contexts.get(enc)
        if ctx is not None:
            self._contexts.move_to_end(enc)
            return ctx
        ctx = setup_base_r(enc, self._key, INFO)  # raises (and caches nothing) for an unusable enc
        self._contexts[enc] = ctx
        if len(self._contexts) > self._max:
            self._contexts.popitem(last=False)
        return ctx


def open_body(key: X25519PrivateKey, index: int, kind: str, data: bytes) -> bytes:
    """The body (CLS1 or CLS2) sealed for entry `index`'s `kind`; DecodeError if malformed,
    VerificationError if sealed to another key or for another entry or kind, or altered. To open
    many, use one `BodyOpener`."""
    return BodyOpener(key, max_contexts=1).open(index, kind, data)
