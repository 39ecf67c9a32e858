"""The WAL frame format: round trips, torn tails versus corruption, record parsing, body records."""

from __future__ import annotations

import hashlib
import struct

import pytest

from cloister.relay.storage.bodies import BodyRecord, body_path, encode_body, parse_body
from cloister.relay.storage.errors import StorageCorruption
from cloister.relay.storage.wal import (
    WalBody,
    WalCheckpoint,
    WalEntries,
    WalTruncate,
    decode_chunk,
    encode_frame,
)

BODY = BodyRecord.of(7, "args", b'{"amount":5}', 1234)
RECORDS: list[WalEntries | WalCheckpoint | WalBody | WalTruncate] = [
    WalBody(BODY),
    WalEntries(10, (b"a", b"", b"c" * 300)),
    WalCheckpoint(b"note\n"),
    WalTruncate(9),
]


def test_round_trip() -> None:
    data = encode_frame(3, RECORDS) + encode_frame(4, [WalEntries(13, (b"d",))])
    decoded = decode_chunk(data, "seg", 3, tail_may_tear=True)
    assert decoded.torn_reason is None and decoded.valid_length == len(data)
    assert [f.seq for f in decoded.frames] == [3, 4]
    assert list(decoded.frames[0].records) == RECORDS
    assert decoded.frames[1].records == (WalEntries(13, (b"d",)),)


def test_empty_chunk_and_empty_frame() -> None:
    assert decode_chunk(b"", "seg", 0, tail_may_tear=False).frames == ()
    assert decode_chunk(encode_frame(0, []), "seg", 0, tail_may_tear=False).frames[0].records == ()


@pytest.mark.parametrize("cut", [1, 10, 20, 21, 40, -1])
def test_torn_tail_is_cut_at_the_last_whole_frame(cut: int) -> None:
    good = encode_frame(0, RECORDS)
    last = encode_frame(1, [WalEntries(13, (b"x" * 100,))])
    data = good + last[:cut]
    decoded = decode_chunk(data, "seg", 0, tail_may_tear=True)
    assert decoded.valid_length == len(good)
    assert [f.seq for f in decoded.frames] == [0]
    assert decoded.torn_reason
    # Without permission to tear (S3 objects, earlier segments) it is corruption, with the place.
    with pytest.raises(StorageCorruption, match=f"WAL seg at offset {len(good)}"):
        decode_chunk(data, "seg", 0, tail_may_tear=False)


def test_zeroes_after_the_last_frame_are_unused_preallocated_space() -> None:
    good = encode_frame(0, RECORDS)
    decoded = decode_chunk(good + bytes(5000), "seg", 0, tail_may_tear=True)
    assert decoded.valid_length == len(good) and decoded.torn_reason is None
    assert [f.seq for f in decoded.frames] == [0]
    # Only the last local segment is preallocated: anywhere else zeros are not a frame.
    with pytest.raises(StorageCorruption, match="zero bytes instead of a frame"):
        decode_chunk(good + bytes(5000), "seg", 0, tail_may_tear=False)


@pytest.mark.parametrize("cut", [1, 20, 21, 40, -1])
def test_a_torn_frame_in_preallocated_space_is_cut(cut: int) -> None:
    """The last write tore inside the zeros: whatever part of it landed, then zeros to the end."""
    good = encode_frame(0, RECORDS)
    last = encode_frame(1, [WalEntries(13, (b"x" * 100,))])
    data = good + last[:cut] + bytes(4096)
    decoded = decode_chunk(data, "seg", 0, tail_may_tear=True)
    assert decoded.valid_length == len(good) and decoded.torn_reason
    assert [f.seq for f in decoded.frames] == [0]


def test_a_torn_frame_with_its_first_bytes_zero_is_cut() -> None:
    # The frame's header made it but a later part of its payload is still zeros.
    good = encode_frame(0, RECORDS)
    last = bytearray(encode_frame(1, [WalEntries(13, (b"x" * 600,))]))
    last[300:] = bytes(len(last) - 300)
    decoded = decode_chunk(good + bytes(last) + bytes(4096), "seg", 0, tail_may_tear=True)
    assert decoded.valid_length == len(good) and "CRC" in (decoded.torn_reason or "")


