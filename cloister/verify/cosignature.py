"""C2SP checkpoint cosignatures, Ed25519 type (https://c2sp.org/tlog-cosignature).

Written from the text of tlog-cosignature.md (C2SP/C2SP @ 5ba5ee83) and signed-note.md (same
commit). A cosignature is a signed-note signature line on a checkpoint:

    — <cosigner name> base64(uint32 key ID || uint64 timestamp || Ed25519 signature)

- key ID = SHA-256(<name> || "\\n" || 0x04 || 32-byte Ed25519 public key)[:4] (§Format;
  signed-note §Signature types: 0x04 = timestamped Ed25519 checkpoint cosignatures);
- the signature covers "cosignature/v1\\n" "time <timestamp>\\n" followed by the whole note body
  of the checkpoint, extension lines included (§Ed25519 signed message);
- the timestamp is POSIX seconds, big-endian, at most 2**63 - 1 (§Format).

A v1 cosignature says: "as of <timestamp>, the largest consistent tree I have seen for this
origin has this root hash". The message does not commit to the cosigner's name, so one public key
must never serve two cosigners: CosignaturePolicy refuses a key listed twice.

Only the Ed25519 type (0x04) is implemented; ML-DSA-44 (0x06) cosignatures are ignored like any
signature by an unknown key. Nothing here reads a clock: timestamps are passed in.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.verify.checkpoint import parse_checkpoint
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.note import NoteSignature, b64decode_strict, check_key_name, check_note_text, parse_note

__all__ = [
    "ALG_COSIGNATURE_V1",
    "COSIGNATURE_SIZE",
    "COSIGNATURE_V1_HEADER",
    "MAX_TIMESTAMP",
    "CosignaturePolicy",
    "Ed25519CosignatureVerifier",
    "Ed25519Cosigner",
    "cosignature_key_id",
    "cosigned_message",
    "verify_cosignature_line",
    "verify_cosignatures",
]

# signed-note §Signature types: "0x04 — Timestamped Ed25519 checkpoint cosignatures".
ALG_COSIGNATURE_V1 = 0x04
# tlog-cosignature §Ed25519 signed message: the fixed header line, for domain separation.
COSIGNATURE_V1_HEADER = b"cosignature/v1\n"
# tlog-cosignature §Format: "It MUST NOT exceed 2^63 - 1".
MAX_TIMESTAMP = (1 << 63) - 1
# timestamped_signature for ed25519: u64 timestamp || opaque ed25519_signature[64].
COSIGNATURE_SIZE = 8 + 64

_HEX_KEY_ID = re.compile(r"[0-9a-f]{8}")


def cosignature_key_id(name: str, public_key: bytes) -> int:
    """tlog-cosignature §Format: SHA-256(<name> || "\\n" || 0x04 || 32-byte public key)[:4], big-endian."""
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ALG_COSIGNATURE_V1]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def cosigned_message(checkpoint_text: bytes, timestamp: int) -> bytes:
    """tlog-cosignature §Ed25519 signed message, for a checkpoint's note text.

    Two newline-terminated lines, "cosignature/v1" and "time <timestamp>" (ASCII decimal, no
    leading zeroes), then the whole note body (final newline included, no signature lines).
    """
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise ValueError(f"cosignature timestamp {timestamp} is outside [0, 2**63 - 1]")
    check_note_text(checkpoint_text, "cosigned checkpoint")
    return COSIGNATURE_V1_HEADER + b"time %d\n" % timestamp + checkpoint_text


class Ed25519CosignatureVerifier:
    """A cosigner's Ed25519 public key under its name: a NoteVerifier for cosignature/v1 lines.

    It can be given to cloister.verify.note.verify_note with the log's keys (tlog-witness: "the
    client MAY concatenate it to the checkpoint, and use a note verification function"); use
    verify_timestamped or verify_cosignatures to also get the timestamp.
    """

    __slots__ = ("_key", "_key_id", "_name", "_public_bytes")

    def __init__(self, name: str, public_key: Ed25519PublicKey) -> None:
        check_key_name(name, "cosigner name")
        self._name = name
        self._key = public_key
        self._public_bytes = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._key_id = cosignature_key_id(name, self._public_bytes)

    @classmethod
    def from_vkey(cls, vkey: str) -> Ed25519CosignatureVerifier:
        """Parse a vkey `<name>+<hex key ID>+<base64(0x04 || 32-byte public key)>`.

        signed-note §Verifier keys; tlog-cosignature §Format: "Ed25519 public keys MAY be encoded
        as vkeys with signature type 0x04".
        """
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise DecodeError("cosigner vkey is not '<name>+<key id>+<base64 key>'")
        name, hex_id, b64 = parts
        check_key_name(name, "cosigner vkey name")
        if not _HEX_KEY_ID.fullmatch(hex_id):
            raise DecodeError(f"cosigner vkey key ID {hex_id[:20]!r} is not 8 lowercase hex digits")
        raw = b64decode_strict(b64, "cosigner vkey")
        if len(raw) != 33:
            raise DecodeError(f"cosigner vkey holds {len(raw)} bytes, want 0x04 and a 32-byte Ed25519 key")
        if raw[0] != ALG_COSIGNATURE_V1:
            raise DecodeError(f"cosigner vkey has signature type 0x{raw[0]:02x}, want 0x04 (Ed25519 cosignature/v1)")
        verifier = cls(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
        if verifier.key_id != int(hex_id, 16):
            raise DecodeError(f"cosigner vkey key ID {hex_id} does not match its key (computed {verifier.key_id:08x})")
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
    def public_bytes(self) -> bytes:
        return self._public_bytes

    @property
    def vkey(self) -> str:
        blob = bytes([ALG_COSIGNATURE_V1]) + self._public_bytes
        return f"{self._name}+{self._key_id:08x}+{base64.b64encode(blob).decode('ascii')}"

    def verify_timestamped(self, text: bytes, signature: bytes) -> int:
        """Check a cosignature (the bytes after the key ID) over a checkpoint's note text.

        Returns its timestamp; raises VerificationError naming the failed check.
        """
        # 1. §Format: timestamped_signature is a u64 timestamp then a 64-byte Ed25519 signature.
        if len(signature) != COSIGNATURE_SIZE:
            raise VerificationError(
                f"cosignature by {self._label()} is {len(signature)} bytes, want {COSIGNATURE_SIZE}"
            )
        # 2. §Format: the timestamp is big-endian and MUST NOT exceed 2^63 - 1.
        timestamp = int.from_bytes(signature[:8], "big")
        if timestamp > MAX_TIMESTAMP:
            raise VerificationError(f"cosignature by {self._label()} has timestamp {timestamp}, above 2**63 - 1")
        # 3. §Ed25519 signed message: header, time line, then the checkpoint's whole note body.
        message = cosigned_message(text, timestamp)
        # 4. §Format: an Ed25519 (RFC 8032) signature by the cosigner's key over that message.
        try:
            self._key.verify(signature[8:], message)
        except InvalidSignature as e:
            raise VerificationError(f"cosignature by {self._label()} (time {timestamp}) does not verify") from e
        return timestamp

    def verify(self, text: bytes, signature: bytes) -> None:
        """NoteVerifier: raise VerificationError unless `signature` cosigns `text`."""
        self.verify_timestamped(text, signature)

    def _label(self) -> str:
        return f"{self._name}+{self._key_id:08x}"

    def __repr__(self) -> str:
        return f"Ed25519CosignatureVerifier({self.vkey!r})"


class Ed25519Cosigner:
    """A cosigner's Ed25519 private key under its name. Time is always passed in."""

    __slots__ = ("_key", "_verifier")

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._verifier = Ed25519CosignatureVerifier(name, private_key.public_key())

    @property
    def name(self) -> str:
        return self._verifier.name

    @property
    def key_id(self) -> int:
        return self._verifier.key_id

    @property
    def verifier(self) -> Ed25519CosignatureVerifier:
        return self._verifier

    @property
    def vkey(self) -> str:
        """The cosigner's vkey to publish (signature type 0x04)."""
        return self._verifier.vkey

    def cosign(self, checkpoint_text: bytes, timestamp: int) -> NoteSignature:
        """Cosign a checkpoint's note text as of `timestamp` (POSIX seconds, 1 .. 2**63 - 1).

        The text must parse as a checkpoint: a cosigner states something about a tree. The
        timestamp may not be zero (tlog-witness: "the timestamp MUST NOT be zero").
        """
        if not 0 < timestamp <= MAX_TIMESTAMP:
            raise ValueError(f"cosignature timestamp {timestamp} is outside [1, 2**63 - 1]")
        parse_checkpoint(checkpoint_text)
        signature = self._key.sign(cosigned_message(checkpoint_text, timestamp))
        return NoteSignature(self.name, self.key_id, timestamp.to_bytes(8, "big") + signature)

    def __repr__(self) -> str:
        return f"Ed25519Cosigner({self.vkey!r})"


