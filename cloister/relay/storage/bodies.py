"""Bodies beside the log: the tool-call arguments and results that entries commit to.

An entry commits to a body by the SHA-256 of its bytes (RFC 8785 canonical JSON, see
`cloister.verify.entries`); the parent keeps the bytes so that an auditor can check them. A body
can be redacted: it is replaced by a *tombstone* that keeps the hash, so the entry's
commitment still names what was there, and that says when it was removed.

One format, used both as a WAL record's payload and as the stored object
`bodies/<N>.<kind>` (N in the tlog-tiles index encoding, so no directory holds more than
1,000 names):

    magic "CLB1" | flags u8 (bit 0: tombstone) | kind u8 (1 args, 2 result) | index u64 |
    time_ms u64 | sha256 (32 bytes) | data (absent in a tombstone)

All integers are big-endian. `time_ms` is when the body was stored or redacted.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Literal

from cloister.relay.storage.errors import StorageCorruption
from cloister.verify.tiles import encode_tile_index

__all__ = [
    "BODY_KINDS",
    "MAX_BODY_SIZE",
    "BodyKind",
    "BodyRecord",
    "body_path",
    "check_body_kind",
    "encode_body",
    "parse_body",
]

BodyKind = Literal["args", "result"]
BODY_KINDS: dict[str, int] = {"args": 1, "result": 2}
_KIND_NAMES = {v: k for k, v in BODY_KINDS.items()}
# Tool results can be large, but a body must fit in one WAL frame next to its entries.
MAX_BODY_SIZE = 16 << 20
MAX_INDEX = (1 << 64) - 1

_MAGIC = b"CLB1"
_HEADER = struct.Struct(">4sBBQQ32s")
_TOMBSTONE = 0x01


def check_body_kind(kind: str) -> BodyKind:
    if kind == "args":
        return "args"
    if kind == "result":
        return "result"
    raise ValueError(f"body kind {kind!r} is not 'args' or 'result'")


def body_path(index: int, kind: str) -> str:
    """`bodies/x001/x234/067.args` for the arguments committed to by entry 1234067."""
    return f"bodies/{encode_tile_index(index)}.{check_body_kind(kind)}"


@dataclass(frozen=True)
class BodyRecord:
    """A stored body, or (data None) the tombstone of a redacted one."""

    index: int
    kind: BodyKind
    time_ms: int
    sha256: bytes
    data: bytes | None

    @property
    def redacted(self) -> bool:
        return self.data is None

    @classmethod
    def of(cls, index: int, kind: str, data: bytes, time_ms: int) -> BodyRecord:
        if len(data) > MAX_BODY_SIZE:
            raise ValueError(f"{kind} body of entry {index} is {len(data)} bytes, more than {MAX_BODY_SIZE}")
        if not 0 <= index <= MAX_INDEX:
            raise ValueError(f"log index {index} is outside [0, 2**64)")
        return cls(index, check_body_kind(kind), time_ms, hashlib.sha256(data).digest(), bytes(data))

    def tombstone(self, time_ms: int) -> BodyRecord:
        return BodyRecord(self.index, self.kind, time_ms, self.sha256, None)


def encode_body(rec: BodyRecord) -> bytes:
    flags = _TOMBSTONE if rec.data is None else 0
    header = _HEADER.pack(_MAGIC, flags, BODY_KINDS[rec.kind], rec.index, rec.time_ms, rec.sha256)
    return header + (rec.data or b"")


def parse_body(data: bytes, where: str) -> BodyRecord:
    """The one parser for body records; StorageCorruption naming `where` if they are malformed
    or if the data does not hash to the recorded SHA-256."""
    if len(data) < _HEADER.size:
        raise StorageCorruption(f"{where}: body record is {len(data)} bytes, shorter than its header ({_HEADER.size})")
    magic, flags, kind_code, index, time_ms, sha = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise StorageCorruption(f"{where}: body record does not start with {_MAGIC!r}")
    if flags & ~_TOMBSTONE:
        raise StorageCorruption(f"{where}: body record has unknown flags {flags:#x}")
    kind = _KIND_NAMES.get(kind_code)
    if kind is None:
        raise StorageCorruption(f"{where}: body record has unknown kind {kind_code}")
    body = data[_HEADER.size :]
    if flags & _TOMBSTONE:
        if body:
            raise StorageCorruption(f"{where}: tombstone carries {len(body)} bytes of data")
        return BodyRecord(index, check_body_kind(kind), time_ms, sha, None)
    if len(body) > MAX_BODY_SIZE:
        raise StorageCorruption(f"{where}: body is {len(body)} bytes, more than {MAX_BODY_SIZE}")
    if hashlib.sha256(body).digest() != sha:
        raise StorageCorruption(f"{where}: body data does not hash to its recorded SHA-256 {sha.hex()}")
    return BodyRecord(index, check_body_kind(kind), time_ms, sha, bytes(body))
