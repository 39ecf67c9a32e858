"""A relay stand-in for the kill -9 test: persists forever, printing each acknowledged size.

    python -m tests.storage.crash_child <directory>

Entries and checkpoints are deterministic (FakeLog with a fixed key), so the parent test can
recompute exactly what must be stored.
"""

from __future__ import annotations

import asyncio
import sys

from cloister.relay.storage import LocalBackend, LogWriter, WriterOptions
from tests.relay.storage.conftest import FakeLog, entry

CONCURRENCY = 32


async def main(directory: str) -> None:
    log = FakeLog()
    writer = await LogWriter.open(LocalBackend(directory), WriterOptions(materialize_every=512))
    while True:
        # One group of concurrent requests sharing a checkpoint, as the sequencer signs them.
        first = log.size
        log.add([entry(i, 100) for i in range(first, first + CONCURRENCY)])
        note = log.checkpoint()
        await asyncio.gather(*(writer.persist(first + k, [log.entries[first + k]], note) for k in range(CONCURRENCY)))
        sys.stdout.write(f"{writer.persisted_size}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
