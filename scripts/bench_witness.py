"""Witnessing figures for scripts/bench.py (issue 10, decision 0015).

1. A governed call's latency with the default witnessing (two local witnesses, quorum 2) against
   `cloister up --unsafe-unwitnessed`, and with `--wait-for-witness` (refunds calls forwarded only
   once their decision is cosigned): three stacks up at once, one agent calling them in turn, so a
   busy machine slows every mode alike; then the unwitnessed lag (log size minus witnessed size, as
   the relay's /healthz reports it every 20 ms) under 16 concurrent agents.
2. `cloister witness serve` alone: add-checkpoint requests per second, one relay submitting
   checkpoints of a growing log (each with its consistency proof), sequentially.
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
from bench import pct, run_calls, start, stop, wait_port  # scripts/bench.py


def _up(work: Path, name: str, flags: list[str]) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    from cloister.dev.state import copy_example_bundle

    bundle = work / f"{name}-bundle"
    copy_example_bundle(bundle)
    (bundle / "limits.toml").write_text("# no limits: the benchmark measures the decision path itself\n")
    state = work / f"{name}-state"
    argv = [sys.executable, "-m", "cloister.cli", "up", "--state", str(state), "--port", "0", "--bundle", str(bundle)]
    up = start(
        [*argv, *flags],
        work / f"{name}-up.log",
    )
    deadline = time.monotonic() + 120
    while not (state / "up.json").exists():
        if up.poll() is not None or time.monotonic() > deadline:
            stop(up)
            raise RuntimeError(f"cloister up {' '.join(flags)} failed; see {work / f'{name}-up.log'}")
        time.sleep(0.2)
    return up, json.loads((state / "up.json").read_text())


class LagSampler:
    """Polls the relay's /healthz: how far the log runs ahead of its witnessed size."""

    def __init__(self, relay: str) -> None:
        self.relay = relay
        self.lags: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LagSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                with urllib.request.urlopen(f"{self.relay}/healthz", timeout=2) as r:
                    h = json.loads(r.read())
            except OSError:
                continue
            gate = h.get("witness_gate") or {}
            if "witnessed_size" in gate:
                self.lags.append(max(0, h["log_size"] - gate["witnessed_size"]))


async def interleaved(targets: dict[str, tuple[str, str]], calls: int, warmup: int) -> dict[str, list[float]]:
    """One agent per stack, calling them in turn (A, B, C, A, B, C, ...): whatever else loads the
    machine loads every mode alike, so their difference is the mode's, not the moment's."""
    from contextlib import AsyncExitStack

    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from cloister.dev.mcp_http import mcp_http_client

    latencies: dict[str, list[float]] = {name: [] for name in targets}
    async with AsyncExitStack() as stack:
        clients = {}
        for name, (url, token) in targets.items():
            http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
            clients[name] = await stack.enter_async_context(
                Client(streamable_http_client(url, http_client=http), cache=None)
            )
        for i in range(warmup + calls):
            for name, client in clients.items():
                t0 = time.perf_counter()
                r = await client.call_tool("refunds___customer_lookup", {"customer_id": "cus_1001"})
                if i >= warmup:
                    latencies[name].append(time.perf_counter() - t0)
                if r.is_error:
                    raise RuntimeError(f"{name}: {r}")
    return latencies


MODES = (
    ("unwitnessed", ["--unsafe-unwitnessed"]),
    ("witnessed", []),
    ("wait-for-witness", ["--wait-for-witness"]),
)


def bench_witnessed_calls(work: Path, quick: bool) -> dict[str, Any]:
    calls1, calls16, warm = (200, 40, 20) if quick else (600, 120, 30)
    out: dict[str, Any] = {}
    stacks: dict[str, tuple[subprocess.Popen[bytes], dict[str, Any]]] = {}
    try:
        for name, flags in MODES:  # all three up at once, so their calls can be interleaved
            stacks[name] = _up(work, name, flags)
        targets = {
            name: (info["mcp_url"], Path(info["tokens"]["refund-bot"]).read_text().strip())
            for name, (_proc, info) in stacks.items()
        }
        for name, lat in anyio.run(interleaved, targets, calls1, warm).items():
            out[name] = {"p50": pct(lat, 50), "p99": pct(lat, 99), "rps": len(lat) / sum(lat)}
        url, token = targets["witnessed"]
        with LagSampler(url.removesuffix("/mcp")) as sampler:
            lat16, elapsed16 = anyio.run(run_calls, url, token, 16, calls16, warm)
        row = out["witnessed"]
        row["rps16"] = len(lat16) / elapsed16
        row["lag_p50"] = pct([float(x) for x in sampler.lags], 50) if sampler.lags else float("nan")
        row["lag_max"] = max(sampler.lags, default=0)
        row["lag_samples"] = len(sampler.lags)
    finally:
        for proc, _info in stacks.values():
            stop(proc)
    return out


