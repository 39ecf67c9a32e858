"""C2SP signed notes with Ed25519 signatures (https://c2sp.org/signed-note).

A signed note is: text (UTF-8, ending in a newline), a blank line, then one or more signature
lines `— <key name> <base64(uint32 key ID || signature)>` (em dash U+2014). The text is
separated from the signatures by the *last* blank line. Only signature type 0x01 (Ed25519) is
implemented; signatures by keys the caller does not know are ignored, as the spec requires.

Verifier keys use the `<name>+<hex key ID>+<base64(0x01 || 32-byte public key)>` encoding of
golang.org/x/mod/sumdb/note, with key ID = SHA-256(name || 0x0A || 0x01 || public key)[:4].

Everything an attacker controls is capped: total note size, number of signature lines,
signature line length.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.verify.errors import DecodeError, VerificationError

__all__ = [
    "ALG_ED25519",
    "MAX_NOTE_SIZE",
    "MAX_SIGNATURES",
    "MAX_SIGNATURE_LINE",
    "Ed25519NoteSigner",
    "Ed25519NoteVerifier",
    "Note",
    "NoteSignature",
    "NoteVerifier",
    "VerifiedNote",
    "b64decode_strict",
    "check_key_name",
    "check_note_text",
    "ed25519_key_id",
    "format_note",
    "parse_note",
    "sign_note",
    "verify_note",
]

ALG_ED25519 = 0x01
MAX_NOTE_SIZE = 1 << 20
# The spec requires accepting at least 16; a log signature plus a few dozen witnesses fits.
MAX_SIGNATURES = 100
# Post-quantum signatures reach ~5 kB, ~6.6 kB in base64; leave room for the key name.
MAX_SIGNATURE_LINE = 16 * 1024

_SIG_PREFIX = "\N{EM DASH} "
_HEX_KEY_ID = re.compile(r"[0-9a-f]{8}")
# ASCII control characters other than newline (signed-note: "MUST NOT contain").
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")


def b64decode_strict(text: str, what: str) -> bytes:
    """Standard base64 (RFC 4648 §4) with padding, and only its canonical form.

    Rejects characters outside the alphabet, bad padding and non-zero padding bits, so that one
    value has exactly one encoding.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DecodeError(f"{what}: not valid base64: {e}") from e
    if base64.b64encode(raw).decode("ascii") != text:
        raise DecodeError(f"{what}: not canonical base64")
    return raw


def check_key_name(name: str, what: str = "key name") -> None:
    """Key names are non-empty and contain no Unicode space and no '+' (signed-note §Format)."""
    if not name:
        raise DecodeError(f"{what} is empty")
    for i, ch in enumerate(name):
        if ch.isspace() or ch == "+":
            raise DecodeError(f"{what} {name!r} has a forbidden character {ch!r} at position {i}")


def check_note_text(text: bytes, what: str = "note text") -> str:
    """Check the rules every note text obeys and return it decoded.

    Valid UTF-8, no ASCII control characters but newline, and a final newline.
    """
    if len(text) > MAX_NOTE_SIZE:
        raise DecodeError(f"{what} is {len(text)} bytes, more than {MAX_NOTE_SIZE}")
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"{what} is not valid UTF-8 at byte offset {e.start}") from e
    m = _CONTROL.search(decoded)
    if m:
        offset = len(decoded[: m.start()].encode("utf-8"))
        raise DecodeError(f"{what} has control character {m.group()!r} at byte offset {offset}")
    if not decoded.endswith("\n"):
        raise DecodeError(f"{what} does not end with a newline")
    return decoded


