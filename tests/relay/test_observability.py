"""Metrics, traces and the call log on the relay's real call path (in process, tests/relay/test_call_path's rig)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from cloister.relay.calllog import CallLog, call_log_from_env
from cloister.relay.metrics import OTHER, LabelCap, Registry
from cloister.relay.observe import CallObserver
from cloister.relay.telemetry import Tracing, tracing_from_env
from tests.relay.test_call_path import Rig, refund_bot, research_bot, run


def samples(registry: Registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(registry.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def observed(rig: Rig, **kw: Any) -> tuple[Registry, io.StringIO]:
    registry = Registry()
    registry.attach(rig.state, rig.upstreams, None)
    stream = io.StringIO()
    clock = rig.world.clock
    call_log = CallLog(stream, clock=lambda: clock.ms / 1000, with_arguments=kw.get("args", False))
    rig.calls.observer = CallObserver(registry, kw.get("tracing"), call_log)
    rig.calls.denials = "error"  # these tests read denials as JSON-RPC errors (decision 0018's opt-out)
    return registry, stream


def test_metrics_count_calls_denials_and_phases(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        registry, _ = observed(rig)
        await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "c1"})
        await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "c2"})
        with pytest.raises(MCPError):
            await rig.call(research_bot(rig), "refunds___customer_lookup", {"customer_id": "c"})
        s = samples(registry)
        allow = (("decision", "allow"), ("server", "refunds"), ("tool", "customer_lookup"))
        deny = (("decision", "deny"), ("server", "refunds"), ("tool", "customer_lookup"))
        assert s[("cloister_calls_total", allow)] == 2
        assert s[("cloister_calls_total", deny)] == 1
        assert s[("cloister_denials_total", (("code", "no_permit"),))] == 1
        assert s[("cloister_upstream_calls_total", (("result", "ok"), ("server", "refunds")))] == 2
        phase = "cloister_call_phase_duration_seconds_count"
        assert s[(phase, (("phase", "decision"),))] == 3  # every call asked the enclave
        assert s[(phase, (("phase", "upstream"),))] == 2  # only allowed ones went upstream
        assert s[(phase, (("phase", "outcome_persist"),))] == 2
        durable = rig.state.writer.persisted_size
        assert s[("cloister_log_size_entries", (("stage", "durable"),))] == durable
        assert s[("cloister_log_size_entries", (("stage", "sequenced"),))] >= durable
        assert s[("cloister_upstream_up", (("server", "refunds"),))] == 1
        assert s[("cloister_upstream_state", (("server", "refunds"), ("state", "up")))] == 1
        assert s[("cloister_upstream_state", (("server", "refunds"), ("state", "quarantined")))] == 0

    run(tmp_path, scenario)


def test_an_agent_cannot_grow_the_metrics_without_bound(tmp_path: Path) -> None:
    # A hostile agent calls tool names it makes up: each is denied and counted, but past the cap
    # every new name counts as "_other", so the exposition stays bounded.
    async def scenario(rig: Rig) -> None:
        registry, _ = observed(rig)
        registry.calls.cap = LabelCap(limit=5)
        for i in range(12):
            with pytest.raises(MCPError):
                await rig.call(refund_bot(rig), f"refunds___made_up_{i}", {})
        series = [k for k in samples(registry) if k[0] == "cloister_calls_total"]
        assert len(series) == 6
        other = (("decision", "deny"), ("server", OTHER), ("tool", OTHER))
        assert samples(registry)[("cloister_calls_total", other)] == 7

    run(tmp_path, scenario)


def test_label_cap_cuts_long_values() -> None:
    cap = LabelCap(limit=2)
    assert cap("s", "x" * 1000) == ("s", "x" * 64)
    assert cap("a", "b") == ("a", "b")
    assert cap("c", "d") == (OTHER, OTHER)
    assert cap("s", "x" * 1000) == ("s", "x" * 64)  # known ones stay


def test_one_json_line_per_call_without_arguments(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        _, stream = observed(rig)
        result = await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "secret-c1"})
        with pytest.raises(MCPError):
            await rig.call(refund_bot(rig), 'refunds___evil\n{"decision":"allow"}', {"x": "secret-2"})
        lines = stream.getvalue().splitlines()
        assert len(lines) == 2  # a newline in a tool name stays inside its JSON string
        first, second = (json.loads(line) for line in lines)
        assert result.meta is not None
        indexes = result.meta["dev.cloister/log"]
        assert (first["agent"], first["server"], first["tool"], first["decision"]) == (
            "refund-bot",
            "refunds",
            "customer_lookup",
            "allow",
        )
        assert (first["decision_index"], first["outcome_index"]) == (indexes["decision"], indexes["outcome"])
        assert first["upstream"] == {"result": "ok", "error": ""}
        assert set(first["duration_ms"]) == {"decision", "decision_persist", "upstream", "outcome", "outcome_persist"}
        assert second["decision"] == "deny" and second["deny_code"] == "unknown_tool" and second["upstream"] is None
        assert "secret" not in stream.getvalue()  # no argument bodies unless asked

    run(tmp_path, scenario)


def test_call_log_with_arguments_when_asked(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        _, stream = observed(rig, args=True)
        await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "c-77"})
        assert json.loads(stream.getvalue())["arguments"] == '{"customer_id":"c-77"}'

    run(tmp_path, scenario)


def test_call_log_settings(tmp_path: Path) -> None:
    assert call_log_from_env({"CLOISTER_CALL_LOG": "off"}) is None
    assert call_log_from_env({}) is not None  # on by default, to stderr
    log = call_log_from_env({"CLOISTER_CALL_LOG": str(tmp_path / "calls.jsonl"), "CLOISTER_CALL_LOG_ARGUMENTS": "1"})
    assert log is not None and log.with_arguments
    log.write({"server": "s"})
    assert json.loads((tmp_path / "calls.jsonl").read_text())["server"] == "s"


def test_spans_show_the_enclave_decision_inside_the_call(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporters([exporter], env={}, install_global=False)

    async def scenario(rig: Rig) -> None:
        observed(rig, tracing=tracing)
        with tracing.tracer.start_as_current_span("tools/call refunds___customer_lookup"):
            result = await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "c1"})
        with (
            tracing.tracer.start_as_current_span("tools/call refunds___refund.approve_above_threshold"),
            pytest.raises(MCPError),
        ):
            await rig.call(refund_bot(rig), "refunds___refund.approve_above_threshold", {"refund_id": "r"})
        spans = exporter.get_finished_spans()
        parents = [s for s in spans if s.name.startswith("tools/call")]
        assert len(parents) == 2
        allowed, denied = parents
        children = [s for s in spans if s.parent is not None and s.parent.span_id == allowed.context.span_id]
        names = [s.name for s in sorted(children, key=lambda s: s.start_time or 0)]
        assert names == [
            "cloister.enclave.authorize",
            "cloister.log.persist",
            "cloister.upstream",
            "cloister.enclave.record_outcome",
            "cloister.log.persist",
        ]
        authorize = next(s for s in children if s.name == "cloister.enclave.authorize")
        assert result.meta is not None
        attrs = dict(authorize.attributes or {})
        assert attrs["cloister.log_index"] == result.meta["dev.cloister/log"]["decision"]
        assert attrs["cloister.decision"] == "allow" and attrs["cloister.policy_ids"]
        # Phases nest in time inside the call's span.
        assert all(allowed.start_time <= s.start_time <= s.end_time <= allowed.end_time for s in children)  # type: ignore[operator]
        deny_children = [s for s in spans if s.parent is not None and s.parent.span_id == denied.context.span_id]
        deny_attrs = dict(next(s for s in deny_children if s.name == "cloister.enclave.authorize").attributes or {})
        assert deny_attrs["cloister.decision"] == "deny" and deny_attrs["cloister.deny_code"] == "policy"
        assert "approvals-need-a-supervisor" in deny_attrs["cloister.policy_ids"]  # type: ignore[operator]
        assert dict(denied.attributes or {})["cloister.deny_code"] == "policy"

    run(tmp_path, scenario)
    tracing.shutdown()


def test_tracing_is_off_unless_otel_settings_ask() -> None:
    assert tracing_from_env({}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing_from_env({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}) is None
    with pytest.raises(ValueError, match="knows otlp, console"):
        tracing_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="http/protobuf"):
        tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    on = tracing_from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SERVICE_NAME": "x"}, install_global=False
    )
    assert on is not None
    on.shutdown()


def _request(path: str) -> Any:
    from starlette.requests import Request

    return Request({"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""})


def test_readyz_says_why_not_and_livez_does_not_care(tmp_path: Path) -> None:
    from cloister.relay.log_api import LogApi
    from cloister.wire import enclave_pb2 as pb

    async def scenario(rig: Rig) -> None:
        api = LogApi(rig.state, rig.upstreams)
        assert (await api.livez(_request("/livez"))).status_code == 200
        not_ready = await api.readyz(_request("/readyz"))
        assert not_ready.status_code == 503
        assert "the enclave is not running a log" in json.loads(bytes(not_ready.body))["reasons"]
        rig.state.health_info = pb.HealthResponse(ready=True, policy_version=1)
        assert (await api.readyz(_request("/readyz"))).status_code == 200
        rig.state.witness_state = pb.WitnessState(required=True, granting=False, reason="witnesses lag")
        paused = await api.readyz(_request("/readyz"))
        assert paused.status_code == 503 and "witnesses lag" in bytes(paused.body).decode()
        rig.state.witness_state = None
        api.shutting_down = lambda: True
        assert (await api.readyz(_request("/readyz"))).status_code == 503
        assert (await api.livez(_request("/livez"))).status_code == 200

    run(tmp_path, scenario)


def test_log_page_escapes_what_agents_chose(tmp_path: Path) -> None:
    # A hostile agent names a tool with markup: it is denied and logged, and the page shows it as
    # text under a CSP that would block any script anyway.
    from cloister.relay.log_api import LogApi
    from cloister.wire import enclave_pb2 as pb

    evil = '<script>alert(1)</script><img src=x onerror="fetch(1)">'

    async def scenario(rig: Rig) -> None:
        with pytest.raises(MCPError):
            await rig.call(refund_bot(rig), f"refunds___{evil}", {})
        await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "c"})
        await rig.state.writer.publish()
        info = await rig.enclave.health()
        rig.state.health_info = pb.HealthResponse(
            ready=True, policy_version=info.policy_version, log_verifier_key=info.log_verifier_key
        )
        page = await LogApi(rig.state, rig.upstreams).log_page(_request("/log/"))
        html = bytes(page.body).decode()
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        assert "<script>" not in html and 'onerror="' not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "customer_lookup" in html and "signature verified by this relay" in html

    run(tmp_path, scenario)


def test_unusable_settings_stop_the_relay_with_a_clear_error(tmp_path: Path) -> None:
    from cloister.relay.calllog import SettingError
    from cloister.verify.errors import CloisterError

    with pytest.raises(SettingError, match="cannot open it"):
        call_log_from_env({"CLOISTER_CALL_LOG": str(tmp_path / "no" / "such" / "dir" / "calls.jsonl")})
    with pytest.raises(CloisterError, match="OTEL_TRACES_EXPORTER"):
        tracing_from_env({"OTEL_TRACES_EXPORTER": "jaeger"})


def test_a_failing_sink_never_changes_the_answer(tmp_path: Path) -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise RuntimeError("sink exploded")

    class BrokenLog(CallLog):
        def write(self, record: Any, arguments: bytes = b"") -> None:
            raise RuntimeError("sink exploded")

    async def scenario(rig: Rig) -> None:
        rig.calls.observer = CallObserver(None, None, BrokenLog(Broken()))
        rig.calls.denials = "error"
        result = await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "c"})
        assert not result.is_error
        with pytest.raises(MCPError) as denied:
            await rig.call(research_bot(rig), "refunds___customer_lookup", {"customer_id": "c"})
        assert "denied" in denied.value.error.message

    run(tmp_path, scenario)


def test_log_without_slash_redirects_to_the_page(tmp_path: Path) -> None:
    from cloister.relay.log_api import LogApi

    async def scenario(rig: Rig) -> None:
        r = await LogApi(rig.state, rig.upstreams).log_redirect(_request("/log"))
        assert r.status_code == 308 and r.headers["location"] == "/log/"

    run(tmp_path, scenario)