def verify_cosignature_line(line: str | bytes, checkpoint_text: bytes, witness: Ed25519CosignatureVerifier) -> int:
    """Verify one signature line (with or without its final newline) as `witness`'s cosignature.

    Returns the cosignature's timestamp. Raises DecodeError if the line or the checkpoint is
    malformed, VerificationError if the line is not a good cosignature by this witness.
    """
    raw = line.encode("utf-8") if isinstance(line, str) else bytes(line)
    if not raw.endswith(b"\n"):
        raw += b"\n"
    # 1. signed-note §Signatures: exactly one signature line, parsed as one on this checkpoint.
    if raw.count(b"\n") != 1:
        raise DecodeError("expected one cosignature line, got several")
    parse_checkpoint(checkpoint_text)
    sig = parse_note(checkpoint_text + b"\n" + raw).signatures[0]
    # 2. signed-note §Signatures: the key name and key ID identify the key; both must be the witness's.
    if sig.name != witness.name:
        raise VerificationError(f"cosignature is by {sig.name!r}, not by the witness {witness.name!r}")
    # 3. tlog-cosignature §Format: the key ID of an Ed25519 cosignature uses type byte 0x04.
    if sig.key_id != witness.key_id:
        raise VerificationError(
            f"cosignature key ID {sig.key_id:08x} is not {witness.name}'s cosignature/v1 key ID {witness.key_id:08x}"
        )
    # 4. tlog-cosignature §Format and §Ed25519 signed message: timestamp bounds and signature.
    return witness.verify_timestamped(checkpoint_text, sig.signature)


