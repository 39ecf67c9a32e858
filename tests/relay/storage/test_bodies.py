"""Bodies beside the log: durable with the entry, redaction keeps the hash, retention."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from cloister.relay.storage import LocalBackend, LogStore, LogWriter, StorageClosed, WriterOptions
from tests.relay.storage.conftest import FakeLog, entry

ARGS = b'{"amount":5,"customer_id":"c"}'
RESULT = b'{"content":[{"text":"ok","type":"text"}]}'


async def open_writer(path: Path, **opts: object) -> LogWriter:
    return await LogWriter.open(LocalBackend(path), WriterOptions(**opts))  # type: ignore[arg-type]


def test_a_body_put_before_persist_is_durable_with_the_entry(log: FakeLog, log_dir: Path, tmp_path: Path) -> None:
    a = log.append([entry(0), entry(1)])

    async def main() -> None:
        w = await open_writer(log_dir, materialize_interval_ms=60_000)
        args = w.put_body(0, "args", ARGS)
        await w.persist(a.first_index, a.entries, a.checkpoint)
        assert args.done()  # acknowledged together: same group commit
        assert await w.get_body(0, "args") == ARGS
        assert await w.get_body(0, "result") is None
        # A crash image right after the acknowledgment has the body.
        import shutil

        shutil.copytree(log_dir, tmp_path / "image")
        await w.put_body(1, "result", RESULT)
        await w.close()

    asyncio.run(main())
    image = LogStore.open(LocalBackend(tmp_path / "image"))
    rec = image.get_body_record(0, "args")
    assert rec is not None and rec.data == ARGS and rec.sha256 == hashlib.sha256(ARGS).digest()
    image.close()
    store = LogStore.open(LocalBackend(log_dir))
    assert (log_dir / "bodies/000.args").exists() and (log_dir / "bodies/001.result").exists()
    rec = store.get_body_record(1, "result")
    assert rec is not None and rec.data == RESULT
    store.close()


def test_redaction_keeps_the_commitment(log: FakeLog, log_dir: Path) -> None:
    a = log.append([entry(0)])

    async def main() -> None:
        w = await open_writer(log_dir)
        w.put_body(0, "args", ARGS)
        await w.persist(a.first_index, a.entries, a.checkpoint)
        await w.redact_body(0, "args")
        assert await w.get_body(0, "args") is None
        rec = await w.get_body_record(0, "args")
        assert rec is not None and rec.redacted and rec.sha256 == hashlib.sha256(ARGS).digest()
        await w.redact_body(0, "args")  # idempotent
        with pytest.raises(KeyError, match="no result body stored for entry 0"):
            await w.redact_body(0, "result")
        await w.close()

    asyncio.run(main())
    store = LogStore.open(LocalBackend(log_dir))
    rec = store.get_body_record(0, "args")
    assert rec is not None and rec.redacted and rec.sha256 == hashlib.sha256(ARGS).digest()
    assert ARGS not in (log_dir / "bodies/000.args").read_bytes()
    store.close()


def test_redacting_a_materialized_body(log: FakeLog, log_dir: Path) -> None:
    a = log.append([entry(0)])

    async def first() -> None:
        w = await open_writer(log_dir)
        w.put_body(0, "result", RESULT)
        await w.persist(a.first_index, a.entries, a.checkpoint)
        await w.close()

    async def second() -> None:
        w = await open_writer(log_dir)
        assert await w.get_body(0, "result") == RESULT
        await w.redact_body(0, "result")
        await w.close()

    asyncio.run(first())
    asyncio.run(second())
    store = LogStore.open(LocalBackend(log_dir))
    rec = store.get_body_record(0, "result")
    assert rec is not None and rec.redacted
    store.close()


def test_retention_zero_keeps_no_bodies(log: FakeLog, log_dir: Path) -> None:
    a = log.append([entry(0)])

    async def main() -> None:
        w = await open_writer(log_dir, body_retention_days=0)
        fut = w.put_body(0, "args", ARGS)
        assert fut.done()
        await w.persist(a.first_index, a.entries, a.checkpoint)
        assert await w.get_body(0, "args") is None
        await w.close()

    asyncio.run(main())
    assert not (log_dir / "bodies").exists()


def test_retention_prunes_old_bodies(log: FakeLog, log_dir: Path) -> None:
    a = log.append([entry(0), entry(1)])

    async def main() -> None:
        w = await open_writer(log_dir, body_retention_days=7)
        w.put_body(0, "args", ARGS)
        w.put_body(1, "args", ARGS)
        await w.persist(a.first_index, a.entries, a.checkpoint)
        await w.close()
        # Both ages are set from one instant, which prune_bodies is then given: the file system's
        # own mtimes and the wall clock never meet (under faketime they are 400 days apart).
        now_s = 1_800_000_000
        for name, age_days in (("000.args", 8), ("001.args", 1)):
            then = now_s - age_days * 86400
            os.utime(log_dir / "bodies" / name, (then, then))
        w = await open_writer(log_dir, body_retention_days=7)
        assert await w.prune_bodies(now=now_s * 1000) == 1
        assert await w.get_body(0, "args") is None
        assert await w.get_body(1, "args") == ARGS
        await w.close()

    asyncio.run(main())


def test_body_futures_fail_when_the_writer_fails(log: FakeLog, log_dir: Path) -> None:
    a = log.append([entry(0)])

    async def main() -> None:
        w = await open_writer(log_dir)
        await w.persist(a.first_index, a.entries, a.checkpoint)
        with pytest.raises(Exception, match="received twice"):
            await w.persist(0, [b"other"], a.checkpoint)
        with pytest.raises(StorageClosed):
            w.put_body(1, "args", ARGS)
        await w.close()

    asyncio.run(main())


def test_a_body_shares_the_next_persists_frame(log: FakeLog, log_dir: Path) -> None:
    """A call's arguments wait for its outcome's persist: one WAL frame (one sync) for both."""
    decision, outcome = log.append([entry(0)]), log.append([entry(1)])

    async def main() -> None:
        w = await open_writer(log_dir, body_linger_ms=60_000, materialize_interval_ms=60_000)
        await w.persist(decision.first_index, decision.entries, decision.checkpoint)
        frames = w.store.backend.stats.snapshot()["wal_appends"]
        args = w.put_body(0, "args", ARGS)
        await asyncio.sleep(0.05)  # the flusher would have written it by now if woken
        assert not args.done() and w.store.backend.stats.snapshot()["wal_appends"] == frames
        assert await w.get_body(0, "args") == ARGS  # readable while it lingers
        await w.persist(outcome.first_index, outcome.entries, outcome.checkpoint)
        assert args.done() and args.exception() is None
        assert w.store.backend.stats.snapshot()["wal_appends"] == frames + 1
        await w.close()

    asyncio.run(main())


def test_awaiting_a_body_writes_it_at_once(log: FakeLog, log_dir: Path) -> None:
    a = log.append([entry(0)])

    async def main() -> None:
        w = await open_writer(log_dir, body_linger_ms=600_000)
        await w.persist(a.first_index, a.entries, a.checkpoint)

        async def put() -> None:
            await w.put_body(0, "args", ARGS)  # awaited directly: that is the request to write it

        await asyncio.wait_for(put(), 10)  # not after ten minutes
        await w.close()

    asyncio.run(main())


@pytest.mark.parametrize("linger_ms", [0, 30])
def test_a_lingering_body_is_written_on_its_own_within_the_linger(
    log: FakeLog, log_dir: Path, tmp_path: Path, linger_ms: int
) -> None:
    a = log.append([entry(0)])

    async def main() -> None:
        w = await open_writer(log_dir, body_linger_ms=linger_ms)
        await w.persist(a.first_index, a.entries, a.checkpoint)
        fut = w.put_body(0, "result", RESULT)
        done, _ = await asyncio.wait([fut], timeout=10)  # asyncio.wait does not await the future itself
        assert done
        import shutil

        shutil.copytree(log_dir, tmp_path / "image")
        await w.close()

    asyncio.run(main())
    image = LogStore.open(LocalBackend(tmp_path / "image"))
    rec = image.get_body_record(0, "result")
    assert rec is not None and rec.data == RESULT
    image.close()


def test_close_writes_a_lingering_body(log: FakeLog, log_dir: Path) -> None:
    a = log.append([entry(0)])

    async def main() -> None:
        w = await open_writer(log_dir, body_linger_ms=600_000)
        await w.persist(a.first_index, a.entries, a.checkpoint)
        fut = w.put_body(0, "args", ARGS)
        await w.close()
        assert fut.done() and fut.exception() is None

    asyncio.run(main())
    store = LogStore.open(LocalBackend(log_dir))
    rec = store.get_body_record(0, "args")
    assert rec is not None and rec.data == ARGS
    store.close()
