"""The enclave's memory does not grow with the log: one EnclaveCore appends 1,000,000 entries.

    .venv/bin/python scripts/bench_memory.py [--entries N] [--authorize N] [--no-tracemalloc]

In one process, an `EnclaveCore` (the code `cloister enclave` runs, with the mock NSM and a bundle
of 500 agents, a bench server and rate and spend limits) sequences a mix, interleaved evenly over
the whole run:

- `--authorize` (default 50,000) full decisions through `EnclaveCore.authorize`: strict JSON
  arguments, JWT verification (20,000 distinct tokens cycle through the 10,000-entry token cache,
  so it is always full and always evicting), Cedar, rate and spend limits, the decision entry,
  the grant and a checkpoint; nine in ten allowed calls get their outcome through
  `record_outcome`, one in ten never does (a relay that died mid-call), so open decisions pile up
  until the cap or the outcome window drops them; one call in twenty is denied;
- the rest as decision-sized entries appended to the same `Sequencer` (a full decision costs a
  few hundred microseconds here, which would make a million of them a long wait).

The clock is simulated and advances 200 ms per decision (50,000 decisions span 2.8 hours), so the
sliding limit windows (10 and 30 minutes) and the outcome window (grant lifetime + 15 minutes)
really slide. What they hold is bounded by call rate x window, not by the size of the log; the
warm-up runs 40 simulated minutes of decisions (12,000), past the longest of them, so that the
samples compare steady states. The parent's durable size rides on every request as it does from
the relay (`persisted_size`): here the "parent" persists everything it was handed up to one batch
(1,024 entries) behind, so the pending-entries buffer is released as storage confirms. A
checkpoint is signed after every batch (group commit).

At 0 (after start, policy load and warm-up), 100k, 250k, 500k and 1M entries it samples the
resident set (/proc/self/statm) and the Python heap (tracemalloc, started before the core is
built; it makes the run about 4x slower), after a full garbage collection, and the sizes of the
structures that could grow: the pending-entries buffer, the compact range (O(log n) hashes),
open decisions, the token cache and the limit windows. It prints a table and the growth from
the first sample after warm-up to the last. Finally it shows that the pending buffer is bounded
even when the parent stops confirming: the sequencer refuses to append (Backpressure) at
MAX_PENDING_ENTRIES rather than grow.

Measured on the 2-core machine (one run, 1,022,202 entries in all): with tracemalloc, RSS went
from 92.0 MiB after warm-up to 92.8 MiB at +1M entries, and the Python heap from 15.8 to
16.7 MiB (16.4 MiB already at +100k; what moves is the pending buffer, 446-703 KiB). Open
decisions stayed at 480, cached tokens at 10,000, limit-window events at 6,900, and the compact
range between 8 and 15 hashes. Without tracemalloc, RSS went from 74.5 to 75.4 MiB, and it was
75.3 MiB after 3M entries.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

from cloister.dev.measure import mock_pcrs  # noqa: E402
from cloister.dev.mock_nsm import MockNsm  # noqa: E402
from cloister.enclave.bundle import read_bundle_dir  # noqa: E402
from cloister.enclave.config import load_config  # noqa: E402
from cloister.enclave.core import EnclaveCore  # noqa: E402
from cloister.enclave.sequencer import MAX_PENDING_ENTRIES, Backpressure, Sequencer  # noqa: E402
from cloister.verify.bundle import sign_bundle  # noqa: E402
from cloister.verify.entries import DecisionEntry, encode_entry  # noqa: E402
from cloister.verify.jwt import encode_jwt  # noqa: E402

MARKS = (0, 100_000, 250_000, 500_000, 1_000_000)
BATCH = 1024  # entries per "group commit": the parent confirms, a checkpoint is signed
AGENTS = 500
TOKENS = 20_000
PAGE = os.sysconf("SC_PAGE_SIZE")
STEP_MS = 200  # simulated time per decision
WARM_UP_MS = 40 * 60 * 1000  # past the 30-minute spend window and the 16-minute outcome window


class Clock:
    def __init__(self) -> None:
        self.ms = int(time.time() * 1000)

    def __call__(self) -> int:
        return self.ms


def build_core(work: Path, clock: Clock) -> tuple[EnclaveCore, list[str]]:
    issuer = ed25519.Ed25519PrivateKey.generate()
    admin = ed25519.Ed25519PrivateKey.generate()
    bundle = work / "bundle"
    (bundle / "policies").mkdir(parents=True)
    (bundle / "bundle.toml").write_text('[bundle]\nname = "bench-memory"\nmode = "enforce"\n')
    (bundle / "issuers.toml").write_text(
        '[issuers.cloister-dev]\nissuer = "cloister-dev"\naudience = "cloister"\n'
        'keys = ["issuers/cloister-dev.pem"]\nroles_claim = "roles"\nmax_lifetime_s = 86400\n'
    )
    entities = "[roles]\nbench = {}\n"
    entities += "".join(f'\n[agents.bench-{i}]\nroles = ["bench"]\nregion = "eu"\n' for i in range(AGENTS))
    entities += '\n[servers.bench]\nregion = "eu"\ntools = ["echo", "pay"]\n'
    (bundle / "entities.toml").write_text(entities)
    (bundle / "policies" / "bench.cedar").write_text(
        '@id("bench")\npermit (principal in Cloister::Role::"bench", action, resource == Cloister::Server::"bench");\n'
        '@id("bench-no-deny")\nforbid (principal, action, resource) when '
        '{ context.input has text && context.input.text like "deny*" };\n'
    )
    (bundle / "limits.toml").write_text(
        '[[limits]]\nid = "bench-rate"\nkind = "rate"\nper = "agent"\nroles = ["bench"]\nmax = "100000"\n'
        'window = "10m"\n'
        '\n[[limits]]\nid = "bench-spend"\nkind = "spend"\nper = "agent"\nroles = ["bench"]\n'
        'tools = ["bench___pay"]\ncost = "argument:amount"\nmax = "1000000000"\nwindow = "30m"\n'
    )
    (bundle / "issuers").mkdir(exist_ok=True)
    (bundle / "issuers" / "cloister-dev.pem").write_bytes(
        issuer.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    MockNsm(work / "mock-nsm", {}).root_pem()
    cfg = work / "enclave.toml"
    cfg.write_text(
        f'origin = "bench/memory"\nadmin_keys = ["'
        f'{admin.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()}"]\n'
        'trust_root = "mock:mock-nsm/root.pem"\n'
        "unsafe_unwitnessed = true\n"  # the decision path alone, in process (decision 0015)
    )
    config = load_config(cfg, mock_nsm=True)
    pcrs = mock_pcrs(config.raw)
    core = EnclaveCore(
        config,
        MockNsm(work / "mock-nsm", pcrs),
        pcrs=pcrs,
        clock_ms=clock,
        mock_nsm=True,
        log_key=ed25519.Ed25519PrivateKey.generate(),  # as if unsealed from KMS (decision 0014)
    )
    core.start_new_log()
    core.load_policy(
        sign_bundle(read_bundle_dir(bundle), 1, admin, origin=config.origin, not_after=clock.ms // 1000 + 90 * 86400)
    )
    now = clock.ms // 1000
    tokens = [
        encode_jwt(
            {
                "iss": "cloister-dev",
                "aud": "cloister",
                "sub": f"bench-{i % AGENTS}",
                "roles": ["bench"],
                "iat": now + i // AGENTS,
                "exp": now + 86_000,
            },
            issuer,
        )
        for i in range(TOKENS)
    ]
    return core, tokens


@dataclass
class Sample:
    entries: int
    seconds: float
    rss_mib: float
    heap_mib: float | None
    heap_peak_mib: float | None
    pending: int
    pending_kib: float
    compact_range: int
    open_decisions: int
    tokens_cached: int
    limit_events: int


def sample(core: EnclaveCore, t0: float, traced: bool) -> Sample:
    gc.collect()
    seq = core.sequencer
    assert seq is not None and core.policy is not None
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * PAGE
    heap = peak = None
    if traced:
        cur, pk = tracemalloc.get_traced_memory()
        heap, peak = cur / 2**20, pk / 2**20
    # Introspection of the structures that could grow with the log (private, read only).
    windows = core.policy.limits._windows
    return Sample(
        entries=seq.size,
        seconds=time.perf_counter() - t0,
        rss_mib=rss / 2**20,
        heap_mib=heap,
        heap_peak_mib=peak,
        pending=len(seq._pending),
        pending_kib=seq._pending_bytes / 1024,
        compact_range=len(seq.tree().hashes),
        open_decisions=len(core._open),
        tokens_cached=len(core.policy.tokens._items),
        limit_events=sum(len(w.events) for w in windows.values()),
    )


class Filler:
    """Decision-sized entries (what a parent would store for a call), unique per index.

    Encoding a DecisionEntry costs more than sequencing it, so one is encoded and its 32-byte
    arguments hash is replaced by the index: the same size, valid deterministic CBOR.
    """

    MARK = bytes(range(1, 33))

    def __init__(self, clock: Clock) -> None:
        self.template = encode_entry(
            DecisionEntry(
                time_ms=clock.ms,
                agent="bench-1",
                roles=("bench",),
                issuer="cloister-dev",
                server="bench",
                tool="echo",
                args_sha256=self.MARK,
                decision="allow",
                code="",
                reason="permitted by bench",
                policies=("bench",),
                policy_sha256=bytes(32),
                policy_version=1,
                request_id="0" * 32,
                grant_nonce=bytes(16),
                grant_expiry_ms=clock.ms + 60_000,
            )
        )
        self.at = self.template.index(self.MARK)

    def __call__(self, i: int) -> bytes:
        return self.template[: self.at] + i.to_bytes(32, "big") + self.template[self.at + 32 :]


def run(entries: int, authorize: int, traced: bool) -> list[Sample]:
    work = Path(tempfile.mkdtemp(prefix="cloister-bench-memory-"))
    if traced:
        tracemalloc.start()
    clock = Clock()
    try:
        core, tokens = build_core(work, clock)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seq = core.sequencer
    assert seq is not None
    persisted = seq.size  # what the "parent" has confirmed durable

    decisions = 0
    calls = 0

    def decide() -> None:
        nonlocal decisions, calls
        i = calls
        calls += 1
        clock.ms += STEP_MS
        token = tokens[i % TOKENS]
        args: dict[str, str | int]
        if i % 20 == 19:
            args, tool = {"text": f"deny-{i}"}, "echo"
        elif i % 2:
            args, tool = {"amount": 1 + i % 7}, "pay"
        else:
            args, tool = {"text": f"hello {i}"}, "echo"
        verdict = core.authorize(
            token=token,
            server="bench",
            tool=tool,
            arguments_json=json.dumps(args).encode(),
            request_id=f"{i:x}",
            persisted_size=persisted,
        )
        decisions += 1
        if verdict.allowed and i % 10 != 3:
            core.record_outcome(
                decision_index=verdict.log_index,
                result_sha256=bytes(32),
                error="",
                duration_us=100,
                paid_amount="",
                persisted_size=persisted,
            )

    # Warm-up: fill the token cache, build the policy slices, fill the limit and outcome windows.
    for _ in range(min(authorize, WARM_UP_MS // STEP_MS)):
        decide()
    persisted = seq.size
    seq.release(persisted)
    seq.checkpoint_covering(seq.size)
    t0 = time.perf_counter()
    base = seq.size
    samples = [sample(core, t0, traced)]
    print(
        f"warm-up: {decisions} decisions; sampling at {', '.join(f'{m:,}' for m in MARKS[1:] if m <= entries)} "
        f"entries (plus the {base:,} of warm-up)",
        flush=True,
    )
    warm_calls = calls
    filler = Filler(clock)
    rest = authorize - warm_calls
    total = entries
    marks = [m for m in MARKS[1:] if m <= entries]
    if not marks or marks[-1] != entries:
        marks.append(entries)
    i = 0
    while seq.size - base < total:
        # Interleave decisions evenly: one per (total / authorize) entries.
        done = seq.size - base
        while calls - warm_calls < rest * done // total:
            decide()
        seq.append(filler(i))
        i += 1
        if seq.size % BATCH == 0:
            # The parent persisted everything it was handed up to one batch ago; a checkpoint is signed.
            persisted = max(persisted, seq.size - BATCH)
            seq.release(persisted)
            seq.checkpoint_covering(seq.size)
        if marks and seq.size - base >= marks[0]:
            marks.pop(0)
            s = sample(core, t0, traced)
            samples.append(s)
            print(f"  {s.entries - base:>9,} entries after {s.seconds:6.1f}s ({decisions:,} decisions)", flush=True)
    return samples


def backpressure_check() -> int:
    """With no confirmations from the parent, the pending buffer stops at its cap: it never grows past it."""
    from cloister.verify.note import Ed25519NoteSigner

    seq = Sequencer("bench/memory", Ed25519NoteSigner("bench/memory", ed25519.Ed25519PrivateKey.generate()))
    entry = b"\xa1" + b"x" * 300
    try:
        for _ in range(MAX_PENDING_ENTRIES + 1):
            seq.append(entry)
    except Backpressure:
        return seq.size
    raise AssertionError("the sequencer kept appending past its pending-entries cap")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--authorize", type=int, default=50_000, help="how many entries are full decisions")
    p.add_argument("--no-tracemalloc", action="store_true", help="RSS only (about twice as fast)")
    args = p.parse_args(argv)
    traced = not args.no_tracemalloc
    samples = run(args.entries, args.authorize, traced)
    base = samples[0].entries
    print()
    head = (
        f"{'entries':>10} {'time s':>7} {'RSS MiB':>8} {'heap MiB':>9} {'peak MiB':>9} {'pending':>8} "
        f"{'pend KiB':>8} {'range':>6} {'open dec':>9} {'tokens':>7} {'lim ev':>7}"
    )
    print(head)
    print("-" * len(head))
    for s in samples:
        heap = f"{s.heap_mib:9.1f} {s.heap_peak_mib:9.1f}" if s.heap_mib is not None else f"{'-':>9} {'-':>9}"
        print(
            f"{s.entries - base:>10,} {s.seconds:7.1f} {s.rss_mib:8.1f} {heap} {s.pending:>8,} {s.pending_kib:8.0f} "
            f"{s.compact_range:>6} {s.open_decisions:>9,} {s.tokens_cached:>7,} {s.limit_events:>7,}"
        )
    first, last = samples[0], samples[-1]
    n = max(1, last.entries - first.entries)
    print()
    print(f"log size at the end: {last.entries:,} entries (compact range: {last.compact_range} hashes)")
    print(
        f"RSS: {first.rss_mib:.1f} MiB after warm-up, {last.rss_mib:.1f} MiB after {n:,} more entries: "
        f"{last.rss_mib - first.rss_mib:+.1f} MiB ({(last.rss_mib - first.rss_mib) * 2**20 / n:.2f} bytes/entry)"
    )
    if last.heap_mib is not None and first.heap_mib is not None:
        print(
            f"Python heap (tracemalloc): {first.heap_mib:.1f} -> {last.heap_mib:.1f} MiB "
            f"({last.heap_mib - first.heap_mib:+.1f} MiB, {(last.heap_mib - first.heap_mib) * 2**20 / n:.2f} "
            "bytes/entry)"
        )
    print(f"max RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")
    capped = backpressure_check()
    print(
        f"with no confirmations from the parent, the sequencer refuses the entry after {capped:,} pending "
        f"(MAX_PENDING_ENTRIES = {MAX_PENDING_ENTRIES:,}): the buffer is bounded either way"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
