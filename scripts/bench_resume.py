"""Resume at any size (docs/decisions/0016): an enclave restart after 10,000 ... 1,000,000 calls.

For each size, a log is built in-process (tests/enclave/fastlog.py: the real limit book, entry
encoder, sequencer and the enclave's own snapshot writing, without token/Cedar/grant signing),
then a fresh enclave resumes it as the relay would: from the newest complete snapshot, with the
entries after it streamed in chunks (`EnclaveCore.resume_log_chunks`), then loads the bundle.
Each log ends just before its next snapshot is due: the most a resume reads. Measured (after a
warm-up resume, so imports are not counted): the resume's wall time (untraced), the peak of the
memory it allocated (tracemalloc, on a second resume), the entries and bytes streamed, and
whether the rebuilt budgets equal the live ones.

`--legacy` adds the same resume without snapshots (history from the start of the window), for
the smaller sizes: what a log written before snapshots costs.

Run: python scripts/bench_resume.py [--sizes 10000,100000,1000000] [--legacy]. Not a test:
it prints figures, which vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.enclave.fastlog import TailLog, fast_call, from_world, seal  # noqa: E402
from tests.world import BUNDLE_VALIDITY_S, EPOCH, make_world  # noqa: E402

STEP_MS = 100  # ten calls a second: the example bundle's rate cap (600/min) denies some


def build(calls: int, work: Path, *, snapshots: bool) -> tuple[Any, TailLog, float, int]:
    w = make_world(work)
    interval = w.core.snapshot_interval
    if not snapshots:
        w.core.snapshot_interval = 1 << 62
    # Keep what a resume reads: a few intervals after the newest snapshot, or (legacy) it all.
    log = from_world(w, 3 * interval if snapshots else 4 * calls + 10)
    t0 = time.perf_counter()
    n = 0
    for n in range(calls):
        w.clock.advance(STEP_MS / 1000)
        fast_call(w.core, log, w.clock(), 1 + n % 7, n)
    if snapshots:
        # The worst case: stop just before the next snapshot is due, so a resume reads a whole
        # interval after the newest one (otherwise how much it reads depends on where N falls).
        while log.size - w.core._snapshot_at < interval - 2:
            n += 1
            w.clock.advance(STEP_MS / 1000)
            fast_call(w.core, log, w.clock(), 1 + n % 7, n)
    seal(w.core, log)
    return w, log, time.perf_counter() - t0, n + 1


def resume(w: Any, log: TailLog, *, snapshots: bool) -> dict[str, Any]:
    s = log.snapshot_start() if snapshots else None
    if s is None:  # legacy: the whole window (here: the whole log, which is shorter than 31 days)
        s = 0
    start = log.start(s)  # the relay's work (proofs, compact range): not the enclave's
    chunks = list(log.chunks(s))
    streamed = sum(len(e) for _, es in chunks for e in es)
    bundle = w.sign_bundle(1, not_after=int(EPOCH.timestamp()) + BUNDLE_VALIDITY_S)
    # Timed without tracing; then again on another fresh enclave, traced, for the memory.
    fresh = w.new_core()
    gc.collect()
    t0 = time.perf_counter()
    fresh.resume_log_chunks(start, iter(chunks))
    fresh.load_policy(bundle)
    elapsed = time.perf_counter() - t0
    traced = w.new_core()
    gc.collect()
    tracemalloc.start()
    traced.resume_log_chunks(start, iter(chunks))
    traced.load_policy(bundle)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    now = w.clock()
    same = fresh.policy.limits.window_totals(now) == w.core.policy.limits.window_totals(now)
    return {
        "entries": log.size,
        "streamed_entries": log.size - s,
        "streamed_bytes": streamed,
        "chunks": len(chunks),
        "resume_s": elapsed,
        "peak_bytes": peak,
        "budgets_equal": same,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,100000,1000000", help="calls, comma-separated")
    p.add_argument("--legacy", action="store_true", help="also resume without snapshots (sizes up to 100,000)")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="cloister-bench-resume-") as tmp:  # warm-up: imports, caches
        resume(*build(200, Path(tmp), snapshots=True)[:2], snapshots=True)
    print(
        f"  {'calls':>9} {'entries':>9} {'mode':9} {'streamed':>9} {'bytes':>9} {'resume':>9} {'peak mem':>9}  budgets"
    )
    modes = [True, False] if args.legacy else [True]
    for calls in sizes:
        for snapshots in modes:
            if not snapshots and calls > 100_000:
                continue
            with tempfile.TemporaryDirectory(prefix="cloister-bench-resume-") as tmp:
                w, log, built_s, made = build(calls, Path(tmp), snapshots=snapshots)
                r = resume(w, log, snapshots=snapshots)
                del w, log
                gc.collect()
            print(
                f"  {made:9,} {r['entries']:9,} {'snapshot' if snapshots else 'history':9} "
                f"{r['streamed_entries']:9,} {r['streamed_bytes'] / 1e6:7.1f}MB {r['resume_s'] * 1000:7.0f}ms "
                f"{r['peak_bytes'] / 1e6:7.1f}MB  {'equal' if r['budgets_equal'] else 'DIFFER'}"
                f"   (log built in {built_s:.0f}s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
