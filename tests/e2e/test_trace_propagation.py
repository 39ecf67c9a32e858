"""Trace context from the agent, through the relay, to the upstream, with real processes: an agent
sends `params._meta.traceparent`; the relay (tracing on, OTLP/HTTP to a real collector here) makes
its `tools/call` span a child of it, the enclave decision a child of that, and the upstream request
carries `traceparent` naming the relay's span, so the upstream's work joins the agent's trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from cloister.dev.mcp_http import mcp_http_client
from cloister.dev.state import copy_example_bundle, ensure_state, free_port
from tests.e2e.procs import start_enclave, stop, wait_for, write_relay_config
from tests.observe.otlp import running_collector

HERE = Path(__file__).parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"


def _bundle(dst: Path) -> Path:
    copy_example_bundle(dst)
    entities = (dst / "entities.toml").read_text()
    (dst / "entities.toml").write_text(
        entities.replace("[roles]\n", "[roles]\ntester = {}\n")
        + '\n[agents.test-bot]\nroles = ["tester"]\nregion = "eu"\n\n[servers.traced]\nregion = "eu"\ntools = ["echo"]\n'
    )
    (dst / "policies" / "test.cedar").write_text(
        '@id("tester-traced")\npermit (principal in Cloister::Role::"tester", action, '
        'resource == Cloister::Server::"traced");\n'
    )
    return dst


def _health(url: str) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            body: dict[str, Any] = json.loads(r.read())
            return body
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        return body
    except OSError:
        return {"ready": False, "upstreams": {}}


@pytest.mark.timeout(180)
def test_the_trace_goes_from_the_agent_through_the_enclave_decision_to_the_upstream(tmp_path: Path) -> None:
    state = ensure_state(tmp_path / "state", bundle_source=_bundle(tmp_path / "bundle"), witnessed=False)
    sock, port = tmp_path / "enclave.vsock", free_port()
    traces = tmp_path / "traces.jsonl"
    config = write_relay_config(
        tmp_path / "relay.toml",
        port=port,
        sock=sock,
        upstreams=f"""
[[upstreams]]
name = "traced"
command = [{json.dumps(sys.executable)}, "{HERE / "traced_server.py"}"]
env = {{ TRACE_FILE = "{traces}" }}
timeout_s = 10
""",
    )
    url = f"http://127.0.0.1:{port}"
    with running_collector() as collector:
        enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp_path / "enclave.log")
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            # Export each span as it ends: CI runs the suite again under libfaketime, whose shifted
            # clock never lets the batch processor's timed wait fire (real time is unaffected).
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1",
            "CLOISTER_CALL_LOG": "off",
        }
        relay = subprocess.Popen(
            [sys.executable, "-m", "cloister.cli", "relay", "--config", str(config)],
            stdout=(tmp_path / "relay.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        try:
            wait_for(lambda: relay.poll() is not None or _health(url).get("ready") is True, 60, "the relay")
            assert relay.poll() is None, (tmp_path / "relay.log").read_text()[-3000:]
            wait_for(lambda: _health(url)["upstreams"].get("traced", {}).get("state") == "up", 30, "the upstream")
            token = state.mint_token("test-bot", ["tester"], 600)

            async def call() -> None:
                http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
                async with Client(streamable_http_client(f"{url}/mcp", http_client=http), cache=None) as c:
                    meta: Any = {"traceparent": f"00-{TRACE_ID}-{AGENT_SPAN}-01"}
                    r = await c.call_tool("traced___echo", {"text": "hi"}, meta=meta)
                    assert not r.is_error

            anyio.run(call)
            deadline = time.monotonic() + 20
            spans: list[Any] = []
            while time.monotonic() < deadline:
                spans = collector.snapshot()
                names = {s.name for s in spans}
                # Every span read below: the processes export them in no particular order.
                if (
                    any(n.startswith("MCP send tools/call") for n in names)
                    and {"cloister.enclave.record_outcome", "cloister.enclave.authorize"} <= names
                    and "tools/call traced___echo" in names
                ):
                    break
                time.sleep(0.2)
        finally:
            stop(relay)
            stop(enclave)
    ours = [s for s in spans if s.trace_id.hex() == TRACE_ID]
    by_name = {s.name: s for s in ours}
    server = by_name["tools/call traced___echo"]
    assert server.parent_span_id.hex() == AGENT_SPAN  # the relay joined the agent's trace
    decision = by_name["cloister.enclave.authorize"]
    assert decision.parent_span_id == server.span_id
    send = next(s for s in ours if s.name.startswith("MCP send tools/call"))
    assert send.parent_span_id == server.span_id
    [seen] = [json.loads(line) for line in traces.read_text().splitlines()]
    # The upstream got the trace in params._meta, parented by the relay's request span.
    assert seen["traceparent"] == f"00-{TRACE_ID}-{send.span_id.hex()}-01", seen
