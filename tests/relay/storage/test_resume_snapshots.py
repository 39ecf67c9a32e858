"""The relay's side of a resume from a snapshot (docs/decisions/0016): where it starts, and the
entries read and sent in bounded chunks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cloister.relay.storage import LocalBackend, LogStore
from cloister.relay.storage.resume import CHUNK_BYTES, CHUNK_ENTRIES, resume_chunks, resume_plan
from cloister.relay.storage.store import Batch, parse_checkpoint_note
from cloister.verify.entries import SnapshotEntry, encode_entry
from cloister.verify.merkle import CompactRange, leaf_hash
from tests.relay.storage.conftest import FakeLog, key_entry, outcome

T0 = 1_700_000_000_000


def snapshot_parts(index: int, parts: int, open_from: int, t: int) -> list[bytes]:
    return [
        encode_entry(
            SnapshotEntry(
                time_ms=t,
                upto=index,
                part=k,
                parts=parts,
                open_from=open_from,
                policy_version=1,
                policy_sha256=b"p" * 32,
                windows=((f"lim{k}", "agent", ((t, "1"),)),),
            )
        )
        for k in range(parts)
    ]


def build(log: FakeLog, path: Path, items: list[bytes]) -> LogStore:
    store = LogStore.open(LocalBackend(path))
    for start in range(0, len(items), 500):
        first = log.add(items[start : start + 500])
        store.append_batch(Batch(first, items[start : start + 500], [parse_checkpoint_note(log.checkpoint())]))
    return store


def items_with_snapshots(n: int, at: dict[int, tuple[int, int]]) -> list[bytes]:
    """`n` entries: a key entry first, outcomes, and snapshots at the indexes of `at`
    (index -> (parts, open_from))."""
    items: list[bytes] = [key_entry(T0)]
    while len(items) < n:
        i = len(items)
        if i in at:
            parts, open_from = at[i]
            items += snapshot_parts(i, parts, open_from, T0 + i)
        else:
            items.append(outcome(i, T0 + i))
    return items[:n]


def test_the_resume_starts_at_the_newest_complete_snapshot(log: FakeLog, log_dir: Path) -> None:
    store = build(log, log_dir, items_with_snapshots(3000, {1000: (3, 1000), 2000: (2, 1990)}))
    plan = resume_plan(store, 1_000_000, T0 - 1)  # the window would reach back to the start
    assert plan is not None and plan.end == 3000
    # The newest snapshot says a decision at 1990 may still be open: the history starts there.
    assert plan.material.range_size == 1990 and plan.material.entries == []
    store.close()


def test_a_snapshot_cut_short_is_passed_over(log: FakeLog, log_dir: Path) -> None:
    items = items_with_snapshots(3000, {1000: (3, 1000)})
    # A snapshot at 2000 that claims three parts, of which only one was stored before a stop.
    items[2000] = snapshot_parts(2000, 3, 2000, T0)[0]
    store = build(log, log_dir, items)
    plan = resume_plan(store, 1_000_000, T0 - 1)
    assert plan is not None and plan.material.range_size == 1000
    store.close()


def test_without_a_snapshot_the_window_decides(log: FakeLog, log_dir: Path) -> None:
    store = build(log, log_dir, items_with_snapshots(3000, {}))
    plan = resume_plan(store, 1_000_000, T0 + 2500)
    assert plan is not None and plan.material.range_size == 2500
    # A snapshot further back than the search is not looked for.
    store.close()


def test_a_snapshot_beyond_the_search_is_not_used(log: FakeLog, log_dir: Path) -> None:
    store = build(log, log_dir, items_with_snapshots(3000, {100: (1, 100)}))
    plan = resume_plan(store, 1_000_000, T0 + 2500, snapshot_search=1000)
    assert plan is not None and plan.material.range_size == 2500
    near = resume_plan(store, 1_000_000, T0 + 2500, snapshot_search=3000)
    assert near is not None and near.material.range_size == 100
    store.close()


@pytest.mark.parametrize("entry_size", ["small", "large"])
def test_chunks_are_bounded_contiguous_and_hash_to_the_root(log: FakeLog, log_dir: Path, entry_size: str) -> None:
    if entry_size == "small":
        items = items_with_snapshots(10_000, {})
    else:
        # Entries of about 60 kB: a chunk is cut by bytes, not by count.
        items = [key_entry(T0)] + [
            encode_entry(
                SnapshotEntry(
                    time_ms=T0,
                    upto=i,
                    part=0,
                    parts=1,
                    open_from=i,
                    policy_version=None,
                    policy_sha256=None,
                    windows=tuple((f"l{j}", "k" * 300, ((T0 + 1, "1"),)) for j in range(180)),
                )
            )
            for i in range(1, 300)
        ]
    store = build(log, log_dir, items)
    plan = resume_plan(store, 1_000_000, T0 - 1, snapshot_search=0)
    assert plan is not None
    m = plan.material
    tree = CompactRange.from_hashes(m.range_size, m.range_hashes)
    expect = m.range_size
    sizes = []
    for first, entries in resume_chunks(store, m.range_size, plan.end):
        assert first == expect and 0 < len(entries) <= CHUNK_ENTRIES
        assert sum(map(len, entries)) <= CHUNK_BYTES or len(entries) == 1
        for e in entries:
            tree.append(leaf_hash(e))
        expect += len(entries)
        sizes.append(len(entries))
    assert expect == plan.end == log.size and tree.root() == log.root()
    assert len(sizes) > 1
    store.close()


def test_the_writer_streams_chunks_as_it_reads(log: FakeLog, log_dir: Path) -> None:
    from cloister.relay.storage import LogWriter

    items = items_with_snapshots(9000, {8000: (1, 8000)})
    build(log, log_dir, items).close()

    async def main() -> list[tuple[int, int]]:
        writer = await LogWriter.open(LocalBackend(log_dir))
        plan = await writer.resume_plan(1_000_000, T0 - 1)
        assert plan is not None
        got = [
            (first, len(entries)) async for first, entries in writer.resume_chunks(plan.material.range_size, plan.end)
        ]
        await writer.close()
        return got

    got = asyncio.run(main())
    assert got[0][0] == 8000 and sum(n for _, n in got) == 1000