def bench_witness_server(work: Path, quick: bool) -> dict[str, float]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cloister.dev.state import free_port
    from cloister.verify.checkpoint import Checkpoint
    from cloister.verify.merkle import CompactRange, consistency_proof, leaf_hash, node_hash
    from cloister.verify.note import Ed25519NoteSigner, sign_note
    from cloister.witness.state import init_state

    origin = "bench.cloister/log"
    signer = Ed25519NoteSigner(origin, Ed25519PrivateKey.generate())
    directory = work / "witness"
    init_state(directory, "bench.cloister/witness")
    logs = work / "witness-logs.toml"
    logs.write_text(f'[[log]]\norigin = "{origin}"\nvkeys = ["{signer.vkey}"]\n')
    port = free_port()
    serve = [sys.executable, "-m", "cloister.cli", "witness", "serve", "--state", str(directory)]
    proc = start(
        [*serve, "--listen", f"127.0.0.1:{port}", "--logs", str(logs)],
        work / "witness.log",
    )
    checkpoints, step = (300, 16) if quick else (1000, 16)
    leaves = [leaf_hash(b"entry %d" % i) for i in range(checkpoints * step)]
    levels = [leaves]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        levels.append([node_hash(prev[i], prev[i + 1]) for i in range(0, len(prev) - 1, 2)])

    def node(level: int, index: int) -> bytes:
        return levels[level][index]

    bodies = []
    tree = CompactRange.empty()
    for k in range(1, checkpoints + 1):
        for h in leaves[(k - 1) * step : k * step]:
            tree.append(h)
        note = sign_note(Checkpoint(origin, tree.size, tree.root()).to_text(), [signer])
        old = (k - 1) * step
        proof = consistency_proof(old, tree.size, node) if old else []
        bodies.append(b"old %d\n" % old + b"".join(base64.b64encode(h) + b"\n" for h in proof) + b"\n" + note)
    try:
        wait_port(port)
        latencies = []
        t_all = time.perf_counter()
        for body in bodies:
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/add-checkpoint", body=body)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status != 200:
                raise RuntimeError(f"the witness answered {resp.status}")
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - t_all
    finally:
        stop(proc)
    return {"per_s": len(bodies) / elapsed, "p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000}


def report(work: Path, quick: bool) -> None:
    r = bench_witnessed_calls(work, quick)
    print("Witnessing (decision 0015), tools/call through relay + enclave, 1 agent per stack, calls interleaved:")
    print(f"  {'mode':18} {'p50':>9} {'p99':>9} {'1/mean':>8}")
    for name in ("unwitnessed", "witnessed", "wait-for-witness"):
        x = r[name]
        print(f"  {name:18} {x['p50'] * 1000:6.2f} ms {x['p99'] * 1000:6.2f} ms {x['rps']:8.0f}")
    w, u, wait = r["witnessed"], r["unwitnessed"], r["wait-for-witness"]
    print(
        f"  witnessing adds {1000 * (w['p50'] - u['p50']):+.2f} ms to p50 (default mode); "
        f"waiting for the witnesses adds {1000 * (wait['p50'] - w['p50']):+.2f} ms"
    )
    print(
        f"  16 agents, witnessed: {w['rps16']:.0f} calls/s; unwitnessed lag p50 {w['lag_p50']:.0f} entries, "
        f"max {w['lag_max']} ({w['lag_samples']} samples of /healthz; the enclave pauses at 1,000)",
        flush=True,
    )
    s = bench_witness_server(work, quick)
    print(
        f"  `cloister witness serve`: {s['per_s']:.0f} add-checkpoint/s sequentially "
        f"(p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms per checkpoint, 16 entries apart)\n",
        flush=True,
    )
