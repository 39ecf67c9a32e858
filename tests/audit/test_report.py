"""`cloister audit report` and `replay --json`'s per-call records, on a real log (tests/audit/logbuilder)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from cloister.audit.calls import collect
from cloister.audit.report import CSV_COLUMNS, read_verified_entries
from cloister.audit.source import DirSource, SourceSpec
from cloister.verify.entries import DecisionEntry, Entry, OutcomeEntry, PolicyEntry, parse_entry
from cloister.verify.errors import VerificationError
from cloister.verify.merkle import leaf_hash, root_from_leaf_hashes
from tests.audit.clirun import cli
from tests.audit.conftest import trust
from tests.audit.logbuilder import LogServer, TestLog


def _decisions(log: TestLog) -> list[tuple[int, DecisionEntry]]:
    return [(i, e) for i, e in ((i, parse_entry(d)) for i, d in enumerate(log.entries)) if isinstance(e, DecisionEntry)]


def test_json_report_holds_every_call_with_its_outcome(built: TestLog, tmp_path: Path) -> None:
    r = cli("audit", "report", "--log", str(built.dir), *trust(built, tmp_path), "--no-progress", "--format", "json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verified"] is True and report["problems"] == []
    decisions = _decisions(built)
    assert [c["index"] for c in report["calls"]] == [i for i, _ in decisions]
    entries = [parse_entry(d) for d in built.entries]
    outcomes = {e.decision_index: (i, e) for i, e in enumerate(entries) if isinstance(e, OutcomeEntry)}
    for call, (i, d) in zip(report["calls"], decisions, strict=True):
        assert (call["agent"], call["server"], call["tool"], call["decision"]) == (
            d.agent,
            d.server,
            d.tool,
            d.decision,
        )
        assert call["time"].endswith("Z") and call["time"].startswith("20")
        if i in outcomes:
            assert call["outcome_index"] == outcomes[i][0]
            assert call["outcome"] == ("error" if outcomes[i][1].error else "ok")
        else:
            assert call["outcome_index"] is None
    reasons = Counter((d.code, d.reason) for _, d in decisions if d.decision == "deny")
    assert {(x["code"], x["reason"]): x["count"] for x in report["denials_by_reason"]} == dict(reasons)
    policies = [(i, e) for i, e in enumerate(entries) if isinstance(e, PolicyEntry)]
    assert [(p["index"], p["version"], p["signer"]) for p in report["policy_versions"]] == [
        (i, e.version, e.signer) for i, e in policies
    ]
    assert all(k["verified"] for k in report["key_introductions"]) and len(report["key_introductions"]) == 2
    paid: dict[str, Decimal] = {}
    for i, d in decisions:
        if i in outcomes and outcomes[i][1].paid:
            paid[d.agent] = paid.get(d.agent, Decimal(0)) + Decimal(outcomes[i][1].paid)
    assert {a: Decimal(v) for a, v in report["payments_by_agent"].items()} == paid
    assert "taken_on_trust" in report["statement"] and report["checkpoint"]["size"] == len(built.entries)


def test_csv_and_html_reports(built: TestLog, tmp_path: Path) -> None:
    out = tmp_path / "calls.csv"
    r = cli(
        "audit",
        "report",
        "--log",
        str(built.dir),
        *trust(built, tmp_path),
        "--no-progress",
        "--format",
        "csv",
        "-o",
        str(out),
    )
    assert r.code == 0, r.err
    rows = list(csv.DictReader(io.StringIO(out.read_text("utf-8"))))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [int(row["index"]) for row in rows] == [i for i, _ in _decisions(built)]
    html = tmp_path / "report.html"
    r = cli("audit", "report", "--log", str(built.dir), *trust(built, tmp_path), "--no-progress", "-o", str(html))
    assert r.code == 0, r.err
    text = html.read_text("utf-8")
    assert "VERIFIED" in text and "<svg" in text and "<script" not in text
    assert "Content-Security-Policy" in text and "http://" not in text.split("<body>")[0].replace(
        "http://www.w3.org", ""
    )
    assert text.count("<tr") >= len(rows) + 1


def test_report_time_window(built: TestLog, tmp_path: Path) -> None:
    decisions = _decisions(built)
    middle = decisions[len(decisions) // 2][1].time_ms
    from cloister.audit.calls import iso

    r = cli(
        "audit",
        "report",
        "--log",
        str(built.dir),
        *trust(built, tmp_path),
        "--no-progress",
        "--format",
        "json",
        "--from",
        iso(middle),
    )
    assert r.code == 0, r.err
    calls = json.loads(r.out)["calls"]
    assert calls and all(c["time"] >= iso(middle) for c in calls)
    assert len(calls) == sum(1 for _, d in decisions if d.time_ms >= middle)
    bad = cli("audit", "report", "--log", str(built.dir), *trust(built, tmp_path), "--from", "yesterday")
    assert bad.code == 2 and "ISO 8601" in bad.err


def test_report_over_http_links_receipts(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    r = cli("audit", "report", "--log", server.url, *trust(built, tmp_path), "--no-progress", "--format", "json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    first = report["calls"][0]
    assert first["receipt"].startswith(server.url.rstrip("/")) and f"index={first['index']}" in first["receipt"]
    assert "attested by the running enclave" in report["checkpoint"]["how"]


def test_a_tampered_log_gives_a_report_that_says_not_verified(built: TestLog, log_copy: Path, tmp_path: Path) -> None:
    # Storage swaps one entry bundle's bytes: the replay fails and the report says so (exit 1).
    bundle = log_copy / "tile" / "entries" / "000"
    data = bytearray(bundle.read_bytes())
    data[40] ^= 1
    bundle.write_bytes(bytes(data))
    out = tmp_path / "r.html"
    r = cli("audit", "report", "--log", str(log_copy), *trust(built, tmp_path), "--no-progress", "-o", str(out))
    assert r.code == 1
    text = out.read_text("utf-8")
    assert "NOT VERIFIED" in text and "VERIFICATION FAILED" in text


class _Flipping(DirSource):
    """A source that answers the report's second read differently from the replay's first."""

    def read(self, path: str, *, max_size: int) -> bytes:
        data = super().read(path, max_size=max_size)
        if path.startswith("tile/entries/"):
            entries = bytearray(data)
            entries[-1] ^= 1
            return bytes(entries)
        return data


def test_entries_read_again_must_hash_to_the_verified_root(built: TestLog, log_copy: Path) -> None:
    root = root_from_leaf_hashes([leaf_hash(e) for e in built.entries])
    honest = read_verified_entries(DirSource(SourceSpec(str(log_copy))), len(built.entries), root)
    assert len(honest) == len(built.entries)
    with pytest.raises(VerificationError, match="do not hash to the verified checkpoint"):
        read_verified_entries(_Flipping(SourceSpec(str(log_copy))), len(built.entries), root)


def test_replay_json_exports_calls_with_iso_times(built: TestLog, tmp_path: Path) -> None:
    r = cli("audit", "replay", "--log", str(built.dir), *trust(built, tmp_path), "--no-progress", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert [c["index"] for c in out["calls"]] == [i for i, _ in _decisions(built)]
    assert all(c["time"].endswith("Z") for c in out["calls"])
    r = cli(
        "audit", "replay", "--log", str(built.dir), *trust(built, tmp_path), "--no-progress", "--json", "--no-calls"
    )
    assert "calls" not in json.loads(r.out)


def test_csv_cells_an_agent_chose_cannot_become_formulas(tmp_path: Path) -> None:
    from cloister.audit.report import render_csv

    report = {"calls": [{"index": 1, "tool": '=HYPERLINK("http://x")', "agent": "+cmd", "reason": "-1"}]}
    row = next(csv.DictReader(io.StringIO(render_csv(report))))
    assert row["tool"].startswith("'=") and row["agent"] == "'+cmd" and row["reason"] == "'-1"


def test_collect_pairs_outcomes_and_skips_nothing_silently(built: TestLog) -> None:
    items: list[tuple[int, Entry | None]] = [(i, parse_entry(d)) for i, d in enumerate(built.entries)]
    items.insert(3, (999_999, None))  # an entry that did not parse is reported
    facts = collect(items)
    assert facts.unreadable == [999_999] and facts.entries == len(built.entries) + 1


def test_html_report_shows_hostile_names_as_text_in_a_browser(tmp_path: Path) -> None:
    from cloister.audit.calls import CallRecord, LogFacts
    from cloister.audit.report import ReportInput, build_report, render_html
    from tests.observe.browser import render, rows

    evil = '</td></tr></table><script>console.error("owned")</script><img src="http://127.0.0.1:9/x">'
    facts = LogFacts()
    facts.calls.append(
        CallRecord(
            index=7, time="2026-12-06T08:00:00.000Z", time_ms=1_796_000_000_000, agent=evil, server="refunds",
            tool=evil, decision="deny", code="unknown-tool", reason=f"no tool {evil}", policies=[],
            policy_version=1, mode="enforce", charges={},
        )
    )  # fmt: skip
    facts.denials_by_reason[("unknown-tool", f"no tool {evil}")] += 1
    inp = ReportInput(
        log="DIR", origin="o", size=8, root_b64="r", note="o\n8\nr\n", signer="s", verified=True, problems=[],
        how="was checked", trust_root="mock", pcr0="00", generated="2026-12-06T08:00:01.000Z",
    )  # fmt: skip
    f = tmp_path / "r.html"
    f.write_text(render_html(build_report(inp, facts)), encoding="utf-8")
    shown = render(f.as_uri())
    assert shown.console == [], shown.console  # nothing ran, nothing was fetched, nothing blocked
    [row] = rows(shown.dom, "<h2>Calls</h2>")
    assert row[2] == row[4] == evil.replace("<", "&lt;").replace(">", "&gt;")


def test_report_usage_errors(built: TestLog, tmp_path: Path) -> None:
    w = "w=w+00000000+AQ"
    r = cli("audit", "report", "--log", str(built.dir), *trust(built, tmp_path), "--witness", w)
    assert r.code == 2 and ("needs a relay URL" in r.err or "--witness" in r.err), r.err
    r = cli(
        "audit",
        "report",
        "--log",
        str(built.dir),
        *trust(built, tmp_path),
        "--from",
        "2026-12-06T09:00:00Z",
        "--to",
        "2026-12-06T08:00:00Z",
    )
    assert r.code == 2 and "--from must be before --to" in r.err
    with pytest.raises(SystemExit) as exited:  # argparse's own refusal
        cli("audit", "report", "--log", str(built.dir), *trust(built, tmp_path), "--format", "pdf")
    assert exited.value.code == 2
