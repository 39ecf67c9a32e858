"""The write-ahead log format: frames of records, one frame per group commit.

A frame is what one fsync (local segment) or one PUT (S3 object) makes durable:

    magic "CLW1" | seq u64 | payload length u32 | CRC-32 u32 | payload

The CRC (zlib's CRC-32) covers seq, length and payload, so a frame is valid as a whole or not
at all: a crash in the middle of a write can leave a *torn* last frame, which is cut off on
open because nothing in it was acknowledged (acknowledgment waits for the fsync). A bad frame
that is *followed* by more data cannot be a torn write (the next frame is only written after
the previous one's fsync returned), so it is reported as corruption. Local segments are
preallocated with zeros (parent.storage.local): zeros after the last frame are unused space, and
a bad frame followed only by zeros is the torn last write.

The payload is a sequence of records, each starting with a type byte:

    0x01 ENTRIES     first index u64 | count u32 | count x (length u16 | entry bytes)
    0x02 CHECKPOINT  length u32 | signed checkpoint note (C2SP signed-note)
    0x03 BODY        length u32 | body record (parent.storage.bodies: body or tombstone)
    0x04 TRUNCATE    size u64: forget every entry and body at index >= size seen so far

All integers are big-endian.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from cloister.relay.storage.bodies import MAX_BODY_SIZE, BodyRecord, encode_body, parse_body
from cloister.relay.storage.errors import StorageCorruption
from cloister.verify.note import MAX_NOTE_SIZE
from cloister.verify.tiles import MAX_ENTRY_SIZE

__all__ = [
    "MAX_FRAME_PAYLOAD",
    "Frame",
    "WalBody",
    "WalCheckpoint",
    "WalEntries",
    "WalRecord",
    "WalTruncate",
    "decode_chunk",
    "encode_frame",
]

MAGIC = b"CLW1"
_HEADER = struct.Struct(">4sQII")
_SEQ_LEN = struct.Struct(">QI")
_ENTRIES = struct.Struct(">QI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
MAX_FRAME_PAYLOAD = 256 << 20
MAX_ENTRIES_PER_RECORD = 1 << 24

_T_ENTRIES = 0x01
_T_CHECKPOINT = 0x02
_T_BODY = 0x03
_T_TRUNCATE = 0x04


@dataclass(frozen=True)
class WalEntries:
    first: int
    entries: tuple[bytes, ...]


@dataclass(frozen=True)
class WalCheckpoint:
    note: bytes


@dataclass(frozen=True)
class WalBody:
    body: BodyRecord


@dataclass(frozen=True)
class WalTruncate:
    size: int


WalRecord = WalEntries | WalCheckpoint | WalBody | WalTruncate


@dataclass(frozen=True)
class Frame:
    seq: int
    records: tuple[WalRecord, ...]
    where: str  # chunk name and offset, for messages


def _encode_record(rec: WalRecord, out: list[bytes]) -> None:
    if isinstance(rec, WalEntries):
        if len(rec.entries) > MAX_ENTRIES_PER_RECORD:
            raise ValueError(f"{len(rec.entries)} entries in one WAL record, more than {MAX_ENTRIES_PER_RECORD}")
        out.append(bytes([_T_ENTRIES]) + _ENTRIES.pack(rec.first, len(rec.entries)))
        pack = _U16.pack
        for i, e in enumerate(rec.entries):
            if len(e) > MAX_ENTRY_SIZE:
                raise ValueError(f"entry {rec.first + i} is {len(e)} bytes, more than {MAX_ENTRY_SIZE}")
            out.append(pack(len(e)))
            out.append(e)
    elif isinstance(rec, WalCheckpoint):
        out.append(bytes([_T_CHECKPOINT]) + _U32.pack(len(rec.note)))
        out.append(rec.note)
    elif isinstance(rec, WalBody):
        data = encode_body(rec.body)
        out.append(bytes([_T_BODY]) + _U32.pack(len(data)))
        out.append(data)
    else:
        out.append(bytes([_T_TRUNCATE]) + _U64.pack(rec.size))


def encode_frame(seq: int, records: Sequence[WalRecord]) -> bytes:
    parts: list[bytes] = []
    for rec in records:
        _encode_record(rec, parts)
    payload = b"".join(parts)
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise ValueError(f"WAL frame payload is {len(payload)} bytes, more than {MAX_FRAME_PAYLOAD}")
    crc = zlib.crc32(payload, zlib.crc32(_SEQ_LEN.pack(seq, len(payload))))
    return _HEADER.pack(MAGIC, seq, len(payload), crc) + payload


def _decode_records(payload: bytes, where: str) -> tuple[WalRecord, ...]:
    records: list[WalRecord] = []
    off, end = 0, len(payload)

    def need(n: int, what: str) -> None:
        if end - off < n:
            raise StorageCorruption(f"{where}: record {len(records)} ({what}) needs {n} bytes, {end - off} left")

    while off < end:
        kind = payload[off]
        off += 1
        if kind == _T_ENTRIES:
            need(_ENTRIES.size, "entries header")
            first, count = _ENTRIES.unpack_from(payload, off)
            off += _ENTRIES.size
            if count > MAX_ENTRIES_PER_RECORD:
                raise StorageCorruption(f"{where}: record {len(records)} claims {count} entries")
            entries = []
            for i in range(count):
                need(2, f"length of entry {first + i}")
                (n,) = _U16.unpack_from(payload, off)
                off += 2
                need(n, f"entry {first + i}")
                entries.append(payload[off : off + n])
                off += n
            records.append(WalEntries(first, tuple(entries)))
        elif kind in (_T_CHECKPOINT, _T_BODY):
            need(4, "length")
            (n,) = _U32.unpack_from(payload, off)
            off += 4
            cap = MAX_NOTE_SIZE if kind == _T_CHECKPOINT else MAX_BODY_SIZE + 128
            if n > cap:
                raise StorageCorruption(f"{where}: record {len(records)} is {n} bytes, more than {cap}")
            need(n, "data")
            data = payload[off : off + n]
            off += n
            if kind == _T_CHECKPOINT:
                records.append(WalCheckpoint(data))
            else:
                records.append(WalBody(parse_body(data, f"{where}, record {len(records)}")))
        elif kind == _T_TRUNCATE:
            need(8, "size")
            (size,) = _U64.unpack_from(payload, off)
            off += 8
            records.append(WalTruncate(size))
        else:
            raise StorageCorruption(f"{where}: record {len(records)} has unknown type {kind:#04x}")
    return tuple(records)


@dataclass(frozen=True)
class DecodedChunk:
    frames: tuple[Frame, ...]
    # Length of the valid prefix; less than the chunk's length if a torn or preallocated tail was found.
    valid_length: int
    torn_reason: str | None  # None for a clean end or an all-zero (preallocated, unused) tail


def decode_chunk(data: bytes, name: str, first_seq: int, *, tail_may_tear: bool) -> DecodedChunk:
    """Split a WAL chunk into frames and check their sequence numbers.

    With `tail_may_tear` (the last chunk of a local WAL), zero bytes up to the end are unused
    preallocated space, and an invalid frame followed by nothing but zeros is a torn write:
    decoding stops before either (reporting only the torn write). Anything else invalid raises
    StorageCorruption naming the chunk and offset.
    """
    frames: list[Frame] = []
    off, end = 0, len(data)
    seq_expected = first_seq
    while off < end:
        where = f"WAL {name} at offset {off}"
        rest = end - off
        torn: str | None = None
        problem: str | None = None
        if rest < _HEADER.size:
            torn = f"{rest} bytes left, less than a frame header"
        else:
            magic, seq, length, crc = _HEADER.unpack_from(data, off)
            frame_end = off + _HEADER.size + length
            if magic != MAGIC:
                if not any(data[off:]) and tail_may_tear:
                    return DecodedChunk(tuple(frames), off, None)  # preallocated, never written
                if not any(data[off:]):
                    torn = f"{rest} zero bytes instead of a frame"
                elif not any(data[off + _HEADER.size :]):
                    torn = "a partly written frame header, then zeros"
                else:
                    problem = f"no frame magic {MAGIC!r} (found {bytes(magic)!r})"
            elif length > MAX_FRAME_PAYLOAD:
                problem = f"frame claims a payload of {length} bytes, more than {MAX_FRAME_PAYLOAD}"
            elif frame_end > end:
                torn = f"frame needs {length} payload bytes, {rest - _HEADER.size} left"
            else:
                payload = data[off + _HEADER.size : frame_end]
                if zlib.crc32(payload, zlib.crc32(_SEQ_LEN.pack(seq, length))) != crc:
                    if frame_end == end or not any(data[frame_end:]):
                        torn = "the last frame's CRC does not match"
                    else:
                        problem = (
                            f"CRC mismatch in frame seq {seq}, followed by {end - frame_end} more bytes "
                            "(not a torn write)"
                        )
                elif seq != seq_expected:
                    problem = f"frame has sequence number {seq}, expected {seq_expected} (a frame is missing)"
                else:
                    frames.append(Frame(seq, _decode_records(payload, where), where))
                    seq_expected += 1
                    off = frame_end
                    continue
        if torn is not None and tail_may_tear:
            return DecodedChunk(tuple(frames), off, torn)
        raise StorageCorruption(f"{where}: {problem or torn}")
    return DecodedChunk(tuple(frames), end, None)
