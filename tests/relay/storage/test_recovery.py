"""Crash recovery: truncation to the latest durable checkpoint, torn and corrupt WAL, tampering."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cloister.relay.storage import LocalBackend, LogStore, StorageCorruption
from cloister.relay.storage.bodies import BodyRecord
from cloister.relay.storage.store import Batch, parse_checkpoint_note
from cloister.relay.storage.wal import WalCheckpoint, WalEntries, encode_frame
from cloister.verify.checkpoint import Checkpoint
from cloister.verify.note import sign_note
from cloister.verify.tiles import TILE_WIDTH
from tests.relay.storage.conftest import FakeLog, entry, key_entry, tiles_of, wal_segments


def append(
    store: LogStore,
    log: FakeLog,
    n: int,
    *,
    checkpoint: bool = True,
    size: int = 0,
    bodies: list[BodyRecord] | None = None,
) -> None:
    first = log.add([entry(log.size + i, size) for i in range(n)])
    cps = [parse_checkpoint_note(log.checkpoint())] if checkpoint else []
    store.append_batch(Batch(first, log.entries[first:], cps, bodies or []))


def crash(store: LogStore) -> None:
    """Stop without materializing or closing anything but the file lock."""
    store.backend.close()


def reopen(path: Path, **kw: object) -> LogStore:
    return LogStore.open(LocalBackend(path, **kw))  # type: ignore[arg-type]


def test_entries_beyond_the_last_durable_checkpoint_are_forgotten(
    log: FakeLog, log_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = reopen(log_dir)
    append(store, log, 10)
    store.materialize()
    append(store, log, 5, checkpoint=False)
    append(store, log, 3, checkpoint=False, bodies=[BodyRecord.of(12, "args", b"{}", 1)])
    assert (store.written_size, store.durable_size, store.published_size) == (18, 10, 10)
    crash(store)

    with caplog.at_level(logging.WARNING, logger="cloister.storage"):
        store = reopen(log_dir)
    assert "truncates the log to its latest durable checkpoint (size 10): 8 entries and 1 bodies" in caplog.text
    assert (store.written_size, store.durable_size, store.published_size) == (10, 10, 10)
    assert store.get_body_record(12, "args") is None
    # The enclave sequences other entries at those indexes; the stale ones never come back.
    stale = log.entries[10:]
    del log.entries[10:], log.leaves[10:]
    log._range = type(log._range).from_hashes(10, store.compact_range(10))
    log.add([b"new %d" % i for i in range(4)])
    store.append_batch(Batch(10, log.entries[10:], [parse_checkpoint_note(log.checkpoint())]))
    crash(store)
    store = reopen(log_dir)
    assert store.durable_size == 14
    assert store.read_entries(0, 14) == log.entries and store.read_entries(10, 11) != stale[:1]
    store.close()


def test_a_torn_last_frame_is_cut(log: FakeLog, log_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = reopen(log_dir)
    append(store, log, 10)
    append(store, log, 5)
    crash(store)
    (segment,) = wal_segments(log_dir)
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # the crash hit the middle of the second frame
    with caplog.at_level(logging.WARNING, logger="cloister.storage"):
        store = reopen(log_dir)
    assert "cutting a torn write" in caplog.text and "never acknowledged" in caplog.text
    assert store.durable_size == 10 and store.read_entries(0, 10) == log.entries[:10]
    # The log goes on from there.
    del log.entries[10:], log.leaves[10:]
    log._range = type(log._range).from_hashes(10, store.compact_range(10))
    append(store, log, 2)
    crash(store)
    assert reopen(log_dir).read_entries(0, 12) == log.entries


def test_zeros_after_the_last_frame_are_a_torn_write(log: FakeLog, log_dir: Path) -> None:
    store = reopen(log_dir)
    append(store, log, 10)
    crash(store)
    (segment,) = wal_segments(log_dir)
    with segment.open("ab") as f:
        f.write(bytes(4096))  # the file grew but its data never reached the disk
    store = reopen(log_dir)
    assert store.durable_size == 10
    store.close()


def test_a_corrupt_frame_before_the_end_is_refused(log: FakeLog, log_dir: Path) -> None:
    store = reopen(log_dir)
    append(store, log, 10)
    append(store, log, 5)
    crash(store)
    (segment,) = wal_segments(log_dir)
    data = bytearray(segment.read_bytes())
    data[30] ^= 0x40
    segment.write_bytes(bytes(data))
    with pytest.raises(
        StorageCorruption,
        match=rf"WAL wal/{segment.name} at offset 0: CRC mismatch in frame seq 0, "
        r"followed by \d+ more bytes \(not a torn write\)",
    ):
        reopen(log_dir)


def test_a_missing_wal_segment_is_refused(log: FakeLog, log_dir: Path) -> None:
    store = reopen(log_dir, segment_bytes=500)
    for _ in range(6):
        append(store, log, 5, size=100)
    crash(store)
    segments = wal_segments(log_dir)
    assert len(segments) >= 3
    segments[1].unlink()
    with pytest.raises(StorageCorruption, match=r"starts at frame \d+, expected \d+ \(a WAL chunk is missing\)"):
        reopen(log_dir)


def test_the_wal_shrinks_once_tiles_hold_its_entries(log: FakeLog, log_dir: Path) -> None:
    store = reopen(log_dir, segment_bytes=2000)
    for _ in range(20):
        append(store, log, 10, size=50)
    assert len(wal_segments(log_dir)) > 5
    store.materialize()
    store.compact_wal()
    assert len(wal_segments(log_dir)) <= 1
    append(store, log, 3)
    crash(store)
    store = reopen(log_dir)
    assert store.durable_size == 203 and store.read_entries(0, 203) == log.entries
    store.close()


@pytest.mark.parametrize("verify", ["full", "tail"])
def test_a_crash_between_tiles_and_checkpoint(log: FakeLog, log_dir: Path, verify: str) -> None:
    store = reopen(log_dir)
    append(store, log, 300)
    store.materialize()
    first = log.add([key_entry(1, n=1), *(entry(i) for i in range(301, 600))])  # a key entry at 300
    store.append_batch(Batch(first, log.entries[first:], [parse_checkpoint_note(log.checkpoint())]))
    real_write = store.backend.write

    def fail_on_checkpoint(path: str, data: bytes) -> None:
        if path == "checkpoint":
            raise OSError("power cut")
        real_write(path, data)

    store.backend.write = fail_on_checkpoint  # type: ignore[method-assign]
    with pytest.raises(OSError, match="power cut"):
        store.materialize()
    # Tiles and the key index for 600 are written; the published checkpoint is still at 300.
    assert store.published_size == 300 and (log_dir / "tile/0/002.p/88").exists()
    assert (log_dir / "meta/key-entries").read_bytes().endswith((300).to_bytes(8, "big"))
    crash(store)
    store = LogStore.open(LocalBackend(log_dir), verify=verify)  # type: ignore[arg-type]
    assert store.published_size == store.durable_size == 600
    assert store.read_path("tile/0/002.p/88") == b"".join(tiles_of(log.leaves)[(0, 2)])
    assert store.latest_key_entry(600) == 300
    store.close()


@pytest.fixture
def published(log: FakeLog, log_dir: Path) -> Path:
    """A log of 1000 entries, all materialized: tiles 0-2 full, 3 partial (232), level 1 partial (3)."""
    store = reopen(log_dir)
    append(store, log, 1000)
    store.materialize()
    store.close()
    return log_dir


def flip(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def test_a_tampered_full_tile_is_found_by_the_full_check(published: Path) -> None:
    flip(published / "tile/0/001", 32 * 5)
    with pytest.raises(
        StorageCorruption,
        match=r"tile/0/001: hash 5 does not match the leaf hash of its entry in "
        r"tile/entries/001",
    ):
        LogStore.open(LocalBackend(published), verify="full")
    # The tail check reads only the right edge; it does not see a tile off the edge.
    LogStore.open(LocalBackend(published), verify="tail").close()


def test_a_tampered_bundle_is_found(published: Path) -> None:
    flip(published / "tile/entries/001", 5)
    with pytest.raises(StorageCorruption, match=r"tile/0/001: hash \d+ does not match the leaf hash"):
        LogStore.open(LocalBackend(published), verify="full")


@pytest.mark.parametrize("mode", ["full", "tail"])
def test_tampering_on_the_right_edge_is_found_by_both_checks(published: Path, mode: str) -> None:
    flip(published / "tile/entries/003.p/232", 5)
    with pytest.raises(
        StorageCorruption,
        match=r"tile/0/003.p/232: hash \d+ does not match the leaf hash of its "
        r"entry in tile/entries/003.p/232",
    ):
        LogStore.open(LocalBackend(published), verify=mode)  # type: ignore[arg-type]


def test_a_tampered_upper_tile_breaks_the_root(published: Path) -> None:
    flip(published / "tile/1/000.p/3", 0)
    with pytest.raises(StorageCorruption, match="tile/1/000.p/3: hash 0 does not match the root of the tile"):
        LogStore.open(LocalBackend(published), verify="full")
    with pytest.raises(StorageCorruption, match="the hash tiles of the published tree .size 1000. give root"):
        LogStore.open(LocalBackend(published), verify="tail")


def test_a_missing_tile_is_named(published: Path) -> None:
    (published / "tile/0/003.p/232").unlink()
    with pytest.raises(
        StorageCorruption,
        match=r"tile/0/003.p/232 is missing; the published checkpoint "
        r"\(size 1000\) needs it",
    ):
        LogStore.open(LocalBackend(published), verify="tail")


def test_a_checkpoint_that_the_tiles_do_not_reproduce(published: Path, log: FakeLog) -> None:
    forged = sign_note(Checkpoint(log.origin, 1000, bytes(32)).to_text(), [log.signer])
    (published / "checkpoint").write_bytes(forged)
    with pytest.raises(
        StorageCorruption,
        match="the stored entry bundles .size 1000. hash to root [0-9a-f]+, the published checkpoint says 0000",
    ):
        LogStore.open(LocalBackend(published), verify="full")
    (published / "checkpoint").write_bytes(b"garbage")
    with pytest.raises(StorageCorruption, match="checkpoint is not a checkpoint note"):
        LogStore.open(LocalBackend(published))


def test_a_wal_checkpoint_that_the_wal_entries_do_not_reproduce(log: FakeLog, log_dir: Path) -> None:
    backend = LocalBackend(log_dir)
    log.add([entry(i) for i in range(5)])
    bad = sign_note(Checkpoint(log.origin, 5, bytes(32)).to_text(), [log.signer])
    backend.wal_append(0, encode_frame(0, [WalEntries(0, tuple(log.entries)), WalCheckpoint(bad)]))
    backend.close()
    with pytest.raises(StorageCorruption, match=r"WAL wal/0+\.wal at offset 0: checkpoint at size 5 has root 0000"):
        reopen(log_dir)


def test_a_wal_checkpoint_without_its_entries(log: FakeLog, log_dir: Path) -> None:
    backend = LocalBackend(log_dir)
    log.add([entry(i) for i in range(5)])
    backend.wal_append(0, encode_frame(0, [WalEntries(0, tuple(log.entries[:3])), WalCheckpoint(log.checkpoint())]))
    backend.close()
    with pytest.raises(
        StorageCorruption,
        match=r"checkpoint at size 5 needs entries \[0, 5\), but the WAL holds "
        r"\[0, 3\)",
    ):
        reopen(log_dir)


def test_a_second_process_cannot_open_the_same_directory(log_dir: Path) -> None:
    from cloister.relay.storage import StorageError

    first = LocalBackend(log_dir)
    with pytest.raises(StorageError, match="in use by another process"):
        LocalBackend(log_dir)
    first.close()
    LocalBackend(log_dir).close()


def test_reopen_after_full_materialization_has_no_wal_to_replay(log: FakeLog, log_dir: Path) -> None:
    store = reopen(log_dir)
    append(store, log, 2 * TILE_WIDTH)
    store.materialize()
    store.compact_wal()
    store.close()
    assert wal_segments(log_dir) == []
    store = reopen(log_dir)
    assert store.durable_size == store.published_size == 512
    append(store, log, 1)
    store.close()
    assert reopen(log_dir).durable_size == 513