def ed25519_key_id(name: str, public_key: bytes) -> int:
    """Key ID = first 4 bytes, big-endian, of SHA-256(name || 0x0A || 0x01 || public key)."""
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, key ID and the signature bytes after the key ID."""

    name: str
    key_id: int
    signature: bytes

    def __post_init__(self) -> None:
        check_key_name(self.name)
        if not 0 <= self.key_id < 1 << 32:
            raise DecodeError(f"key ID {self.key_id} is not a uint32")
        if not self.signature:
            raise DecodeError("signature is empty")

    def to_line(self) -> str:
        blob = self.key_id.to_bytes(4, "big") + self.signature
        return f"{_SIG_PREFIX}{self.name} {base64.b64encode(blob).decode('ascii')}\n"


@dataclass(frozen=True)
class Note:
    """A parsed, *unverified* signed note. Do not act on `text` before verify_note."""

    text: bytes
    signatures: tuple[NoteSignature, ...]


@dataclass(frozen=True)
class VerifiedNote:
    """A note with at least one good signature by a known key.

    `signatures` holds only the verified ones, one per key. `note` is the whole parse, including
    signatures by unknown keys (e.g. witness cosignatures for a separate policy to check).
    """

    text: bytes
    signatures: tuple[NoteSignature, ...]
    note: Note


def _parse_signature_line(line: str, lineno: int) -> NoteSignature:
    where = f"signature on line {lineno}"
    if len(line) > MAX_SIGNATURE_LINE:
        raise DecodeError(f"{where} is {len(line)} characters, more than {MAX_SIGNATURE_LINE}")
    if not line.startswith(_SIG_PREFIX):
        raise DecodeError(f"{where} does not start with an em dash (U+2014) and a space")
    fields = line[len(_SIG_PREFIX) :].split(" ")
    if len(fields) != 2:
        raise DecodeError(f"{where} is not '— <key name> <base64 signature>'")
    name, b64 = fields
    check_key_name(name, f"{where}: key name")
    blob = b64decode_strict(b64, f"{where}: signature")
    if len(blob) < 5:
        raise DecodeError(f"{where}: signature is {len(blob)} bytes, need a 4-byte key ID and more")
    return NoteSignature(name=name, key_id=int.from_bytes(blob[:4], "big"), signature=blob[4:])


def parse_note(data: bytes) -> Note:
    """Split a signed note into text and signature lines, enforcing the signed-note format."""
    decoded = check_note_text(data, "note")
    # The text ends at the last blank line; everything after it is signature lines.
    sep = decoded.rfind("\n\n")
    if sep < 0:
        raise DecodeError("note has no blank line between text and signatures")
    text, sig_block = decoded[: sep + 1], decoded[sep + 2 :]
    if not sig_block:
        raise DecodeError("note has no signature lines after its last blank line")
    lines = sig_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise DecodeError(f"note has {len(lines)} signature lines, more than {MAX_SIGNATURES}")
    text_lines = text.count("\n")
    # Line numbers are 1-based over the whole note, after the text and the blank line.
    signatures = tuple(_parse_signature_line(line, text_lines + 2 + i) for i, line in enumerate(lines))
    return Note(text=text.encode("utf-8"), signatures=signatures)


def format_note(note: Note) -> bytes:
    """Serialise a note: text, blank line, one line per signature."""
    check_note_text(note.text)
    if not note.signatures:
        raise ValueError("a signed note needs at least one signature")
    return note.text + b"\n" + "".join(s.to_line() for s in note.signatures).encode("utf-8")


class NoteVerifier(Protocol):
    """A known key: its name and ID select the signatures it must verify."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> int: ...

    def verify(self, text: bytes, signature: bytes) -> None:
        """Raise VerificationError unless `signature` (without key ID) signs `text`."""
        ...


