"""Preallocated WAL segments (decision 0025): frames overwrite written zeros so fdatasync needs no
journal commit. A crash leaves those zeros (and perhaps a torn frame in them) after the last
frame; recovery must keep every frame that was synced, cut the rest, and go on writing."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from cloister.relay.storage import LocalBackend, LogStore
from cloister.relay.storage.errors import StorageCorruption
from cloister.relay.storage.store import Batch, parse_checkpoint_note
from cloister.relay.storage.wal import WalEntries, encode_frame
from tests.relay.storage.conftest import FakeLog, entry

PREALLOC = 8192


def wal_segments(root: Path) -> list[Path]:
    return sorted((root / "wal").glob("*.wal"))


def append(store: LogStore, log: FakeLog, n: int, size: int = 50) -> None:
    first = log.add([entry(log.size + i, size) for i in range(n)])
    store.append_batch(Batch(first, log.entries[first:], [parse_checkpoint_note(log.checkpoint())]))


def crash_image(live: Path, where: Path) -> Path:
    """What a power cut leaves of a log whose store is still open: every synced byte, and the
    preallocated zeros (nothing is closed, trimmed or materialized)."""
    shutil.copytree(live, where)
    return where


def open_store(root: Path, *, prealloc_bytes: int = PREALLOC, segment_bytes: int = 64 << 20) -> LogStore:
    return LogStore.open(LocalBackend(root, prealloc_bytes=prealloc_bytes, segment_bytes=segment_bytes))


def test_frames_fill_preallocated_zeros_with_one_data_sync_each(tmp_path: Path) -> None:
    log = FakeLog()
    store = open_store(tmp_path / "log")
    before = store.backend.stats.snapshot()
    for _ in range(20):
        append(store, log, 1)
    after = store.backend.stats.snapshot()
    (segment,) = wal_segments(tmp_path / "log")
    size = segment.stat().st_size
    # The file is bigger than its frames (zeros ahead), grown a preallocation step at a time.
    assert size % PREALLOC == 0 and size > after["wal_bytes"] - before["wal_bytes"]
    grows = size // PREALLOC
    assert after["wal_appends"] - before["wal_appends"] == 20
    # One sync per frame, one per preallocation step, one for the new segment's directory entry.
    assert after["fsyncs"] - before["fsyncs"] == 20 + grows + 1
    # A clean close leaves the frames only.
    store.backend.close()
    assert segment.stat().st_size == after["wal_bytes"]
    store = open_store(tmp_path / "log")
    assert store.durable_size == 20 and store.read_entries(0, 20) == log.entries
    store.close()


def test_a_crash_leaves_zeros_that_recovery_cuts_without_losing_a_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = FakeLog()
    store = open_store(tmp_path / "log")
    for _ in range(7):
        append(store, log, 3)
    image = crash_image(tmp_path / "log", tmp_path / "image")
    store.close()
    (segment,) = wal_segments(image)
    assert not any(segment.read_bytes()[-100:])  # the preallocated tail is there
    with caplog.at_level(logging.WARNING, logger="cloister.storage"):
        recovered = open_store(image)
    assert "torn" not in caplog.text  # unused space, not a torn write
    assert recovered.durable_size == 21 and recovered.read_entries(0, 21) == log.entries
    # It goes on writing right after the last frame, and a second crash loses nothing either.
    append(recovered, log, 4)
    again = crash_image(image, tmp_path / "again")
    recovered.close()
    store = open_store(again)
    assert store.durable_size == 25 and store.read_entries(0, 25) == log.entries
    store.close()


@pytest.mark.parametrize("landed", [3, 20, 60, 200])
def test_a_torn_frame_in_the_zeros_is_cut_and_the_log_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, landed: int
) -> None:
    log = FakeLog()
    store = open_store(tmp_path / "log")
    append(store, log, 5)
    image = crash_image(tmp_path / "log", tmp_path / "image")
    store.close()
    # The next frame was being written when the power went: only its first `landed` bytes made it.
    (segment,) = wal_segments(image)
    data = bytearray(segment.read_bytes())
    end = len(data) - next(i for i, b in enumerate(reversed(data)) if b)  # end of the last frame
    torn = encode_frame(1, [WalEntries(5, tuple(entry(5 + i, 50) for i in range(5)))])
    data[end : end + landed] = torn[:landed]
    segment.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="cloister.storage"):
        recovered = open_store(image)
    assert "cutting a torn write" in caplog.text
    assert recovered.durable_size == 5 and recovered.read_entries(0, 5) == log.entries
    append(recovered, log, 2)
    recovered.close()
    store = open_store(image)
    assert store.read_entries(0, 7) == log.entries
    store.close()


def test_a_synced_frame_damaged_before_zeros_and_a_later_frame_is_refused(tmp_path: Path) -> None:
    log = FakeLog()
    store = open_store(tmp_path / "log")
    append(store, log, 5)
    append(store, log, 5)
    image = crash_image(tmp_path / "log", tmp_path / "image")
    store.close()
    (segment,) = wal_segments(image)
    data = bytearray(segment.read_bytes())
    data[40] ^= 0x01  # inside the first frame: the second one proves it had been synced
    segment.write_bytes(bytes(data))
    with pytest.raises(StorageCorruption, match="not a torn write"):
        open_store(image)


def test_a_rolled_segment_keeps_no_zeros(tmp_path: Path) -> None:
    """Only the last segment may end in zeros: a segment is trimmed before the next is created."""
    log = FakeLog()
    store = open_store(tmp_path / "log", segment_bytes=600)
    for _ in range(12):
        append(store, log, 2, size=100)
    image = crash_image(tmp_path / "log", tmp_path / "image")
    store.close()
    segments = wal_segments(image)
    assert len(segments) >= 3
    for seg in segments[:-1]:
        assert seg.read_bytes()[-1] != 0 and seg.stat().st_size < PREALLOC
    assert segments[-1].stat().st_size % PREALLOC == 0
    recovered = open_store(image, segment_bytes=600)
    assert recovered.durable_size == 24 and recovered.read_entries(0, 24) == log.entries
    recovered.close()


def test_without_preallocation_frames_are_appended(tmp_path: Path) -> None:
    log = FakeLog()
    store = open_store(tmp_path / "log", prealloc_bytes=0)
    for _ in range(5):
        append(store, log, 1)
    stats = store.backend.stats.snapshot()
    (segment,) = wal_segments(tmp_path / "log")
    assert segment.stat().st_size == stats["wal_bytes"]
    store.close()
