"""The relay<->enclave channel's cost (issue 13, decision 0022): figures, not a test.

One enclave process (mock NSM) per bridge mode, each driven from this process by the relay's own
`EnclaveClient`: a governed call's two enclave round trips (Authorize, then RecordOutcome for the
allowed decision), by `--agents` concurrent callers, over
  - the unary RPCs or the Channel stream, and
  - bridge `direct` (gRPC on the AF_UNIX socket itself, mock mode/CI), `splice` and `copy` (a Python
    bridge at both ends, as on Nitro, with AF_UNIX standing in for vsock).
Runs are interleaved (every combination once per round, the order rotating) and the medians of
the rounds are reported: calls/s, and CPU per call (two round trips) of this process (the relay's
client side) and of the enclave process, from their own accounting (/proc/<pid>/stat).

    PYTHONPATH=. python scripts/bench_channel.py [--rounds 5] [--calls 600] [--agents 1,16]
        [--modes direct,splice,copy] [--channels unary,stream] [--switch-intervals auto,0.005]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cloister.dev.state import DevState, ensure_state  # noqa: E402
from cloister.relay.enclave_client import EnclaveClient  # noqa: E402
from cloister.wire import enclave_pb2 as pb  # noqa: E402
from cloister.wire.bridge import Endpoint, choose_mode, set_switch_interval  # noqa: E402
from tests.e2e.procs import start_enclave, stop, unseal  # noqa: E402
from tests.world import decision_bundle  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
MODES = ("direct", "splice", "copy")


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Enclave:
    mode: str
    interval: str  # the GIL switch interval of both processes: "auto" (set_switch_interval) or seconds
    state: DevState
    proc: subprocess.Popen[bytes]
    sock: Path

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.interval}"

    def apply_interval(self) -> None:
        """This (the relay's) process's switch interval as the relay would set it for this run."""
        sys.setswitchinterval(DEFAULT_INTERVAL)
        with_env = {"CLOISTER_SWITCH_INTERVAL": self.interval} if self.interval != "auto" else {}
        saved = os.environ.pop("CLOISTER_SWITCH_INTERVAL", None)
        os.environ.update(with_env)
        try:
            set_switch_interval(choose_mode(Endpoint.parse(f"unix:{self.sock}"), self.mode))
        finally:
            os.environ.pop("CLOISTER_SWITCH_INTERVAL", None)
            if saved is not None:
                os.environ["CLOISTER_SWITCH_INTERVAL"] = saved


DEFAULT_INTERVAL = sys.getswitchinterval()


def start(work: Path, mode: str, interval: str) -> Enclave:
    name = f"{mode}-{interval}"
    bundle = decision_bundle(work / f"{name}-bundle")  # the example's, without server identities
    (bundle / "limits.toml").write_text("# no limits: the benchmark measures the channel\n")
    state = ensure_state(work / f"{name}-state", bundle_source=bundle, witnessed=False)
    sock = work / f"{name}.sock"
    env = {"CLOISTER_BRIDGE": mode}
    if interval != "auto":
        env["CLOISTER_SWITCH_INTERVAL"] = interval
    os.environ.update(env)
    try:
        proc, ready = start_enclave(state.root, f"unix:{sock}", log=work / f"{name}-enclave.log")
    finally:
        for k in env:
            del os.environ[k]
    assert ready["bridge"] == mode, ready
    return Enclave(mode, interval, state, proc, sock)


async def prepare(e: Enclave, work: Path) -> None:
    async with EnclaveClient(f"unix:{e.sock}", work / f"{e.name}-run", bridge=e.mode) as client:
        health = await client.health()
        await unseal(client, e.state.root, health.origin, first_start=True)
        await client.start_log(None)
        await client.load_policy(e.state.signed_bundle.read_bytes(), 1)


async def run(e: Enclave, work: Path, *, stream: bool, calls: int, agents: int) -> tuple[float, float, float]:
    """calls/s, relay-side CPU ms per call, enclave CPU ms per call (a call: two round trips)."""
    token = e.state.mint_token("refund-bot", ["refund-agent"])
    args = json.dumps({"customer_id": "cus_1001"}).encode()
    persisted = 0  # the benchmark "persists" everything it is handed, as the relay would

    e.apply_interval()
    async with EnclaveClient(f"unix:{e.sock}", work / f"{e.name}-run", bridge=e.mode, stream=stream) as client:

        async def one() -> None:
            nonlocal persisted
            v = await client.authorize(
                pb.AuthorizeRequest(
                    token=token,
                    server="refunds",
                    tool="customer_lookup",
                    arguments_json=args,
                    persisted_size=persisted,
                )
            )
            assert v.decision == pb.ALLOW, v.reason
            persisted = max(persisted, v.log.first_index + len(v.log.entries))
            o = await client.record_outcome(
                pb.OutcomeRequest(decision_index=v.log_index, result_sha256=b"\x00" * 32, persisted_size=persisted)
            )
            persisted = max(persisted, o.log.first_index + len(o.log.entries))

        async def agent(n: int) -> None:
            for _ in range(n):
                await one()

        for _ in range(20):  # warm up: the stream, the token cache
            await one()
        per = calls // agents
        c0, e0, t0 = time.process_time(), cpu_s(e.proc.pid), time.perf_counter()
        await asyncio.gather(*(agent(per) for _ in range(agents)))
        t1, c1, e1 = time.perf_counter(), time.process_time(), cpu_s(e.proc.pid)
    n = per * agents
    return n / (t1 - t0), (c1 - c0) * 1000 / n, (e1 - e0) * 1000 / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=600, help="governed calls (two round trips each) per run")
    p.add_argument("--agents", default="1,16", help="concurrent callers, comma-separated")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument(
        "--switch-intervals",
        default="auto",
        help="GIL switch intervals to compare, both processes: auto (what the code sets) or seconds",
    )
    p.add_argument("--channels", default="unary,stream")
    a = p.parse_args()
    modes = a.modes.split(",")
    agent_counts = [int(x) for x in a.agents.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-channel-"))
    enclaves = [start(work, m, i) for m in modes for i in a.switch_intervals.split(",")]
    streams = [c == "stream" for c in a.channels.split(",")]
    results: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}

    async def rounds() -> None:  # one event loop for all: grpc.aio binds its poller to the first
        for e in enclaves:
            await prepare(e, work)
        combos = [(e, s, n) for n in agent_counts for e in enclaves for s in streams]
        for r in range(a.rounds):
            shift = r % len(combos)
            for e, stream, agents in combos[shift:] + combos[:shift]:
                got = await run(e, work, stream=stream, calls=a.calls, agents=agents)
                results.setdefault((e.name, "stream" if stream else "unary", agents), []).append(got)
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

    try:
        asyncio.run(rounds())
    finally:
        for e in enclaves:
            stop(e.proc)
    what = f"{a.rounds} interleaved rounds x {a.calls} calls (authorize + record_outcome)"
    print(f"# {what}, medians; {os.cpu_count()} cores")
    print(f"{'bridge-GIL':14} {'channel':8} {'agents':>6} {'calls/s':>8} {'relay ms/call':>14} {'enclave ms/call':>16}")
    for (mode, channel, agents), rows in sorted(results.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        print(f"{mode:14} {channel:8} {agents:6d} {med[0]:8.0f} {med[1]:14.3f} {med[2]:16.3f}")


if __name__ == "__main__":
    main()
