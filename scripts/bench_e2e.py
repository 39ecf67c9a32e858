"""End-to-end figures for issue 13: the same tools/call made directly to an upstream MCP server and through
relay + enclave, for 1 agent and 16 concurrent agents, with the CPU each process spent per call.

CPU per call comes from each process's own accounting (/proc/<pid>/stat utime + stime, all threads),
read before and after a run and divided by the calls made in it. Direct and governed runs alternate
(`rounds` times each), so a change in the machine's load hits both paths alike; latencies are pooled
over the rounds and calls/s is the median round.

Run through ./scripts/bench (or ./scripts/bench --only-e2e). Figures, not a test.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from bench import fmt_ms, pct, run_calls, start, stop, wait_port  # scripts/bench.py
from prometheus_client.parser import text_string_to_metric_families

_HZ = os.sysconf("SC_CLK_TCK")
# What a process of `cloister up` is, by its command line.
ROLES = (
    ("cli relay", "relay"),
    ("cloister.dev.enclave", "enclave"),
    ("cloister.enclave", "enclave"),
    ("examples.refunds", "upstream"),
    ("witness serve", "witnesses"),
)


def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, CPU seconds, command line) for every process we can read."""
    out: dict[int, tuple[int, float, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _HZ, cmd)
    return out


def cpu_by_role(roots: list[int]) -> dict[str, float]:
    """CPU seconds so far of the processes under `roots` (themselves included), summed by role."""
    table = _proc_table()
    keep = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in table.items():
            if ppid in keep and pid not in keep:
                keep.add(pid)
                grew = True
    by_role: dict[str, float] = {}
    for pid in keep:
        if pid not in table:
            continue
        _, cpu, cmd = table[pid]
        role = next((r for tag, r in ROLES if tag in cmd), None)
        if role is not None:
            by_role[role] = by_role.get(role, 0.0) + cpu
    return by_role


# The relay's own timing of each step of an allowed call (cloister_call_phase_duration_seconds).
PHASES = (
    ("decision", "decision: the enclave's Authorize, round trip"),
    ("decision_persist", "decision entry made durable"),
    ("upstream", "the upstream's tools/call"),
    ("outcome", "outcome: the enclave's RecordOutcome, round trip"),
    ("outcome_persist", "outcome entry made durable"),
)


def phase_totals(base_url: str, admin_token: str) -> dict[str, tuple[float, float]]:
    """phase -> (seconds, count) so far, from the relay's /metrics (prometheus-client's parser)."""
    request = urllib.request.Request(base_url + "/metrics", headers={"Authorization": f"Bearer {admin_token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "cloister_call_phase_duration_seconds":
            continue
        for sample in family.samples:
            phase = sample.labels.get("phase", "")
            if sample.name.endswith("_sum"):
                sums[phase] = sample.value
            elif sample.name.endswith("_count"):
                counts[phase] = sample.value
    return {phase: (sums.get(phase, 0.0), counts.get(phase, 0.0)) for phase in counts}


@dataclass
class Profile:
    """What remains, for the report: the disk's sync (back to back, paced) and, per agent count,
    each phase's (seconds, calls) summed over the governed runs."""

    sync: tuple[float, float]
    phases: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def add(self, label: str, before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> None:
        spent = self.phases.setdefault(label, {})
        for phase, (total, count) in after.items():
            was, had = before.get(phase, (0.0, 0.0)), spent.get(phase, (0.0, 0.0))
            spent[phase] = (had[0] + total - was[0], had[1] + count - was[1])


def sync_floor(directory: Path, syncs: int = 200) -> tuple[float, float]:
    """Median fdatasync of a 742-byte write (a governed call's frame) into a preallocated file on
    the log's filesystem: back to back, and with 3 ms between syncs (as at one agent's pace)."""
    path = directory / "sync-floor.tmp"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, bytes(1 << 20))
        os.fsync(fd)
        medians = []
        for pause in (0.0, 0.003):
            took = []
            for i in range(syncs):
                os.pwrite(fd, os.urandom(742), 742 * i)
                t0 = time.perf_counter()
                os.fdatasync(fd)
                took.append(time.perf_counter() - t0)
                if pause:
                    time.sleep(pause)
            medians.append(statistics.median(took))
        return medians[0], medians[1]
    finally:
        os.close(fd)
        path.unlink()


def _client_cpu() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class PathRuns:
    latencies: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    calls: int = 0

    def add(self, lat: list[float], elapsed: float, cpu: dict[str, float]) -> None:
        self.latencies += lat
        self.rps.append(len(lat) / elapsed)
        self.calls += len(lat)
        for role, seconds in cpu.items():
            self.cpu_s[role] = self.cpu_s.get(role, 0.0) + seconds

    def summary(self) -> dict[str, Any]:
        return {
            "p50": pct(self.latencies, 50),
            "p99": pct(self.latencies, 99),
            "rps": statistics.median(self.rps),
            "n": len(self.latencies),
            "cpu_us": {role: 1e6 * s / self.calls for role, s in sorted(self.cpu_s.items())},
        }


def _measured(
    roots: list[int], url: str, token: str | None, agents: int, calls: int, warm: int
) -> tuple[list[float], float, dict[str, float]]:
    before, client0 = cpu_by_role(roots), _client_cpu()
    lat, elapsed = anyio.run(run_calls, url, token, agents, calls, warm)
    after, client1 = cpu_by_role(roots), _client_cpu()
    cpu = {role: after[role] - before.get(role, 0.0) for role in after}
    # The warm-up calls ran inside the window too: charge the CPU to all calls made.
    scale = calls / (calls + warm)
    cpu = {role: seconds * scale for role, seconds in cpu.items()}
    cpu["client"] = (client1 - client0) * scale
    return lat, elapsed, cpu


def bench_end_to_end(work: Path, quick: bool) -> tuple[dict[tuple[str, str], dict[str, Any]], Profile]:
    from cloister.dev.state import copy_example_bundle, free_port

    bundle = work / "bench-bundle"
    copy_example_bundle(bundle)
    (bundle / "limits.toml").write_text("# no limits: the benchmark measures the decision path itself\n")
    state = work / "state"
    up = start(
        [sys.executable, "-m", "cloister.cli", "up", "--state", str(state), "--port", "0", "--bundle", str(bundle)],
        work / "up.log",
    )
    direct_port = free_port()
    direct = start(
        [sys.executable, "-m", "cloister.dev.examples.refunds", "--port", str(direct_port), "--unsafe-no-grants"],
        work / "direct.log",
    )
    try:
        deadline = time.monotonic() + 120
        while not (state / "up.json").exists():
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cloister up failed; see {work / 'up.log'}")
            time.sleep(0.2)
        info = json.loads((state / "up.json").read_text())
        token = Path(info["tokens"]["refund-bot"]).read_text().strip()
        admin = Path(info["admin_token_file"]).read_text().strip()
        base_url = info["mcp_url"].removesuffix("/mcp")
        profile = Profile(sync_floor(state))
        wait_port(direct_port)
        direct_url = f"http://127.0.0.1:{direct_port}/mcp"
        calls1, calls16, warm, rounds = (300, 40, 10, 1) if quick else (500, 60, 20, 3)
        runs: dict[tuple[str, str], PathRuns] = {}
        for label, agents, calls in (("1 agent", 1, calls1), ("16 agents", 16, calls16)):
            for _ in range(rounds):
                for path, url, tok, roots in (
                    ("direct", direct_url, None, [direct.pid]),
                    ("governed", info["mcp_url"], token, [up.pid]),
                ):
                    governed = path == "governed"
                    before = phase_totals(base_url, admin) if governed else {}
                    lat, elapsed, cpu = _measured(roots, url, tok, agents, calls, warm)
                    runs.setdefault((label, path), PathRuns()).add(lat, elapsed, cpu)
                    if governed:
                        profile.add(label, before, phase_totals(base_url, admin))
        return {key: r.summary() for key, r in runs.items()}, profile
    finally:
        stop(up)
        stop(direct)


def report(work: Path, quick: bool) -> None:
    r, profile = bench_end_to_end(work, quick)
    cores = os.cpu_count() or 1
    print("tools/call, direct vs through relay + enclave (customer_lookup on the refunds server; official client):")
    print(f"  {'':10} {'path':9} {'p50':>11} {'p99':>11} {'calls/s':>9}   CPU per call (us) by process")
    for label in ("1 agent", "16 agents"):
        for path in ("direct", "governed"):
            x = r[(label, path)]
            cpu = "  ".join(f"{role} {us:,.0f}" for role, us in x["cpu_us"].items())
            print(f"  {label:10} {path:9} {fmt_ms(x['p50'])} {fmt_ms(x['p99'])} {x['rps']:9.0f}   {cpu}")
    d1, g1 = r[("1 agent", "direct")], r[("1 agent", "governed")]
    d16, g16 = r[("16 agents", "direct")], r[("16 agents", "governed")]
    print(
        f"\n  added latency, 1 agent:  p50 {fmt_ms(g1['p50'] - d1['p50'])} (target <= 1 ms), "
        f"p99 {fmt_ms(g1['p99'] - d1['p99'])} (target <= 3 ms)"
    )
    print(f"  throughput, 16 agents:   governed/direct = {g16['rps'] / d16['rps']:.0%} (target >= 80%)")
    for label, g in (("1 agent", g1), ("16 agents", g16)):
        ours = g["cpu_us"].get("relay", 0.0) + g["cpu_us"].get("enclave", 0.0)
        print(f"  relay + enclave CPU per governed call, {label}: {ours:,.0f} us (target <= 500 us)")
    # The ceiling this machine allows whatever the relay and enclave do: the cores are shared by
    # the agents' client, the upstream and the witnesses, and the upstream verifies every grant.
    others = sum(us for role, us in g16["cpu_us"].items() if role not in ("relay", "enclave"))
    direct_cpu = sum(d16["cpu_us"].values())
    print(
        f"  if relay and enclave cost no CPU at all: governed/direct <= {direct_cpu / others:.0%} on this machine"
        f" (16 agents: client, upstream and witnesses {others:,.0f} us per governed call, direct {direct_cpu:,.0f} us)"
    )
    _report_profile(profile, g1)
    # What more cores would give: a model from the measured CPU per call (16 agents), not a run.
    cpu = g16["cpu_us"]
    relay, enclave = cpu.get("relay", 0.0), cpu.get("enclave", 0.0)
    rest = sum(us for role, us in cpu.items() if role not in ("relay", "enclave", "client"))
    print(
        f"\n  Model for more cores (from the 16-agent CPU per call; agents' clients on other machines):"
        f"\n    one relay process is one core under the GIL: at most {1e6 / relay:,.0f} calls/s;"
        f"\n    the enclave serializes decisions in one process: at most {1e6 / enclave:,.0f} calls/s;"
        f"\n    upstream and witnesses need {rest:,.0f} us of CPU per call elsewhere."
    )
    for total_cores in (cores, 16):
        for workers in (1, 2, 4, 8):
            if workers > total_cores:
                continue
            spare = total_cores - 1  # one core for the enclave
            ceiling = min(min(workers, spare) * 1e6 / relay, 1e6 / enclave)
            print(
                f"    {total_cores:2} cores, {workers} relay worker(s): <= {ceiling:8,.0f} calls/s"
                + ("  (relay workers are a model: the relay runs one process today)" if workers > 1 else "")
            )
    print(flush=True)


def _report_profile(profile: Profile, governed: dict[str, Any]) -> None:
    """What remains: the relay's own timing of each step of the governed calls, and the disk's sync."""
    for label in ("1 agent", "16 agents"):
        spent = profile.phases.get(label, {})
        steps = [(text, spent[phase]) for phase, text in PHASES if spent.get(phase, (0, 0))[1]]
        if not steps:
            continue
        total = sum(s / n for _, (s, n) in steps)
        print(f"\n  Where an allowed call's time goes, {label} (the relay's own timings, mean per call):")
        for text, (seconds, n) in steps:
            print(f"    {text:50} {fmt_ms(seconds / n)}  {seconds / n / total:4.0%}")
        print(f"    {'the steps together':50} {fmt_ms(total)}")
        if label == "1 agent":
            rest = governed["p50"] - total
            print(f"    {'the rest of p50 (agent HTTP in/out, client)':50} {fmt_ms(rest)}")
    back_to_back, paced = profile.sync
    print(
        "\n  fdatasync of one call's WAL frame on this disk, before the runs, nothing else running:"
        f"\n    back to back {back_to_back * 1000:.2f} ms; 3 ms apart (one agent's pace) {paced * 1000:.2f} ms."
        "\n    Each allowed call waits for two in a row (the decision, then the outcome)."
    )
