"""Resume material: what storage hands a restarted enclave, checked the way the enclave does."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from cloister.relay.storage import LocalBackend, LogStore, ResumeMaterial, StorageError
from cloister.relay.storage.resume import resume_material
from cloister.relay.storage.store import Batch, parse_checkpoint_note
from cloister.verify.checkpoint import parse_checkpoint
from cloister.verify.entries import KeyEntry, parse_entry
from cloister.verify.merkle import CompactRange, leaf_hash, verify_inclusion
from cloister.verify.note import parse_note
from tests.relay.storage.conftest import FakeLog, key_entry, outcome

T0 = 1_700_000_000_000


def check_like_the_enclave(m: ResumeMaterial) -> int:
    """enclave/resume.py steps 4-6, with the merkle functions directly (no attestation here)."""
    cp = parse_checkpoint(parse_note(m.checkpoint).text)
    assert isinstance(parse_entry(m.key_entry), KeyEntry)
    verify_inclusion(leaf_hash(m.key_entry), m.key_entry_index, cp.size, m.key_entry_proof, cp.root_hash)
    tree = CompactRange.from_hashes(m.range_size, m.range_hashes)
    assert m.range_size + len(m.entries) == cp.size
    for e in m.entries:
        tree.append(leaf_hash(e))
    assert tree.root() == cp.root_hash
    if m.range_size:
        verify_inclusion(leaf_hash(m.boundary_entry), m.range_size - 1, cp.size, m.boundary_proof, cp.root_hash)
    else:
        assert m.boundary_entry == b"" and m.boundary_proof == []
    return cp.size


def build(log: FakeLog, path: Path, *, materialize_at: int | None = None) -> LogStore:
    """A key entry at 0 and 700 (a restart), outcomes one second apart, 1000 entries."""
    store = LogStore.open(LocalBackend(path))
    items = []
    for i in range(1000):
        t = T0 + i * 1000
        items.append(key_entry(t, n=i // 700) if i in (0, 700) else outcome(i, t))
    for start in range(0, 1000, 100):
        first = log.add(items[start : start + 100])
        store.append_batch(Batch(first, items[start : start + 100], [parse_checkpoint_note(log.checkpoint())]))
        if materialize_at == log.size:
            store.materialize()
    return store


def test_an_empty_log_has_nothing_to_resume(log_dir: Path) -> None:
    store = LogStore.open(LocalBackend(log_dir))
    assert resume_material(store, 1000, None) is None
    store.close()


@pytest.mark.parametrize(
    ("max_history", "window_start", "want_start"),
    [
        (10_000, None, 1000),  # no limit windows: only the tree
        (10_000, T0 + 250_500, 251),  # entry 250 is older than the window, 251 is not
        (10_000, T0 + 250_000, 250),
        (100, T0 + 250_000, 900),  # bounded by the history cap
        (10_000, T0 - 1, 0),  # the window reaches before the log
        (0, T0, 1000),
    ],
)
def test_history_start_and_material(
    log: FakeLog, log_dir: Path, max_history: int, window_start: int | None, want_start: int
) -> None:
    store = build(log, log_dir, materialize_at=500)
    m = resume_material(store, max_history, window_start)
    assert m is not None
    assert m.range_size == want_start and m.key_entry_index == 700
    assert check_like_the_enclave(m) == 1000
    assert m.entries == log.entries[want_start:]
    if want_start and window_start is not None and max_history >= 1000:
        # Entry S - 1 is older than the window: the history reaches back far enough.
        assert parse_entry(m.boundary_entry).time_ms < window_start <= parse_entry(m.entries[0]).time_ms
    store.close()


@pytest.mark.parametrize("verify", ["full", "tail"])
def test_key_entries_are_found_after_reopening(
    log: FakeLog, log_dir: Path, verify: str, caplog: pytest.LogCaptureFixture
) -> None:
    build(log, log_dir, materialize_at=800).backend.close()  # crash: entries 800-999 only in the WAL
    store = LogStore.open(LocalBackend(log_dir), verify=verify)  # type: ignore[arg-type]
    assert store.latest_key_entry(1000) == 700 and store.latest_key_entry(700) == 0
    store.close()
    # Without the key index, the tail check falls back to scanning the bundles.
    (log_dir / "meta/key-entries").unlink()
    with caplog.at_level(logging.WARNING, logger="cloister.storage"):
        store = LogStore.open(LocalBackend(log_dir), verify=verify)  # type: ignore[arg-type]
    assert store.latest_key_entry(1000) == 700
    assert ("scanning all 1000 entries" in caplog.text) == (verify == "tail")
    m = resume_material(store, 300, T0 + 990_000)
    assert m is not None and check_like_the_enclave(m) == 1000
    store.close()


def test_a_log_without_a_key_entry_cannot_be_resumed(log: FakeLog, log_dir: Path) -> None:
    store = LogStore.open(LocalBackend(log_dir))
    log.add([outcome(0, T0)])
    store.append_batch(Batch(0, list(log.entries), [parse_checkpoint_note(log.checkpoint())]))
    with pytest.raises(StorageError, match="no key entry"):
        resume_material(store, 10, None)
    store.close()


def test_material_fills_the_proto_message(log: FakeLog, log_dir: Path) -> None:
    from cloister.wire import enclave_pb2

    store = build(log, log_dir)
    m = resume_material(store, 100, T0 + 950_000)
    assert m is not None
    msg = enclave_pb2.ResumeFrom(**dataclasses.asdict(m))
    assert msg.range_size == 950 and list(msg.entries) == log.entries[950:]
    store.close()


def test_a_real_enclave_resumes_from_storage(tmp_path: Path) -> None:
    """The enclave's own verify_resume (attestation, signature, proofs) accepts the material."""
    import asyncio

    from cloister.relay.storage import LogWriter
    from tests.world import make_world

    w = make_world(tmp_path / "world")
    w.persist(w.core.sync(len(w.log)))  # the latest checkpoint covers every entry

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        await writer.persist(0, w.log, w.checkpoints[-1])
        m = await writer.resume_material(10_000, w.clock.ms - 3_600_000)
        assert m is not None and m.range_size == 0
        fresh = w.new_core()
        appended = fresh.resume_log(**dataclasses.asdict(m))
        # The new enclave introduces its key right after the stored log.
        await writer.persist(appended.first_index, appended.entries, appended.checkpoint.note)
        assert writer.persisted_size == len(w.log) + 1
        await writer.close()

    asyncio.run(main())