def test_a_bad_frame_followed_by_data_in_preallocated_space_is_corruption() -> None:
    # Zeros after it do not excuse a bad frame that a later frame follows (it was synced).
    f0, f1, f2 = (encode_frame(i, [WalEntries(i, (b"e%d" % i,))]) for i in range(3))
    flip = bytearray(f1)
    flip[-1] ^= 1
    with pytest.raises(StorageCorruption, match="not a torn write"):
        decode_chunk(f0 + bytes(flip) + f2 + bytes(4096), "seg", 0, tail_may_tear=True)
    # Nor do zeros make garbage beyond a frame header after the last frame a torn write.
    with pytest.raises(StorageCorruption, match="no frame magic"):
        decode_chunk(f0 + b"garbage" * 4 + bytes(4096), "seg", 0, tail_may_tear=True)


def test_bad_crc_in_the_last_frame_is_torn_but_in_the_middle_is_corruption() -> None:
    f0, f1, f2 = (encode_frame(i, [WalEntries(i, (b"e%d" % i,))]) for i in range(3))
    flip = bytearray(f2)
    flip[-1] ^= 1
    decoded = decode_chunk(f0 + f1 + bytes(flip), "seg", 0, tail_may_tear=True)
    assert decoded.valid_length == len(f0 + f1) and "CRC" in (decoded.torn_reason or "")
    flip = bytearray(f1)
    flip[-1] ^= 1
    with pytest.raises(
        StorageCorruption,
        match=rf"WAL seg at offset {len(f0)}: CRC mismatch in frame seq 1, "
        r"followed by \d+ more bytes \(not a torn write\)",
    ):
        decode_chunk(f0 + bytes(flip) + f2, "seg", 0, tail_may_tear=True)


def test_garbage_and_sequence_gaps_are_corruption() -> None:
    f0 = encode_frame(0, [])
    with pytest.raises(StorageCorruption, match="no frame magic"):
        decode_chunk(f0 + b"garbage" + f0, "seg", 0, tail_may_tear=True)
    with pytest.raises(StorageCorruption, match="sequence number 2, expected 1"):
        decode_chunk(f0 + encode_frame(2, []), "seg", 0, tail_may_tear=True)
    with pytest.raises(StorageCorruption, match="sequence number 0, expected 5"):
        decode_chunk(f0, "seg", 5, tail_may_tear=False)


def _frame_with_payload(payload: bytes) -> bytes:
    import zlib

    crc = zlib.crc32(payload, zlib.crc32(struct.pack(">QI", 0, len(payload))))
    return struct.pack(">4sQII", b"CLW1", 0, len(payload), crc) + payload


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x09", "unknown type 0x09"),
        (b"\x01" + struct.pack(">QI", 0, 2) + b"\x00\x01a", r"record 0 \(length of entry 1\) needs 2 bytes"),
        (b"\x01" + struct.pack(">QI", 0, 1) + b"\x00\x05ab", r"record 0 \(entry 0\) needs 5 bytes, 2 left"),
        (b"\x02" + struct.pack(">I", 10) + b"abc", r"needs 10 bytes, 3 left"),
        (b"\x04\x00", r"needs 8 bytes"),
        (b"\x03" + struct.pack(">I", 3) + b"abc", "body record is 3 bytes"),
    ],
)
def test_malformed_records_are_corruption(payload: bytes, message: str) -> None:
    with pytest.raises(StorageCorruption, match=message):
        decode_chunk(_frame_with_payload(payload), "seg", 0, tail_may_tear=True)


def test_body_records_and_tombstones() -> None:
    assert parse_body(encode_body(BODY), "x") == BODY
    tomb = BODY.tombstone(99)
    assert tomb.redacted and tomb.sha256 == hashlib.sha256(b'{"amount":5}').digest()
    assert parse_body(encode_body(tomb), "x") == tomb
    tampered = bytearray(encode_body(BODY))
    tampered[-1] ^= 1
    with pytest.raises(StorageCorruption, match="does not hash to its recorded SHA-256"):
        parse_body(bytes(tampered), "bodies/007.args")
    with pytest.raises(StorageCorruption, match="tombstone carries 1 bytes"):
        parse_body(encode_body(tomb) + b"x", "x")
    assert body_path(1234067, "result") == "bodies/x001/x234/067.result"
    with pytest.raises(ValueError, match="not 'args' or 'result'"):
        body_path(1, "other")
    with pytest.raises(ValueError, match="more than"):
        BodyRecord.of(1, "args", bytes((16 << 20) + 1), 0)
