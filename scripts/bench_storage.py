"""The log storage's cost per governed call, old settings against new, interleaved (decision 0025).

    PYTHONPATH=. .venv/bin/python scripts/bench_storage.py [calls] [rounds] [dir]

Plays what the relay's call path asks of the storage for one allowed tools/call, one call at a
time (one agent): persist the decision entry, put the arguments body, persist the outcome entry
with the result body. Each round runs both configurations back to back on a fresh log on a real
directory with fsync on:

- old: frames appended to the WAL segment (each fdatasync also commits the file's new size),
  each body written as soon as it is put (its own WAL frame), and materialization syncing every
  tile and body file and directory on its own;
- new: the WAL segment preallocated with zeros (fdatasync flushes data only), bodies lingering
  for the next persist (one frame for the arguments and the outcome), and materialization
  syncing its files with two syncfs(2) calls.

It prints the medians over rounds of: wall time per call, CPU per call of this process (every
thread: the flusher, the WAL and materializer threads), syncs and WAL frames per call (from the
backend's own counters), up to and including the writer's close (its final
materialization). Witnessing is not here: `cloister up` runs measure it (see 0025).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloister.relay.storage import LocalBackend, LogWriter, WriterOptions  # noqa: E402
from tests.relay.storage.conftest import FakeLog  # noqa: E402

ARGS = b'{"customer_id":"c-1042","reason":"lookup"}'
RESULT = b'{"content":[{"type":"text","text":"customer c-1042: active, 3 orders"}]}' * 4


@dataclass(frozen=True)
class Setting:
    name: str
    prealloc_bytes: int
    body_linger_ms: int
    syncfs_from: int


SETTINGS = (Setting("old", 0, 0, 0), Setting("new", 1 << 20, 50, 8))


def prepare(calls: int) -> list[tuple[int, bytes, bytes, int, bytes, bytes]]:
    """(decision index, entry, checkpoint, outcome index, entry, checkpoint) per call, signed ahead."""
    log = FakeLog()
    out = []
    for i in range(calls):
        d = log.append([b"decision %d " % i + b"." * 300])
        o = log.append([b"outcome %d " % i + b"." * 150])
        out.append((d.first_index, d.entries[0], d.checkpoint, o.first_index, o.entries[0], o.checkpoint))
    return out


async def one(
    setting: Setting, appends: list[tuple[int, bytes, bytes, int, bytes, bytes]], root: Path
) -> dict[str, float]:
    backend = LocalBackend(root, prealloc_bytes=setting.prealloc_bytes, syncfs_from=setting.syncfs_from)
    writer = await LogWriter.open(backend, WriterOptions(body_linger_ms=setting.body_linger_ms))
    before = backend.stats.snapshot()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for d_index, d_entry, d_cp, o_index, o_entry, o_cp in appends:
        await writer.persist(d_index, [d_entry], d_cp)
        writer.put_body(d_index, "args", ARGS)
        await asyncio.sleep(0.001)  # the upstream call
        writer.put_body(o_index, "result", RESULT)
        await writer.persist(o_index, [o_entry], o_cp)
    await writer.close()  # the last materialization (tiles, bodies, checkpoint) counts too
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = backend.stats.snapshot()
    n = len(appends)
    return {
        "wall_ms": 1000 * wall / n,
        "cpu_us": 1e6 * cpu / n,
        "syncs": (after["fsyncs"] - before["fsyncs"]) / n,
        "frames": (after["wal_appends"] - before["wal_appends"]) / n,
    }


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    base = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    appends = prepare(calls)
    results: dict[str, list[dict[str, float]]] = {s.name: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        for r in range(rounds):
            for s in SETTINGS if r % 2 == 0 else reversed(SETTINGS):  # alternate who goes first
                results[s.name].append(asyncio.run(one(s, appends, Path(tmp) / f"{s.name}-{r}")))
    where = tempfile.gettempdir() if base is None else base
    print(f"{calls} calls x {rounds} rounds, medians per call (fsync on, in {where})")
    for name, runs in results.items():
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        print(
            f"  {name}: wall {med['wall_ms']:.2f} ms, cpu {med['cpu_us']:.0f} us, "
            f"syncs {med['syncs']:.2f}, WAL frames {med['frames']:.2f}"
        )


if __name__ == "__main__":
    main()
