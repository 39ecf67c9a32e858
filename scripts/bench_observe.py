"""Observability figures for scripts/bench.py (issue 12, decision 0020).

1. In process: what one call's report costs the relay (cloister.relay.observe.CallObserver), from
   nothing at all to metrics, the JSON call log and spans, on a real decision and outcome.
   Tracing off must cost nothing beyond an attribute test.
2. End to end (three `cloister up --unsafe-unwitnessed` at once, refund-bot's customer_lookup,
   one call to each in turn): the governed call's p50/p99 with the defaults (metrics and the call
   log), with the call log off, and with tracing on (OTLP/HTTP to a local collector that drops).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
from bench import pct, stop  # scripts/bench.py


def _verdicts() -> tuple[Any, Any]:
    from cloister.wire import enclave_pb2 as pb

    verdict = pb.AuthorizeResponse(
        decision=pb.ALLOW,
        reason="permitted by refund-agent-tools",
        policy_ids=["refund-agent-tools"],
        log_index=41,
        agent="refund-bot",
        log=pb.LogAppend(first_index=41, entries=[b"x" * 300]),
    )
    outcome = pb.OutcomeResponse(log_index=42, log=pb.LogAppend(first_index=42, entries=[b"y" * 200]))
    return verdict, outcome


def bench_in_process(quick: bool) -> list[tuple[str, float]]:
    import mcp_types as types
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from cloister.relay.calllog import CallLog
    from cloister.relay.metrics import Registry
    from cloister.relay.observe import CallObserver
    from cloister.relay.telemetry import Tracing

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", "1000000")  # measure the cost, not dropped spans
    verdict, outcome = _verdicts()
    result = types.CallToolResult(content=[types.TextContent(text="ok")])
    marks = [0.0, 0.0004, 0.0009, 0.0019, 0.0022, 0.0027]
    with Path(os.devnull).open("w") as devnull:
        tracing = Tracing.with_exporters([Drop()], env={}, install_global=False)
        setups = [
            ("no sinks (tracing off, no metrics, no call log)", CallObserver()),
            ("metrics only", CallObserver(Registry())),
            ("metrics + call log (the default)", CallObserver(Registry(), None, CallLog(devnull))),
            ("metrics + call log + spans (batched, dropped)", CallObserver(Registry(), tracing, CallLog(devnull))),
        ]
        n = 5_000 if quick else 20_000
        rows = []
        for name, observer in setups:
            for _ in range(200):  # warm up
                observer.completed("refunds", "customer_lookup", verdict, marks, b"{}", outcome, result, None)
            t0 = time.perf_counter()
            for _ in range(n):
                observer.completed("refunds", "customer_lookup", verdict, marks, b"{}", outcome, result, None)
            rows.append((name, (time.perf_counter() - t0) / n))
        tracing.shutdown()
    return rows


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _up(work: Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    from cloister.dev.state import copy_example_bundle

    bundle = work / f"{name}-bundle"
    copy_example_bundle(bundle)
    (bundle / "limits.toml").write_text("# no limits: the benchmark measures the call path itself\n")
    state = work / f"{name}-state"
    argv = [sys.executable, "-m", "cloister.cli", "up", "--state", str(state), "--port", "0"]
    argv += ["--bundle", str(bundle), "--unsafe-unwitnessed"]
    log = (work / f"{name}-up.log").open("ab")
    up = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env})
    deadline = time.monotonic() + 120
    while not (state / "up.json").exists():
        if up.poll() is not None or time.monotonic() > deadline:
            stop(up)
            raise RuntimeError(f"cloister up ({name}) failed; see {work / f'{name}-up.log'}")
        time.sleep(0.2)
    return up, json.loads((state / "up.json").read_text())


async def _interleaved(urls: dict[str, tuple[str, str]], calls: int, warmup: int) -> dict[str, list[float]]:
    """One client per variant; calls go round-robin across them, so load drifting on a shared
    machine slows each variant alike."""
    from contextlib import AsyncExitStack

    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from cloister.dev.mcp_http import mcp_http_client

    latencies: dict[str, list[float]] = {name: [] for name in urls}
    async with AsyncExitStack() as stack:
        clients = {}
        for name, (url, token) in urls.items():
            http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
            clients[name] = await stack.enter_async_context(
                Client(streamable_http_client(url, http_client=http), cache=None)
            )
        for i in range(warmup + calls):
            for name, c in clients.items():
                t0 = time.perf_counter()
                r = await c.call_tool("refunds___customer_lookup", {"customer_id": "cus_1001"})
                if i >= warmup:
                    latencies[name].append(time.perf_counter() - t0)
                assert not r.is_error
    return latencies


def bench_end_to_end(work: Path, quick: bool) -> dict[str, dict[str, float]]:
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    calls, warm = (200, 20) if quick else (600, 30)
    variants = {
        "defaults (metrics, call log)": {"CLOISTER_CALL_LOG": str(work / "calls.jsonl")},
        "call log off": {"CLOISTER_CALL_LOG": "off"},
        "tracing on (OTLP)": {"CLOISTER_CALL_LOG": "off", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint},
    }
    ups: list[subprocess.Popen[bytes]] = []
    try:
        urls = {}
        for i, (name, env) in enumerate(variants.items()):
            up, info = _up(work, f"v{i}", env)
            ups.append(up)
            urls[name] = (info["mcp_url"], Path(info["tokens"]["refund-bot"]).read_text().strip())
        lat = anyio.run(_interleaved, urls, calls, warm)
    finally:
        for up in ups:
            stop(up)
        sink.shutdown()
    return {name: {"p50": pct(v, 50), "p99": pct(v, 99)} for name, v in lat.items()}


def report(work: Path, quick: bool, *, e2e: bool = True) -> None:
    print("Observability (decision 0020): what one call's report costs the relay, in process:")
    for name, seconds in bench_in_process(quick):
        print(f"  {name:48} {seconds * 1e6:7.1f} us per call")
    if e2e:
        r = bench_end_to_end(work, quick)
        print("  governed customer_lookup, 1 agent, three cloister up --unsafe-unwitnessed, calls interleaved:")
        for name, x in r.items():
            print(f"    {name:30} p50 {x['p50'] * 1000:6.2f} ms  p99 {x['p99'] * 1000:6.2f} ms")
    print(flush=True)


if __name__ == "__main__":
    import tempfile

    report(
        Path(tempfile.mkdtemp(prefix="cloister-bench-observe-")), "--quick" in sys.argv, e2e="--no-e2e" not in sys.argv
    )
