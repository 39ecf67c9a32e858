"""Replay throughput: `python -m tests.audit.bench_replay [--entries N] [--jobs J] [--dir DIR]`.

Builds (once, in DIR) a Cloister log of N entries: a real key entry and policy entry from the
enclave core, then synthetic decisions (allows with outcomes, denials of a few kinds) encoded by
the real entry encoder and signed into a checkpoint by the enclave's log key. Then it replays the
directory with `cloister.audit.replay` (hashing, tile checks, decoding and structure checks) and
prints entries per second. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from cloister.audit.full_replay import replay_log
from cloister.audit.source import SourceSpec
from cloister.verify.attestation import TrustRoot
from tests.audit.logbuilder import synthetic_log


def _cpu() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--jobs", default=f"1,{os.cpu_count() or 1}", help="comma-separated worker counts to measure")
    p.add_argument("--dir", type=Path, help="build the log here, or reuse the one already built here")
    args = p.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="cloister-bench-"))
    if not (directory / "log" / "checkpoint").exists():
        t0 = time.perf_counter()
        synthetic_log(directory, args.entries)
        print(f"built {args.entries:,} entries in {time.perf_counter() - t0:.1f}s in {directory}", file=sys.stderr)
    root = TrustRoot.from_pem((directory / "mock-nsm" / "root.pem").read_bytes())
    from datetime import UTC, datetime

    from cloister.audit import replay

    for jobs in sorted({int(j) for j in args.jobs.split(",")}):
        replay._worker_state.clear()  # cold: no templates learned by a previous run
        cpu0 = _cpu()
        t0 = time.perf_counter()
        replayed = replay_log(
            SourceSpec(str(directory / "log")), now=datetime.now(UTC), nonce=os.urandom(16), root=root, jobs=jobs
        )
        dt = time.perf_counter() - t0
        cpu = _cpu() - cpu0  # this process and its (finished) workers: steadier than wall time on a busy VM
        r = replayed.result
        print(
            f"replay jobs={jobs}: {r.tree_size:,} entries in {dt:.2f}s = {r.tree_size / dt:,.0f} entries/s "
            f"({cpu / r.tree_size * 1e6:.2f} µs of CPU per entry; ok={replayed.ok}, problems={r.problem_count}, "
            f"by template {r.summary.fast_decodes:,}, by parser {r.summary.full_decodes:,})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
