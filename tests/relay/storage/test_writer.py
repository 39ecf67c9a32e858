"""LogWriter: acknowledgment only after durability, reordering, group commit, duplicates."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from cloister.relay.storage import (
    LocalBackend,
    LogStore,
    LogWriter,
    ReorderBufferFull,
    StorageClosed,
    StorageInconsistency,
    WriterOptions,
)
from cloister.verify.checkpoint import Checkpoint
from cloister.verify.errors import DecodeError
from cloister.verify.note import sign_note
from cloister.verify.tiles import encode_entry_bundle
from tests.relay.storage.conftest import FakeLog, entry

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(fn(), 20)

    return asyncio.run(main())


async def open_writer(path: Path, **opts: object) -> LogWriter:
    return await LogWriter.open(LocalBackend(path), WriterOptions(**opts))  # type: ignore[arg-type]


def test_round_trip_and_reopen(log: FakeLog, log_dir: Path) -> None:
    apps = log.append_many(50, per_append=3)

    async def first() -> None:
        w = await open_writer(log_dir)
        assert w.persisted_size == 0 and w.latest_checkpoint() is None and w.published_checkpoint() is None
        for a in apps:
            await w.persist(a.first_index, a.entries, a.checkpoint)
            assert w.persisted_size == a.first_index + 3
        assert w.latest_checkpoint() == apps[-1].checkpoint
        await w.close()
        with pytest.raises(StorageClosed):
            await w.persist(150, [entry(150)], apps[-1].checkpoint)

    async def second() -> None:
        w = await open_writer(log_dir)
        assert w.persisted_size == 150
        assert w.published_checkpoint() == w.latest_checkpoint() == apps[-1].checkpoint
        assert await w.read_entries(0, 150) == log.entries
        assert await w.read_path("checkpoint") == apps[-1].checkpoint
        # The log continues where it stopped.
        a = log.append([entry(150)])
        await w.persist(a.first_index, a.entries, a.checkpoint)
        assert w.persisted_size == 151
        await w.close()

    run(first)
    run(second)
    assert LogStore.open(LocalBackend(log_dir)).read_entries(0, 151) == log.entries


def test_out_of_order_concurrent_persists(log: FakeLog, log_dir: Path) -> None:
    """64 tasks play concurrent requests: each takes the next append in sequence order (as the
    enclave sequences it), is delayed a random while, then persists; responses arrive out of
    order. Each persist returns only when its whole prefix is durable."""
    apps = log.append_many(64 * 4, per_append=2)
    rng = random.Random(7)
    arrival: list[int] = []

    async def main() -> None:
        w = await open_writer(log_dir)
        queue = iter(apps)

        async def task() -> None:
            for a in queue:
                for _ in range(rng.randrange(20)):
                    await asyncio.sleep(0)
                arrival.append(a.first_index)
                await w.persist(a.first_index, a.entries, a.checkpoint)
                assert w.persisted_size >= a.first_index + len(a.entries)

        await asyncio.gather(*(task() for _ in range(64)))
        assert w.persisted_size == log.size and w.missing() is None
        assert await w.read_entries(0, log.size) == log.entries
        await w.close()

    run(main)
    assert arrival != sorted(arrival)  # the test did exercise reordering


def test_group_commit_shares_fsyncs(log: FakeLog, log_dir: Path) -> None:
    apps = log.append_many(64)

    async def main() -> None:
        w = await open_writer(log_dir)
        before = w.store.backend.stats.snapshot()
        await asyncio.gather(*(w.persist(a.first_index, a.entries, a.checkpoint) for a in apps))
        after = w.store.backend.stats.snapshot()
        frames = after["wal_appends"] - before["wal_appends"]
        # 64 acknowledgments, a handful of fsyncs (one per frame, plus directory syncs).
        assert 1 <= frames <= 4, frames
        assert after["fsyncs"] - before["fsyncs"] <= 8
        await w.close()

    run(main)


def test_acknowledged_means_durable(log: FakeLog, tmp_path: Path) -> None:
    """Copy the directory right after each acknowledgment (a crash image): the entry is there."""
    live = tmp_path / "live"
    apps = log.append_many(20, per_append=2)

    async def main() -> list[Path]:
        w = await open_writer(live, materialize_every=1 << 30, materialize_interval_ms=60_000)
        images = []
        for n, a in enumerate(apps):
            await w.persist(a.first_index, a.entries, a.checkpoint)
            if n % 7 == 0:
                image = tmp_path / f"crash{n}"
                shutil.copytree(live, image)
                images.append(image)
        await w.close()
        return images

    for image in run(main):
        n = int(image.name.removeprefix("crash"))
        store = LogStore.open(LocalBackend(image))
        size = apps[n].first_index + 2
        assert store.durable_size == size
        assert store.read_entries(0, size) == log.entries[:size]
        assert store.published_checkpoint() == apps[n].checkpoint  # materialized on open
        store.close()


def test_waits_for_a_gap_and_reports_it(log: FakeLog, log_dir: Path) -> None:
    a0, a1, a2 = log.append([entry(0), entry(1)]), log.append([entry(2)]), log.append([entry(3), entry(4)])

    async def main() -> None:
        w = await open_writer(log_dir)
        late = asyncio.create_task(w.persist(a2.first_index, a2.entries, a2.checkpoint))
        await asyncio.sleep(0.05)
        assert not late.done() and w.persisted_size == 0
        assert w.missing() == (0, 3)
        await w.persist(a0.first_index, a0.entries, a0.checkpoint)
        assert w.persisted_size == 2 and not late.done() and w.missing() == (2, 3)
        await w.persist(a1.first_index, a1.entries, a1.checkpoint)
        await late
        assert w.persisted_size == 5 and w.missing() is None
        await w.close()

    run(main)


def test_a_checkpoint_ahead_of_the_entries_waits_for_them(log: FakeLog, log_dir: Path) -> None:
    """Entries 0-1 arrive with a checkpoint at 4 (entries 2-3 belong to another request)."""
    log.add([entry(i) for i in range(4)])
    note = log.checkpoint()

    async def main() -> None:
        w = await open_writer(log_dir)
        first = asyncio.create_task(w.persist(0, log.entries[:2], note))
        await asyncio.sleep(0.05)
        assert not first.done() and w.persisted_size == 0 and w.missing() == (2, 4)
        await w.persist(2, log.entries[2:], note)
        await first
        assert w.persisted_size == 4
        await w.wait_durable(3)
        await w.close()

    run(main)


def test_duplicates_must_be_identical(log: FakeLog, log_dir: Path) -> None:
    apps = log.append_many(10, per_append=2)

    async def main() -> None:
        w = await open_writer(log_dir)
        for a in apps:
            await w.persist(a.first_index, a.entries, a.checkpoint)
        # A late duplicate, and a SyncLog-style resend of everything: fine.
        await w.persist(apps[3].first_index, apps[3].entries, apps[3].checkpoint)
        await w.persist(0, log.entries, apps[-1].checkpoint)
        assert w.persisted_size == 20
        # The same index with other bytes is fatal.
        with pytest.raises(StorageInconsistency, match="entry 5 was received twice with different bytes"):
            await w.persist(5, [b"forged"], apps[-1].checkpoint)
        with pytest.raises(StorageClosed, match="failed"):
            await w.persist(20, [entry(20)], apps[-1].checkpoint)
        await w.close()

    run(main)


def test_duplicate_mismatch_while_pending(log: FakeLog, log_dir: Path) -> None:
    log.add([entry(i) for i in range(3)])
    note = log.checkpoint()

    async def main() -> None:
        w = await open_writer(log_dir)
        ahead = asyncio.create_task(w.persist(1, log.entries[1:], note))
        await asyncio.sleep(0)
        with pytest.raises(StorageInconsistency, match="entry 2 was received twice"):
            await w.persist(2, [b"other"], note)
        with pytest.raises(StorageClosed):
            await ahead
        await w.close()

    run(main)


def test_checkpoint_whose_root_the_entries_do_not_hash_to_is_refused(log: FakeLog, log_dir: Path) -> None:
    good = log.append([entry(0)])
    log.add([entry(1)])
    wrong = sign_note(Checkpoint(log.origin, 2, bytes(32)).to_text(), [log.signer])

    async def main() -> None:
        w = await open_writer(log_dir)
        await w.persist(good.first_index, good.entries, good.checkpoint)
        with pytest.raises(StorageClosed, match="checkpoint at size 2 has root 0000"):
            await w.persist(1, [entry(1)], wrong)
        with pytest.raises(StorageClosed):
            await w.persist(1, [entry(1)], log.checkpoint())
        await w.close()

    run(main)
    # Nothing of the bad batch reached the WAL.
    store = LogStore.open(LocalBackend(log_dir))
    assert store.durable_size == 1 and store.written_size == 1


def test_another_origin_is_refused(log: FakeLog, log_dir: Path) -> None:
    a = log.append([entry(0)])
    other = FakeLog(origin="someone.else/log")
    b = other.append([entry(0), entry(1)])

    async def main() -> None:
        w = await open_writer(log_dir)
        await w.persist(a.first_index, a.entries, a.checkpoint)
        with pytest.raises(StorageInconsistency, match="origin 'someone.else/log'"):
            await w.persist(1, b.entries[1:], b.checkpoint)
        await w.close()

    run(main)


def test_malformed_requests_leave_the_writer_usable(log: FakeLog, log_dir: Path) -> None:
    a = log.append([entry(0), entry(1)])

    async def main() -> None:
        w = await open_writer(log_dir)
        with pytest.raises(DecodeError, match="checkpoint note"):
            await w.persist(0, a.entries, b"not a note")
        with pytest.raises(ValueError, match="comes with a checkpoint of size 2"):
            await w.persist(0, [*a.entries, entry(2)], a.checkpoint)
        with pytest.raises(ValueError, match="more than 65535"):
            await w.persist(0, [bytes(70000)], a.checkpoint)
        await w.persist(a.first_index, a.entries, a.checkpoint)
        assert w.persisted_size == 2
        await w.close()

    run(main)


def test_reorder_buffer_is_bounded(log: FakeLog, log_dir: Path) -> None:
    apps = log.append_many(12)

    async def main() -> None:
        w = await open_writer(log_dir, max_reorder_entries=8)
        waiting = [asyncio.create_task(w.persist(a.first_index, a.entries, a.checkpoint)) for a in apps[1:9]]
        await asyncio.sleep(0)
        with pytest.raises(ReorderBufferFull, match="gap at index 0"):
            await w.persist(apps[9].first_index, apps[9].entries, apps[9].checkpoint)
        for a in (apps[0], apps[9], apps[10], apps[11]):
            await w.persist(a.first_index, a.entries, a.checkpoint)
        await asyncio.gather(*waiting)
        assert w.persisted_size == 12
        await w.close()

    run(main)


def test_close_fails_what_was_never_acknowledged(log: FakeLog, log_dir: Path) -> None:
    a0, a1 = log.append([entry(0)]), log.append([entry(1)])

    async def main() -> None:
        w = await open_writer(log_dir)
        await w.persist(a0.first_index, a0.entries, a0.checkpoint)
        stuck = asyncio.create_task(w.persist(5, [entry(5)], a1.checkpoint.replace(b"\n2\n", b"\n6\n")))
        await asyncio.sleep(0.02)
        await w.close()
        with pytest.raises(StorageClosed, match="before a checkpoint covered"):
            await stuck

    run(main)
    assert LogStore.open(LocalBackend(log_dir)).durable_size == 1


def test_proofs_and_reads_cover_the_unmaterialized_tail(log: FakeLog, log_dir: Path) -> None:
    from cloister.verify.merkle import verify_consistency, verify_inclusion

    apps = log.append_many(30, per_append=37)

    async def main() -> None:
        w = await open_writer(log_dir, materialize_every=1 << 30, materialize_interval_ms=60_000)
        for a in apps:
            await w.persist(a.first_index, a.entries, a.checkpoint)
        n = log.size
        assert w.store.published_size == 0 and w.persisted_size == n
        assert await w.read_path("checkpoint") is None
        assert await w.read_path("tile/0/000") is None  # nothing published yet
        root = log.root()
        for i in range(0, n, 17):
            verify_inclusion(log.leaves[i], i, n, await w.inclusion_proof(i, n), root)
        for m in (1, 255, 256, 257, 700, n):
            verify_consistency(m, n, await w.consistency_proof(m, n), log.root(m), root)
        assert await w.read_entries(250, 260) == log.entries[250:260]
        with pytest.raises(ValueError, match="outside the durable log"):
            await w.inclusion_proof(0, n + 1)
        # publish() materializes now, for a checkpoint about to be handed out.
        await w.publish()
        assert w.store.published_size == n and await w.read_path("checkpoint") == apps[-1].checkpoint
        assert await w.read_path("tile/entries/000") == encode_entry_bundle(log.entries[:256])
        await w.close()

    run(main)