class Ed25519NoteVerifier:
    """An Ed25519 (type 0x01) note verifier key."""

    __slots__ = ("_key", "_key_id", "_name", "_public_bytes")

    def __init__(self, name: str, public_key: Ed25519PublicKey) -> None:
        check_key_name(name)
        self._name = name
        self._key = public_key
        self._public_bytes = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._key_id = ed25519_key_id(name, self._public_bytes)

    @classmethod
    def from_vkey(cls, vkey: str) -> Ed25519NoteVerifier:
        """Parse `<name>+<8 hex digits key ID>+<base64(0x01 || 32-byte public key)>`."""
        # The name has no '+', the base64 may: split at the first two only.
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise DecodeError("verifier key is not '<name>+<key id>+<base64 key>'")
        name, hex_id, b64 = parts
        check_key_name(name, "verifier key name")
        if not _HEX_KEY_ID.fullmatch(hex_id):
            raise DecodeError(f"verifier key ID {hex_id!r} is not 8 lowercase hex digits")
        raw = b64decode_strict(b64, "verifier key")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise DecodeError(
                "verifier key is not an Ed25519 key (want 0x01 followed by 32 bytes, "
                f"got {len(raw)} bytes starting with {raw[:1].hex() or 'nothing'})"
            )
        verifier = cls(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
        if verifier.key_id != int(hex_id, 16):
            raise DecodeError(f"verifier key ID {hex_id} does not match its key (computed {verifier.key_id:08x})")
        return verifier

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> int:
        return self._key_id

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key

    @property
    def vkey(self) -> str:
        blob = bytes([ALG_ED25519]) + self._public_bytes
        return f"{self._name}+{self._key_id:08x}+{base64.b64encode(blob).decode('ascii')}"

    def verify(self, text: bytes, signature: bytes) -> None:
        if len(signature) != 64:
            raise VerificationError(
                f"signature by {self._name}+{self._key_id:08x} is {len(signature)} bytes, an Ed25519 signature is 64"
            )
        try:
            self._key.verify(signature, text)
        except InvalidSignature as e:
            raise VerificationError(f"Ed25519 signature by {self._name}+{self._key_id:08x} does not verify") from e

    def __repr__(self) -> str:
        return f"Ed25519NoteVerifier({self.vkey!r})"


class Ed25519NoteSigner:
    """Signs note texts with an Ed25519 private key under a key name."""

    __slots__ = ("_key", "_key_id", "_line", "_verifier")

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._verifier = Ed25519NoteVerifier(name, private_key.public_key())
        # A signature line's parts that do not change (`NoteSignature.to_line`).
        self._line = f"{_SIG_PREFIX}{self.name} ".encode()
        self._key_id = self.key_id.to_bytes(4, "big")

    @property
    def name(self) -> str:
        return self._verifier.name

    @property
    def key_id(self) -> int:
        return self._verifier.key_id

    @property
    def verifier(self) -> Ed25519NoteVerifier:
        return self._verifier

    @property
    def vkey(self) -> str:
        """The verifier key string to publish."""
        return self._verifier.vkey

    def sign(self, text: bytes) -> NoteSignature:
        check_note_text(text)
        return NoteSignature(self.name, self.key_id, self._key.sign(text))

    def sign_note_alone(self, text: bytes) -> bytes:
        """The note `sign_note(text, [self])` makes, byte for byte, without its intermediate
        objects: a log signs one on every append (tests/verify pins the equality)."""
        if type(self).sign is not Ed25519NoteSigner.sign:  # a subclass signs its own way
            return b"".join((text, b"\n", self.sign(text).to_line().encode()))
        check_note_text(text)
        blob = base64.b64encode(self._key_id + self._key.sign(text))
        return b"".join((text, b"\n", self._line, blob, b"\n"))

    def __repr__(self) -> str:
        return f"Ed25519NoteSigner({self.vkey!r})"


def sign_note(text: bytes, signers: Iterable[Ed25519NoteSigner]) -> bytes:
    """Sign `text` with every signer and return the signed note."""
    signatures = tuple(s.sign(text) for s in signers)
    return format_note(Note(text=text, signatures=signatures))


def verify_note(note_bytes: bytes, verifiers: Sequence[NoteVerifier]) -> VerifiedNote:
    """Parse a signed note and verify it against the known keys.

    Signatures whose (name, key ID) matches no known key are ignored (signed-note §Signatures).
    Raises DecodeError if the note is malformed, VerificationError if a known key's signature
    fails or no known key signed it.
    """
    known: dict[tuple[str, int], NoteVerifier] = {}
    for v in verifiers:
        if (v.name, v.key_id) in known:
            raise ValueError(f"two verifiers share key name {v.name} and key ID {v.key_id:08x}")
        known[(v.name, v.key_id)] = v
    note = parse_note(note_bytes)
    verified: dict[tuple[str, int], NoteSignature] = {}
    for sig in note.signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            continue
        # A bad signature by a known key rejects the whole note (the spec's SHOULD).
        verifier.verify(note.text, sig.signature)
        verified.setdefault((sig.name, sig.key_id), sig)
    if not verified:
        found = ", ".join(f"{s.name}+{s.key_id:08x}" for s in note.signatures)
        wanted = ", ".join(f"{n}+{k:08x}" for n, k in known) or "none"
        raise VerificationError(f"note is signed by no known key (signed by: {found}; known: {wanted})")
    return VerifiedNote(text=note.text, signatures=tuple(verified.values()), note=note)
