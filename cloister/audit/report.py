"""`cloister audit report`: a self-contained evidence file for auditors (HTML, JSON or CSV).

What it holds, and how each part was established:

1. The checkpoint: attested for a fresh nonce (a relay URL) or trusted through the log's own key
   entries (a storage directory), then the whole log replayed against it (cloister.audit.replay):
   every entry, tile and key entry checked. Witness cosignatures, when the caller pinned witnesses.
2. The per-call table, policy versions, key introductions and server identities: read again from
   the entry bundles, whose recomputed root must equal the verified checkpoint's (so a source
   that answers differently the second time is caught), parsed by the one entry parser.
3. What is taken on trust is said in plain words: the clock of the enclave (entry times), the
   trust root the auditor chose, that the log is complete only up to the checkpoint (a host can
   withhold newer entries), and bodies (not read by this report).

The HTML is one file: inline CSS and SVG, no script, no network (a Content-Security-Policy meta
forbids both), every value HTML-escaped. Receipt links are the relay's inclusion-proof URLs, and
each row names the `cloister audit receipt` command that makes an offline receipt.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from html import escape
from typing import Any

from cloister.audit.calls import CallRecord, LogFacts, collect
from cloister.audit.source import MAX_ENTRY_BUNDLE, LogSource, read_tile
from cloister.verify.entries import Entry, parse_entry
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import CompactRange, leaf_hash
from cloister.verify.tiles import TILE_WIDTH, entry_bundle_path, parse_entry_bundle

__all__ = ["CSV_COLUMNS", "ReportInput", "build_report", "read_verified_entries", "render_csv", "render_html"]

MAX_REPORT_ENTRIES = 5_000_000
MAX_HTML_ROWS = 100_000  # a browser still opens the file; JSON and CSV always hold every call
CSV_COLUMNS = (
    "index",
    "time",
    "agent",
    "server",
    "tool",
    "decision",
    "code",
    "reason",
    "policy_version",
    "payment",
    "charges",
    "outcome",
    "outcome_index",
    "outcome_time",
    "duration_ms",
    "response",
    "error",
    "receipt",
)


def read_verified_entries(source: LogSource, size: int, root: bytes) -> list[tuple[int, Entry | None]]:
    """Entries [0, size) read from their bundles, parsed; their tree must have `root`.

    The replay already verified the log; reading it a second time is checked the same way (the
    recomputed root), so what the report shows is what was verified."""
    if size > MAX_REPORT_ENTRIES:
        raise VerificationError(f"the log has {size} entries; a report covers at most {MAX_REPORT_ENTRIES}")
    tree = CompactRange.empty()
    out: list[tuple[int, Entry | None]] = []
    for first in range(0, size, TILE_WIDTH):
        width = min(TILE_WIDTH, size - first)
        path = entry_bundle_path(first // TILE_WIDTH, width)
        try:
            entries = parse_entry_bundle(read_tile(source, path, MAX_ENTRY_BUNDLE), width)
        except DecodeError as exc:
            raise DecodeError(f"{source.where(path)}: {exc}") from exc
        for i, data in enumerate(entries):
            tree.append(leaf_hash(data))
            try:
                out.append((first + i, parse_entry(data)))
            except DecodeError:
                out.append((first + i, None))
    if tree.root() != root:
        raise VerificationError(
            "the entries read for the report do not hash to the verified checkpoint's root "
            "(the log changed under the report, or its source answers differently each time)"
        )
    return out


@dataclass
class ReportInput:
    """What the caller verified, to be stated in the report."""

    log: str  # the URL or directory as given
    origin: str
    size: int
    root_b64: str
    note: str
    signer: str
    verified: bool  # the checkpoint is trusted and the replay found no problem
    problems: list[str]
    how: str  # how the checkpoint was trusted, in words
    trust_root: str
    pcr0: str
    generated: str  # ISO time the report was made
    window: tuple[str | None, str | None] = (None, None)
    witnesses: dict[str, Any] | None = None
    key_checks: list[dict[str, Any]] = field(default_factory=list)  # the replay's key introductions
    response_signatures: dict[str, Any] = field(default_factory=dict)
    log_url: str | None = None  # for receipt and proof links (a relay URL)


def _charges(record: CallRecord) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(record.charges.items()))


def _receipt_url(base: str | None, record: CallRecord, size: int) -> str:
    if base is None:
        return ""
    return f"{base.rstrip('/')}/proof/inclusion?index={record.index}&size={size}"


def build_report(inp: ReportInput, facts: LogFacts) -> dict[str, Any]:
    """The report as data: what `--format json` prints and the HTML and CSV are made from."""
    calls = [
        {**c.json(), "payment": c.paid, "charges_text": _charges(c), "receipt": _receipt_url(inp.log_url, c, inp.size)}
        for c in facts.calls
    ]
    denials = [{"code": c, "reason": r, "count": n} for (c, r), n in facts.denials_by_reason.most_common()]
    statement = _statement(inp)
    return {
        "report": "cloister audit report",
        "generated": inp.generated,
        "log": inp.log,
        "verified": inp.verified,
        "checkpoint": {
            "origin": inp.origin,
            "size": inp.size,
            "root": inp.root_b64,
            "signed_by": inp.signer,
            "how": inp.how,
            "note": inp.note,
            "trust_root": inp.trust_root,
            "pcr0": inp.pcr0,
        },
        "witnesses": inp.witnesses,
        "problems": inp.problems,
        "window": {"from": inp.window[0], "to": inp.window[1]},
        "policy_versions": facts.policies,
        "key_introductions": inp.key_checks or facts.keys,
        "servers": facts.servers,
        "calls": calls,
        "totals": {
            "entries": facts.entries,
            "calls": len(calls),
            "allowed": sum(1 for c in facts.calls if c.decision == "allow"),
            "denied": sum(1 for c in facts.calls if c.decision == "deny"),
            "unlogged_denials": dict(facts.unlogged_denials),
            "unreadable_entries": facts.unreadable[:100],
        },
        "denials_by_reason": denials,
        "payments_by_agent": {a: str(v) for a, v in sorted(facts.payments_by_agent.items())},
        "response_signatures": inp.response_signatures,
        "statement": statement,
    }


def _statement(inp: ReportInput) -> dict[str, list[str]]:
    verified = [
        f"The checkpoint (size {inp.size}, origin {inp.origin}) {inp.how}.",
        f"Every one of the {inp.size} entries was read, hashed into the Merkle tree (RFC 9162) and the root "
        "recomputed equals the checkpoint's; every stored hash tile matched; every entry decoded.",
        "Every key entry's attestation verified against the trust root and binds the log and grant keys it "
        "introduces; each continues the log exactly as it stood (previous size and root).",
        "Decisions name the policy version in force; each outcome answers an earlier allowed decision, once.",
        "Recorded response signatures of attested upstreams were verified again.",
    ]
    if inp.witnesses:
        verified.append(
            f"{len(inp.witnesses.get('cosigned', {}))} pinned witnesses cosigned a checkpoint of size "
            f"{inp.witnesses.get('size')} (quorum {inp.witnesses.get('quorum')})."
        )
    trusted = [
        f"The trust root {inp.trust_root}: attestation documents are only as good as it.",
        "Entry times come from the enclave's clock, which the host feeds; they order nothing the log index "
        "does not already order.",
        "Completeness ends at the checkpoint: a host can withhold or delay entries after it (witnesses, when "
        "present, bound how far back it can roll the log).",
        "Argument and result bodies were not read: the entries commit to their SHA-256 only "
        "(cloister audit body checks one).",
        "An upstream's own behaviour: the log shows what it answered and whether its response was signed.",
    ]
    if not inp.witnesses:
        trusted.append("No witnesses were pinned for this report: rollback protection was not checked.")
    if not inp.verified:
        verified.insert(0, "VERIFICATION FAILED: see the problems listed; nothing below should be relied on.")
    return {"verified": verified, "taken_on_trust": trusted}


def render_csv(report: dict[str, Any]) -> str:
    """The per-call table as CSV (RFC 4180), one row per call, CSV_COLUMNS."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    for call in report["calls"]:
        row = {k: ("" if call.get(k) is None else call.get(k)) for k in CSV_COLUMNS}
        row["charges"] = call.get("charges_text", "")
        # A spreadsheet must not run a cell an agent chose: neutralise formula prefixes.
        writer.writerow({k: _csv_safe(v) for k, v in row.items()})
    return out.getvalue()