@dataclass(frozen=True)
class CosignaturePolicy:
    """Trust a checkpoint when at least `quorum` of these witnesses cosigned it."""

    witnesses: tuple[Ed25519CosignatureVerifier, ...]
    quorum: int

    def __post_init__(self) -> None:
        if not 1 <= self.quorum <= len(self.witnesses):
            raise ValueError(f"quorum {self.quorum} is not between 1 and the {len(self.witnesses)} witnesses")
        names = [w.name for w in self.witnesses]
        if len(set(names)) != len(names):
            raise ValueError("two witnesses of the policy share a name")
        # tlog-cosignature §Ed25519 signed message: the message does not commit to the name, so one
        # key under two names would let one cosignature count twice toward the quorum.
        keys = [w.public_bytes for w in self.witnesses]
        if len(set(keys)) != len(keys):
            raise ValueError("two witnesses of the policy share a public key")

    @classmethod
    def from_vkeys(cls, vkeys: Iterable[str], quorum: int) -> CosignaturePolicy:
        return cls(tuple(Ed25519CosignatureVerifier.from_vkey(v) for v in vkeys), quorum)


def verify_cosignatures(note: bytes, policy: CosignaturePolicy, *, not_after: int | None = None) -> dict[str, int]:
    """Check that a quorum of the policy's witnesses cosigned a checkpoint note.

    Returns {witness name: cosignature timestamp} for every policy witness that cosigned (at least
    `policy.quorum` of them). With `not_after`, a cosignature whose timestamp is later is refused
    (tlog-cosignature: "verifiers MAY reject cosignatures with timestamps in the future"; pass
    now plus the skew you allow). This checks no log signature: verify the checkpoint itself with
    cloister.verify.checkpoint.verify_checkpoint.
    """
    by_id = {(w.name, w.key_id): w for w in policy.witnesses}
    # 1. signed-note: the note is well-formed; tlog-cosignature: its text is a checkpoint.
    parsed = parse_note(note)
    parse_checkpoint(parsed.text)
    cosigned: dict[str, int] = {}
    for sig in parsed.signatures:
        witness = by_id.get((sig.name, sig.key_id))
        # 2. signed-note §Signatures: ignore signatures by unknown keys (other types, other names).
        if witness is None:
            continue
        # 3. signed-note §Signatures: a known key's bad signature rejects the whole note (SHOULD).
        timestamp = witness.verify_timestamped(parsed.text, sig.signature)
        # 4. tlog-cosignature §Format: verifiers MAY reject timestamps in the future.
        if not_after is not None and timestamp > not_after:
            raise VerificationError(f"cosignature by {witness.name} has time {timestamp}, after {not_after}")
        cosigned.setdefault(witness.name, timestamp)
    # 5. tlog-cosignature: a quorum of cosignatures, one per witness, however many lines each sent.
    if len(cosigned) < policy.quorum:
        missing = sorted(w.name for w in policy.witnesses if w.name not in cosigned)
        raise VerificationError(
            f"checkpoint is cosigned by {len(cosigned)} of the {policy.quorum} witnesses required "
            f"(cosigned: {', '.join(sorted(cosigned)) or 'none'}; missing: {', '.join(missing)})"
        )
    return cosigned
