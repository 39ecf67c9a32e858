"""The sample Prometheus alerts and Grafana dashboard (deploy/monitoring/) name only metrics, and
labels, that a real relay exports: parsed here (no promtool on this machine) and checked against
the exposition of a relay's registry after real calls through its call path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from mcp.shared.exceptions import MCPError
from prometheus_client.parser import text_string_to_metric_families

from cloister.relay.metrics import Registry
from cloister.relay.observe import CallObserver
from cloister.wire import enclave_pb2 as pb
from tests.relay.test_call_path import Rig, refund_bot, research_bot, run

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
SELECTOR = re.compile(r"\b(cloister_[a-z0-9_]+)\s*(\{[^}]*\})?")
LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
DURATION = re.compile(r"^\d+[smhd]$")


def exported(tmp_path: Path) -> dict[str, set[str]]:
    """Every sample name a relay exports after an allowed, a denied and a limited call, with its label names."""
    names: dict[str, set[str]] = {}

    async def scenario(rig: Rig) -> None:
        registry = Registry()
        registry.attach(rig.state, rig.upstreams, None)
        rig.calls.observer = CallObserver(registry)
        rig.calls.denials = "error"  # the denial below as a JSON-RPC error (decision 0018's opt-out)
        rig.state.witness_state = pb.WitnessState(required=True, start_size=1, witnessed_size=1, granting=True)
        registry.proofs.reported("refunds", "verified")
        rig.state.attested_at = 1.0
        await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "c"})
        with pytest.raises(MCPError):
            await rig.call(research_bot(rig), "refunds___customer_lookup", {"customer_id": "c"})
        registry.calls.limits([pb.LimitState(limit_id="refund-bot-hourly-refunds", kind="spend", remaining="9000")])
        registry.calls.call("refunds", "customer_lookup", "unavailable")
        for family in text_string_to_metric_families(registry.exposition().decode()):
            for s in family.samples:
                names.setdefault(s.name, set()).update(s.labels)

    run(tmp_path, scenario)
    return names


def check_expr(expr: str, names: dict[str, set[str]], where: str) -> list[str]:
    problems = []
    found = SELECTOR.findall(expr)
    if not found:
        problems.append(f"{where}: names no cloister metric: {expr}")
    for metric, selector in found:
        if metric not in names:
            problems.append(f"{where}: {metric} is not exported")
            continue
        for label in LABEL.findall(selector or ""):
            if label not in names[metric] | {"instance", "job"}:
                problems.append(f"{where}: {metric} has no label {label!r}")
    return problems


def test_alerts_and_dashboard_use_exported_metrics(tmp_path: Path) -> None:
    names = exported(tmp_path)
    problems: list[str] = []
    alerts = yaml.safe_load((MONITORING / "cloister-alerts.yml").read_text("utf-8"))
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    assert len(rules) >= 10
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
        assert DURATION.match(rule.get("for", "0s")), rule
        problems += check_expr(rule["expr"], names, f"alert {rule['alert']}")
    dashboard = json.loads((MONITORING / "cloister-dashboard.json").read_text("utf-8"))
    targets = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    assert len(targets) >= 12
    for title, expr in targets:
        problems += check_expr(expr, names, f"panel {title!r}")
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            problems += check_expr(var["query"], names, f"variable {var['name']}")
    assert not problems, "\n".join(problems)
    # The ones operators need most are all there.
    wanted = {
        "cloister_calls_total",
        "cloister_denials_total",
        "cloister_call_phase_duration_seconds_bucket",
        "cloister_log_size_entries",
        "cloister_log_publication_lag_entries",
        "cloister_log_witness_lag_entries",
        "cloister_upstream_up",
        "cloister_upstream_proof_age_seconds",
        "cloister_limit_remaining",
    }
    assert wanted <= set(names), wanted - set(names)
    assert {"phase"} <= names["cloister_call_phase_duration_seconds_bucket"]


def test_the_checker_catches_a_wrong_name_or_label() -> None:
    names = {"cloister_calls_total": {"server", "tool", "decision"}}
    assert check_expr('rate(cloister_calls_total{decision="deny"}[5m])', names, "x") == []
    assert check_expr("cloister_call_total", names, "x") == ["x: cloister_call_total is not exported"]
    assert check_expr('cloister_calls_total{verdict="deny"}', names, "x") == [
        "x: cloister_calls_total has no label 'verdict'"
    ]
