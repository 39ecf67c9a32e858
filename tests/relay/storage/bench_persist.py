"""Persist throughput with group commit (not a test: run it by hand).

    .venv/bin/python -m tests.storage.bench_persist [entries] [concurrency] [dir]

Plays the relay: `concurrency` tasks each persist one LogAppend (one ~300-byte entry and a
checkpoint) at a time, as concurrent tool calls do. As in the sequencer (which signs one
checkpoint for the requests that arrive while it signs), one checkpoint covers a group of
`concurrency` consecutive entries: never more, since every entry a checkpoint covers belongs to
a request in flight. Appends are prepared (and signed) before timing. The
log is on a real directory with fsync on.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time

from cloister.relay.storage import LocalBackend, LogWriter
from tests.relay.storage.conftest import Append, FakeLog, entry


def prepare(n: int, group: int = 64) -> list[Append]:
    log = FakeLog()
    apps: list[Append] = []
    for start in range(0, n, group):
        items = [entry(i, 300) for i in range(start, min(n, start + group))]
        log.add(items)
        note = log.checkpoint()
        apps.extend(Append(start + k, (e,), note) for k, e in enumerate(items))
    return apps


async def run(n: int, concurrency: int, directory: str) -> None:
    apps = prepare(n, concurrency)
    writer = await LogWriter.open(LocalBackend(directory))
    queue = iter(apps)

    async def worker() -> None:
        for a in queue:
            await writer.persist(a.first_index, a.entries, a.checkpoint)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    stats = writer.store.backend.stats.snapshot()
    await writer.close()
    print(
        f"{n} entries, {concurrency} concurrent: {n / elapsed:,.0f} entries/s "
        f"({stats['wal_appends']} WAL frames, {n / max(1, stats['wal_appends']):.1f} entries per fsync)"
    )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(n, concurrency, sys.argv[3] if len(sys.argv) > 3 else tmp))


if __name__ == "__main__":
    main()
