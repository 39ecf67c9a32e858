"""C2SP transparency-log checkpoints (https://c2sp.org/tlog-checkpoint).

A checkpoint is the text of a signed note (https://c2sp.org/signed-note):

    <origin>\\n
    <tree size, ASCII decimal, no leading zeros>\\n
    <base64 RFC 6962 root hash>\\n
    [<extension line>\\n ...]

The origin must be non-empty; it SHOULD be a schema-less URL, but clients must not assume it
is (sum.golang.org's origin is "go.sum database tree"), so any non-empty line is accepted.
The key name of the log's signature SHOULD match the origin, so that is not enforced either:
callers pin the origin and the keys separately.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import HASH_SIZE, MAX_TREE_SIZE
from cloister.verify.note import NoteVerifier, VerifiedNote, b64decode_strict, check_note_text, verify_note

__all__ = [
    "MAX_CHECKPOINT_LINE",
    "MAX_EXTENSION_LINES",
    "Checkpoint",
    "VerifiedCheckpoint",
    "parse_checkpoint",
    "verify_checkpoint",
]

# Caps on attacker-controlled text; real checkpoints have short lines and no extensions.
MAX_CHECKPOINT_LINE = 4096
MAX_EXTENSION_LINES = 32

_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_CONTROL = re.compile(r"[\x00-\x1f]")


def _check_line(value: str, what: str) -> None:
    if not value:
        raise DecodeError(f"checkpoint {what} is empty")
    if len(value.encode("utf-8")) > MAX_CHECKPOINT_LINE:
        raise DecodeError(f"checkpoint {what} is longer than {MAX_CHECKPOINT_LINE} bytes")
    m = _CONTROL.search(value)
    if m:
        raise DecodeError(f"checkpoint {what} has control character {m.group()!r}")


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: origin, tree size, root hash, and opaque extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The same rules as parse_checkpoint, so every Checkpoint can be serialised and re-parsed.
        _check_line(self.origin, "origin line")
        if not 0 <= self.size < MAX_TREE_SIZE:
            raise DecodeError(f"checkpoint tree size {self.size} is outside [0, 2**64)")
        if len(self.root_hash) != HASH_SIZE:
            raise DecodeError(f"checkpoint root hash is {len(self.root_hash)} bytes, want {HASH_SIZE}")
        if len(self.extensions) > MAX_EXTENSION_LINES:
            raise DecodeError(f"checkpoint has {len(self.extensions)} extension lines, more than {MAX_EXTENSION_LINES}")
        for i, ext in enumerate(self.extensions):
            _check_line(ext, f"extension line {i + 1}")

    def to_text(self) -> bytes:
        """The note text to sign."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode("ascii")]
        lines.extend(self.extensions)
        return "".join(line + "\n" for line in lines).encode("utf-8")


def parse_checkpoint(note_text: bytes) -> Checkpoint:
    """Parse a checkpoint from a note's text (not the whole signed note).

    Only call this on text whose signature was verified, e.g. through verify_checkpoint.
    """
    text = check_note_text(note_text, "checkpoint")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise DecodeError(f"checkpoint has {len(lines)} lines, need origin, size and root hash")
    if len(lines) - 3 > MAX_EXTENSION_LINES:
        raise DecodeError(f"checkpoint has {len(lines) - 3} extension lines, more than {MAX_EXTENSION_LINES}")
    origin, size_line, hash_line, *extensions = lines
    # Line 1: origin, any non-empty line.
    _check_line(origin, "origin line (line 1)")
    # Line 2: tree size, ASCII decimal without leading zeros, uint64.
    if not _DECIMAL.fullmatch(size_line):
        raise DecodeError(f"checkpoint size line (line 2) {size_line[:40]!r} is not a decimal without leading zeros")
    size = int(size_line)
    if size >= MAX_TREE_SIZE:
        raise DecodeError(f"checkpoint tree size {size} does not fit in 64 bits")
    # Line 3: base64 of the 32-byte root hash.
    if len(hash_line) > MAX_CHECKPOINT_LINE:
        raise DecodeError(f"checkpoint root hash line (line 3) is longer than {MAX_CHECKPOINT_LINE}")
    root_hash = b64decode_strict(hash_line, "checkpoint root hash (line 3)")
    if len(root_hash) != HASH_SIZE:
        raise DecodeError(f"checkpoint root hash (line 3) is {len(root_hash)} bytes, want {HASH_SIZE}")
    # Lines 4+: extension lines, each non-empty.
    for i, ext in enumerate(extensions):
        _check_line(ext, f"extension line (line {i + 4})")
    return Checkpoint(origin=origin, size=size, root_hash=root_hash, extensions=tuple(extensions))


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose note carried a good signature by a known key, for the pinned origin."""

    checkpoint: Checkpoint
    note: VerifiedNote


def verify_checkpoint(note_bytes: bytes, verifiers: Sequence[NoteVerifier], *, origin: str) -> VerifiedCheckpoint:
    """Verify a signed checkpoint note and parse it.

    1. The note is well-formed and signed by a known key (verify_note).
    2. Only then is its text parsed as a checkpoint (signed-note: ignore unverified text).
    3. The origin line equals the pinned `origin`, so one key cannot vouch for another log.
    """
    note = verify_note(note_bytes, verifiers)
    checkpoint = parse_checkpoint(note.text)
    if checkpoint.origin != origin:
        raise VerificationError(f"checkpoint origin {checkpoint.origin[:200]!r} is not the expected {origin!r}")
    return VerifiedCheckpoint(checkpoint=checkpoint, note=note)