def _csv_safe(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


# --- HTML ---------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#1b1f24;max-width:1400px}
h1{font-size:1.6em;margin:0 0 .2em}h2{font-size:1.2em;margin:1.6em 0 .4em;border-bottom:1px solid #ccd}
table{border-collapse:collapse;width:100%;margin:.4em 0;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:3px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f3f4f6}tr.deny td{background:#fff4f4}
.ok{color:#116329;font-weight:600}.bad{color:#b42318;font-weight:700}pre{background:#f6f8fa;padding:.6em;
overflow:auto;white-space:pre-wrap;word-break:break-all}code{font-size:.95em}.muted{color:#59636e}
.charts{display:flex;flex-wrap:wrap;gap:2em}figure{margin:0}figcaption{font-weight:600}
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, row_classes: Sequence[str] = ()) -> str:
    """A table; cells are escaped unless given as `Raw`."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{_e(row_classes[i])}"' if i < len(row_classes) and row_classes[i] else ""
        cells = "".join(f"<td>{c.html if isinstance(c, Raw) else _e(c)}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


@dataclass(frozen=True)
class Raw:
    html: str


def link(url: str, text: str) -> Raw:
    if not url:
        return Raw(_e(text))
    return Raw(f'<a href="{_e(url)}">{_e(text)}</a>')


def svg_bars(title: str, items: Sequence[tuple[str, float]], *, width: int = 520) -> str:
    """A horizontal bar chart as inline SVG (no script, no fonts fetched)."""
    items = list(items)[:20]
    bar_h, label_w = 18, 220
    height = max(len(items), 1) * (bar_h + 4) + 8
    top = max((v for _, v in items), default=0) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(title)}"><title>{_e(title)}</title>'
    ]
    for i, (label, value) in enumerate(items):
        y = 4 + i * (bar_h + 4)
        w = int((width - label_w - 60) * value / top)
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" font-size="12">{_e(label[:40])}</text>'
            f'<rect x="{label_w}" y="{y}" width="{max(w, 1)}" height="{bar_h}" fill="#4c78a8"/>'
            f'<text x="{label_w + w + 4}" y="{y + 13}" font-size="12">{_e(_num(value))}</text>'
        )
    if not items:
        parts.append('<text x="4" y="16" font-size="12">none</text>')
    parts.append("</svg>")
    return "".join(parts)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def svg_timeline(title: str, times_ms: Sequence[int], *, width: int = 520, buckets: int = 24) -> str:
    """Calls over time: a column chart of how many calls fell in each of `buckets` equal spans."""
    height = 140
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" role="img" '
        f'aria-label="{_e(title)}"><title>{_e(title)}</title>'
    ]
    if times_ms:
        lo, hi = min(times_ms), max(times_ms)
        span = max(hi - lo, 1)
        counts = Counter(min(int((t - lo) * buckets / span), buckets - 1) for t in times_ms)
        top = max(counts.values())
        col = width / buckets
        for b in range(buckets):
            h = int(height * counts.get(b, 0) / top)
            parts.append(
                f'<rect x="{b * col + 1:.1f}" y="{height - h}" width="{col - 2:.1f}" height="{h}" fill="#f58518">'
                f"<title>{counts.get(b, 0)}</title></rect>"
            )
        from cloister.audit.calls import iso

        parts.append(
            f'<text x="0" y="{height + 16}" font-size="11">{_e(iso(lo))}</text>'
            f'<text x="{width}" y="{height + 16}" font-size="11" text-anchor="end">{_e(iso(hi))}</text>'
        )
    else:
        parts.append('<text x="4" y="16" font-size="12">no calls</text>')
    parts.append("</svg>")
    return "".join(parts)


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def _calls_table(calls: Sequence[dict[str, Any]]) -> str:
    rows = []
    classes = []
    for c in calls:
        receipt = c.get("receipt") or ""
        rows.append(
            [
                c["index"],
                c["time"],
                c["agent"],
                c["server"],
                c["tool"],
                Raw(f'<span class="{"ok" if c["decision"] == "allow" else "bad"}">{_e(c["decision"])}</span>'),
                c["code"],
                c["reason"],
                c["payment"],
                c.get("charges_text", ""),
                c["outcome"] + (f": {c['error']}" if c.get("error") else ""),
                c.get("response") or "",
                link(receipt, "proof") if receipt else f"cloister audit receipt --index {c['index']}",
            ]
        )
        classes.append("deny" if c["decision"] == "deny" else "")
    headers = [
        "index",
        "time (UTC)",
        "agent",
        "server",
        "tool",
        "decision",
        "code",
        "reason",
        "payment",
        "limit charges",
        "outcome",
        "response",
        "receipt",
    ]
    return html_table(headers, rows, row_classes=classes)


def render_html(report: dict[str, Any]) -> str:
    cp = report["checkpoint"]
    ok = report["verified"]
    verdict = (
        '<p class="ok">VERIFIED: the checkpoint and every entry below it.</p>'
        if ok
        else '<p class="bad">NOT VERIFIED: see the problems.</p>'
    )
    parts = [
        f'<h1>Cloister audit report</h1><p class="muted">{_e(report["log"])} · generated {_e(report["generated"])}</p>',
        f'<section id="verdict">{verdict}</section>',
        "<h2>What was verified</h2><ul>"
        + "".join(f"<li>{_e(s)}</li>" for s in report["statement"]["verified"])
        + "</ul>",
        "<h2>What was taken on trust</h2><ul>"
        + "".join(f"<li>{_e(s)}</li>" for s in report["statement"]["taken_on_trust"])
        + "</ul>",
    ]
    if report["problems"]:
        parts.append(
            "<h2>Problems</h2><ul>" + "".join(f'<li class="bad">{_e(p)}</li>' for p in report["problems"]) + "</ul>"
        )
    parts.append(
        "<h2>Checkpoint</h2>"
        + html_table(
            ["origin", "size", "root", "signed by", "trust root", "PCR0"],
            [[cp["origin"], cp["size"], cp["root"], cp["signed_by"], cp["trust_root"], cp["pcr0"]]],
        )
        + f"<pre>{_e(cp['note'])}</pre>"
    )
    w = report.get("witnesses")
    if w:
        parts.append(
            "<h2>Witness cosignatures</h2>"
            + html_table(["witness", "cosigned at"], sorted(w.get("cosigned", {}).items()))
            + f"<p>size {_e(w.get('size'))}, quorum {_e(w.get('quorum'))}</p>"
        )
    parts.append(
        "<h2>Policy versions</h2>"
        + html_table(
            ["index", "time (UTC)", "version", "signer", "mode", "bundle SHA-256"],
            [
                [p["index"], p["time"], p["version"], p["signer"], p["mode"], p["bundle_sha256"]]
                for p in report["policy_versions"]
            ],
        )
    )
    parts.append(
        "<h2>Key introductions</h2>"
        + html_table(
            ["index", "time (UTC)", "log key", "PCR0", "continues size", "verified"],
            [
                [
                    k.get("index"),
                    k.get("time"),
                    k.get("log_vkey"),
                    k.get("pcr0", ""),
                    k.get("previous_size"),
                    k.get("verified", ""),
                ]
                for k in report["key_introductions"]
            ],
        )
    )
    if report["servers"]:
        parts.append(
            "<h2>Upstream identities</h2>"
            + html_table(
                ["index", "time (UTC)", "server", "kind", "status", "detail"],
                [[s["index"], s["time"], s["server"], s["kind"], s["status"], s["detail"]] for s in report["servers"]],
            )
        )
    totals = report["totals"]
    denials = report["denials_by_reason"]
    payments = report["payments_by_agent"]
    times = [_ms(c["time"]) for c in report["calls"]]
    parts.append(
        '<h2>Charts</h2><div class="charts">'
        f"<figure><figcaption>Calls over time</figcaption>{svg_timeline('Calls over time', times)}</figure>"
        "<figure><figcaption>Denials by code</figcaption>"
        f"{svg_bars('Denials by code', _by_code(denials))}</figure>"
        "</div>"
    )
    parts.append(
        "<h2>Denials by reason</h2>"
        + html_table(["code", "reason", "count"], [[d["code"], d["reason"], d["count"]] for d in denials])
    )
    if totals["unlogged_denials"]:
        parts.append(
            "<p>Counted, not logged one by one (unauthenticated): "
            + _e(", ".join(f"{k}: {v}" for k, v in sorted(totals["unlogged_denials"].items())))
            + "</p>"
        )
    parts.append(
        "<h2>Payments by agent</h2>"
        + html_table(["agent", "paid"], sorted(payments.items()))
        + svg_bars("Payments by agent", [(a, float(Decimal(v))) for a, v in sorted(payments.items())])
    )
    shown = report["calls"][:MAX_HTML_ROWS]
    cut = (
        f'<p class="bad">Only the first {len(shown)} calls are listed here; --format json or csv holds all '
        f"{len(report['calls'])}, or narrow the report with --from and --to.</p>"
        if len(shown) < len(report["calls"])
        else ""
    )
    parts.append(
        f"<h2>Calls</h2><p>{totals['calls']} calls ({totals['allowed']} allowed, {totals['denied']} denied) "
        f"in {totals['entries']} entries.</p>" + cut + _calls_table(shown)
    )
    return page(f"Cloister audit report: {cp['origin']}", "".join(parts))


def _by_code(denials: Sequence[dict[str, Any]]) -> list[tuple[str, float]]:
    counts: Counter[str] = Counter()
    for d in denials:
        counts[d["code"] or "(none)"] += d["count"]
    return [(code, float(n)) for code, n in counts.most_common()]


def _ms(iso_text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp() * 1000)


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)


def collect_verified(
    source: LogSource, size: int, root: bytes, *, from_ms: int | None = None, to_ms: int | None = None
) -> LogFacts:
    return collect(read_verified_entries(source, size, root), from_ms=from_ms, to_ms=to_ms)
