"""Issue 12's "done when", with real processes: `cloister up` (enclave, relay, witnesses, the
example upstreams), the demo's two agents through the official MCP client, then

- `/metrics` counts the calls the log holds, by decision;
- an OTLP/HTTP collector (a real HTTP server here) receives a trace in which the enclave's
  decision is a child of the call's `tools/call` span, and the upstream request span beside it
  carries the call's trace;
- the JSON call log has one line per call;
- `/livez` and `/readyz` answer 200;
- the `/log/` page and `cloister audit report`'s HTML open in headless chromium with no console
  message, the report verified, holding every call and denial of the demo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloister.dev.examples.demo import Transcript, run_agents, wait_up
from cloister.dev.proc import stop_group
from cloister.dev.state import free_port
from tests.observe.browser import need_browser, render, rows
from tests.observe.otlp import Collector, running_collector

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    with running_collector() as c:
        yield c


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, collector: Collector) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("observe")
    state = tmp / "state"
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        # Export each span as it ends: CI runs the suite again under libfaketime, whose shifted
        # clock never lets the batch processor's timed wait fire (real time is unaffected).
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1",
        "OTEL_SERVICE_NAME": "cloister-relay-under-test",
        "CLOISTER_CALL_LOG": str(tmp / "calls.jsonl"),
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "cloister.cli", "up", "--state", str(state), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    printed: list[bytes] = []
    assert up.stdout is not None
    reader = threading.Thread(target=lambda: printed.extend(iter(up.stdout.readline, b"")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        info = wait_up(state, up)
        tokens = {a: Path(p).read_text().strip() for a, p in info["tokens"].items()}
        t = Transcript()
        anyio.run(run_agents, info, tokens, t)
        assert not t.failures, t.failures
        info["relay"] = info["mcp_url"].removesuffix("/mcp")
        info["tmp"] = str(tmp)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(b"Press Ctrl-C" in line for line in printed):
            time.sleep(0.1)
        info["printed"] = b"".join(printed).decode(errors="replace")
        yield info
    finally:
        stop_group(up, timeout=30)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _report(demo: dict[str, Any], fmt: str, out: Path) -> subprocess.CompletedProcess[str]:
    witnesses = [a for w in demo["witnesses"] for a in ("--witness", f"{w['name']}={w['vkey']}")]
    return subprocess.run(
        [
            sys.executable, "-m", "cloister.cli", "audit", "report", "--log", demo["log_url"],
            "--trust-root", demo["trust_root"], "--expect-pcr", f"0={demo['pcr0']}", *witnesses,
            "--state", str(Path(demo["tmp"]) / "audit"), "--no-progress", "--format", fmt, "-o", str(out),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _metric(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_call_log_and_report_agree(demo: dict[str, Any]) -> None:
    report_json = Path(demo["tmp"]) / "report.json"
    r = _report(demo, "json", report_json)
    assert r.returncode == 0, r.stderr
    report = json.loads(report_json.read_text())
    assert report["verified"] and report["witnesses"] and report["checkpoint"]["size"] > 0
    calls = report["calls"]
    assert {c["tool"] for c in calls} >= {
        "customer_lookup",
        "refund.create",
        "deep_search",
        "refund.approve_above_threshold",
    }
    assert any(c["code"] == "limit" for c in calls) and any(c["payment"] for c in calls)

    status, body = _get(f"{demo['relay']}/metrics")
    assert status == 200
    by_decision: dict[str, float] = {}
    for labels, value in _metric(body.decode(), "cloister_calls_total").items():
        decision = dict(labels)["decision"]
        by_decision[decision] = by_decision.get(decision, 0) + value
    assert by_decision.get("allow") == sum(1 for c in calls if c["decision"] == "allow")
    denied = sum(1 for c in calls if c["decision"] == "deny") + sum(report["totals"]["unlogged_denials"].values())
    assert by_decision.get("deny") == denied
    denials = _metric(body.decode(), "cloister_denials_total")
    assert denials[(("code", "limit"),)] == sum(1 for c in calls if c["code"] == "limit")
    sizes = {dict(k)["stage"]: v for k, v in _metric(body.decode(), "cloister_log_size_entries").items()}
    assert sizes["durable"] >= report["checkpoint"]["size"] and "witnessed" in sizes

    lines = [json.loads(x) for x in (Path(demo["tmp"]) / "calls.jsonl").read_text().splitlines()]
    assert len(lines) == sum(by_decision.values())
    logged = {(x["decision_index"], x["tool"], x["decision"]) for x in lines}
    assert {(c["index"], c["tool"], c["decision"]) for c in calls} <= logged
    assert all(set(x["duration_ms"]) >= {"decision", "decision_persist"} for x in lines)

    assert _get(f"{demo['relay']}/livez")[0] == 200
    status, ready = _get(f"{demo['relay']}/readyz")
    assert status == 200, ready


def test_a_trace_shows_the_enclave_decision_inside_the_call(demo: dict[str, Any], collector: Collector) -> None:
    deadline = time.monotonic() + 20
    spans: list[Any] = []
    while time.monotonic() < deadline:
        spans = collector.snapshot()
        if any(s.name == "cloister.enclave.record_outcome" for s in spans):
            break
        time.sleep(0.2)
    by_id = {s.span_id: s for s in spans}
    decisions = [s for s in spans if s.name == "cloister.enclave.authorize"]
    assert decisions, sorted({s.name for s in spans})
    inside = [d for d in decisions if by_id.get(d.parent_span_id) is not None]
    assert inside, "no enclave decision span has its call's span as parent"
    call = by_id[inside[0].parent_span_id]
    assert call.name.startswith("tools/call ") and call.trace_id == inside[0].trace_id
    assert (
        call.start_time_unix_nano
        <= inside[0].start_time_unix_nano
        <= inside[0].end_time_unix_nano
        <= call.end_time_unix_nano
    )
    attrs = {a.key: a.value for a in inside[0].attributes}
    assert attrs["cloister.decision"].string_value in ("allow", "deny")
    assert attrs["cloister.log_index"].int_value >= 0
    # The upstream request is sent inside the call's span: the MCP SDK puts this span's context in
    # the upstream's params._meta (traceparent), so the upstream's own spans join the trace.
    allowed = {
        d.parent_span_id
        for d in inside
        if {a.key: a.value for a in d.attributes}["cloister.decision"].string_value == "allow"
    }
    sends = [s for s in spans if s.name.startswith("MCP send tools/call") and s.parent_span_id in allowed]
    assert sends and all(s.trace_id == by_id[s.parent_span_id].trace_id for s in sends)


def test_log_page_and_report_render_in_a_browser(demo: dict[str, Any]) -> None:
    need_browser()
    page = render(f"{demo['relay']}/log/")
    assert page.console == [], page.console
    recent = rows(page.dom, "Recent calls")
    assert recent and {r[4] for r in recent} >= {"customer_lookup", "refund.create"}
    assert "signature verified by this relay" in page.dom
    html, data = Path(demo["tmp"]) / "report.html", Path(demo["tmp"]) / "report-for-html.json"
    r = _report(demo, "html", html)
    assert r.returncode == 0, r.stderr
    assert _report(demo, "json", data).returncode == 0
    report = json.loads(data.read_text())  # no call is made meanwhile: both hold the same calls
    shown = render(html.as_uri())
    assert shown.console == [], shown.console
    assert "VERIFIED: the checkpoint and every entry below it." in shown.dom
    table = rows(shown.dom, "<h2>Calls</h2>")
    assert [int(r[0]) for r in table] == [c["index"] for c in report["calls"]]
    assert [r[5] for r in table] == [c["decision"] for c in report["calls"]]
    denied = [r for r in table if r[5] == "deny"]
    assert {r[6] for r in denied} >= {"limit", "policy"}
    assert "<svg" in shown.dom and "Denials by reason" in shown.dom


def test_up_prints_the_three_audit_commands_and_the_report_one_works(demo: dict[str, Any]) -> None:
    text = demo["printed"]
    assert f"{demo['log_url']}/  (open it in a browser" in text
    for verb in ("checkpoint", "replay", "report"):
        assert f"cloister audit {verb} --log {demo['log_url']}" in text, text
    # The printed report command, as a user would paste it (continuation lines joined).
    joined = text.replace("\\\n", " ")
    line = next(x for x in joined.splitlines() if "cloister audit report" in x)
    argv = line.split("Evidence file:", 1)[1].split()
    assert argv[:3] == ["cloister", "audit", "report"]
    out = Path(demo["tmp"]) / "printed-report.html"
    argv[argv.index("-o") + 1] = str(out)
    r = subprocess.run(
        [sys.executable, "-m", "cloister.cli", *argv[1:], "--no-progress", "--state", str(Path(demo["tmp"]) / "a2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "VERIFIED" in out.read_text() and "Witness cosignatures" in out.read_text()
