"""CPU and latency of the relay's call to an upstream: `Upstream.call` (the MCP SDK client) against
`Upstream.call_json` (decision 0024), interleaved in the same process and minute.

    PYTHONPATH=. .venv/bin/python scripts/bench_upstream.py [--calls 300] [--rounds 7] [--uvloop]

Starts the example `refunds` upstream (--unsafe-no-grants: only the client side is measured)
over streamable HTTP in its own process, connects one `Upstream` to it as the relay does, then
alternates blocks of `--calls` `customer_lookup` calls (by `--concurrency` callers at once)
through each path. For each
block it records this process's CPU time (user + system, all threads) per call and the wall
latency of each call; it prints the median over rounds of the per-block CPU, and p50/p99 of the
latencies. The upstream's own CPU is not counted (it is the same for both paths).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from cloister.dev.state import free_port
from cloister.relay.config import UpstreamConfig
from cloister.relay.upstreams import Upstream

ARGS = {"customer_id": "cus_1001"}
META = {"dev.cloister/grant": "x" * 700, "dev.cloister/attestation": "y" * 6000}  # a grant's size on the wire


def _start_upstream(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloister.dev.examples.refunds", "--port", str(port), "--unsafe-no-grants"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the refunds upstream did not start")


def _cpu() -> float:
    return time.process_time()  # user + system, all threads of this process


async def _block(call: Callable[[], Awaitable[Any]], n: int, concurrency: int = 1) -> tuple[float, list[float]]:
    """`n` calls by `concurrency` callers at once: CPU per call, and each call's latency."""
    latencies: list[float] = []

    async def caller(count: int) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    cpu0 = _cpu()
    async with anyio.create_task_group() as tg:
        for i in range(concurrency):
            tg.start_soon(caller, n // concurrency + (1 if i < n % concurrency else 0))
    return (_cpu() - cpu0) / n, latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(port: int, calls: int, rounds: int, concurrency: int) -> None:
    upstream = Upstream(UpstreamConfig(name="refunds", url=f"http://127.0.0.1:{port}/mcp", timeout_s=30))
    paths: dict[str, Callable[[], Awaitable[Any]]] = {
        "call + model_dump": lambda: _sdk(upstream),
        "call_json": lambda: upstream.call_json("customer_lookup", ARGS, dict(META)),
    }
    async with anyio.create_task_group() as tg:
        tg.start_soon(upstream.run)
        await upstream.wait_ready(30)
        if upstream.state != "up":
            raise SystemExit(f"upstream not up: {upstream.last_error}")
        for call in paths.values():  # warm up both (the SDK lists tools on its first call)
            await _block(call, 50)
        cpu: dict[str, list[float]] = {k: [] for k in paths}
        lat: dict[str, list[float]] = {k: [] for k in paths}
        for r in range(rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                per_call, latencies = await _block(paths[name], calls, concurrency)
                cpu[name].append(per_call)
                lat[name].extend(latencies)
        upstream.stop()
    print(
        f"{rounds} interleaved rounds x {calls} calls per path by {concurrency} concurrent caller(s) "
        "(relay-side CPU of this process)"
    )
    for name in paths:
        print(
            f"  {name:18s} CPU/call median {statistics.median(cpu[name]) * 1e3:6.3f} ms "
            f"(rounds: {', '.join(f'{c * 1e3:.3f}' for c in cpu[name])}); "
            f"latency p50 {_pct(lat[name], 0.5) * 1e3:.3f} ms p99 {_pct(lat[name], 0.99) * 1e3:.3f} ms"
        )


async def _sdk(upstream: Upstream) -> dict[str, Any]:
    result = await upstream.call("customer_lookup", ARGS, dict(META))
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--concurrency", type=int, default=1, help="callers at once (the agents in flight)")
    p.add_argument("--uvloop", action="store_true", help="run the event loop on uvloop, as the relay may")
    args = p.parse_args()
    port = free_port()
    proc = _start_upstream(port)
    try:
        backend_options = {"use_uvloop": True} if args.uvloop else {}
        anyio.run(bench, port, args.calls, args.rounds, args.concurrency, backend_options=backend_options)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
