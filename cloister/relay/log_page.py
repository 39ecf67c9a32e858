"""The relay's read-only audit page at `/log/` (the URL `cloister up` prints), decision 0020.

What it shows, from public data only (the entries and checkpoints anyone can read as tiles): the
latest published checkpoint and whether its signature checks against the running enclave's log
key, the log's sizes, the policy in force, the most recent calls and denials with links to their
entry bundles and inclusion proofs, and the commands that verify all of it independently. No
bodies, no tokens. The relay is not trusted: the page says so and names `cloister audit ...`.

Agent-chosen text (tool names, reasons quoting them) is HTML-escaped, and the page is served
with a Content-Security-Policy that allows no script and no fetch at all.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from cloister.audit.calls import collect
from cloister.audit.report import CSP, html_table, link, page, svg_bars
from cloister.verify.checkpoint import parse_checkpoint, verify_checkpoint
from cloister.verify.entries import Entry, parse_entry
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.note import Ed25519NoteVerifier, parse_note
from cloister.verify.tiles import TILE_WIDTH, entry_bundle_path

__all__ = ["CSP", "RECENT_ENTRIES", "render_log_page"]

RECENT_ENTRIES = 512  # entries read for the recent calls: bounded, whatever the log's size
RECENT_ROWS = 100


def _checkpoint_status(note: bytes | None, vkey: str) -> tuple[str, int, str]:
    """(what the relay could check, size, origin) of the published checkpoint."""
    if note is None:
        return "no checkpoint published yet", 0, ""
    try:
        cp = parse_checkpoint(parse_note(note).text)
    except DecodeError as exc:
        return f"the published checkpoint does not parse: {exc}", 0, ""
    if not vkey:
        return "not checked: the enclave has not said its log key yet", cp.size, cp.origin
    try:
        verify_checkpoint(note, [Ed25519NoteVerifier.from_vkey(vkey)], origin=cp.origin)
    except (DecodeError, VerificationError) as exc:
        return f"DOES NOT VERIFY with the running enclave's log key: {exc}", cp.size, cp.origin
    return f"signature verified by this relay with the running enclave's log key {vkey}", cp.size, cp.origin


def _parse(data: bytes) -> Entry | None:
    try:
        return parse_entry(data)
    except DecodeError:
        return None


def render_log_page(
    *,
    note: bytes | None,
    entries: list[bytes],
    first_index: int,
    sizes: dict[str, int | None],
    policy: dict[str, Any] | None,
    log_vkey: str,
    base: str,
) -> str:
    """The page; `entries` are the most recent published ones, from `first_index`."""
    status, size, origin = _checkpoint_status(note, log_vkey)
    facts = collect((first_index + i, _parse(d)) for i, d in enumerate(entries))
    calls = facts.calls[-RECENT_ROWS:][::-1]
    denied = [c for c in facts.calls if c.decision == "deny"][-RECENT_ROWS:][::-1]
    proof = f"{base}proof/inclusion?size={size}&index="

    def bundle(index: int) -> str:
        first = index - index % TILE_WIDTH
        width = min(TILE_WIDTH, size - first)
        return base + entry_bundle_path(index // TILE_WIDTH, width)

    def rows(records: list[Any]) -> list[list[Any]]:
        return [
            [
                link(bundle(c.index), str(c.index)),
                c.time,
                c.agent,
                c.server,
                c.tool,
                c.decision,
                c.code,
                c.reason,
                c.paid,
                c.outcome + (f": {c.error}" if c.error else ""),
                link(proof + str(c.index), "inclusion proof"),
            ]
            for c in records
        ]

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
        "outcome",
        "proof",
    ]
    by_code: Counter[str] = Counter()
    for (code, _reason), n in facts.denials_by_reason.items():
        by_code[code or "(none)"] += n
    signers = {p["version"]: p["signer"] for p in facts.policies}
    policy_rows = (
        [
            [
                policy.get("version"),
                policy.get("sha256"),
                signers.get(policy.get("version"), "(not among recent entries)"),
            ]
        ]
        if policy
        else []
    )
    body = [
        f'<h1>Cloister log</h1><p class="muted">{_esc(origin or "origin unknown")}</p>',
        "<p>This page is served by the relay, which is <b>not trusted</b>. Verify everything here with "
        "<code>cloister audit checkpoint --log URL --trust-root ...</code>, "
        "<code>cloister audit replay</code> and <code>cloister audit report</code>.</p>",
        "<h2>Latest checkpoint</h2>",
        f"<p>{_esc(status)}</p>",
        f"<pre>{_esc(note.decode('utf-8', 'replace') if note else '')}</pre>",
        html_table(
            ["stage", "entries"],
            [[k, "" if v is None else v] for k, v in sizes.items()],
        ),
        "<p>"
        + " · ".join(
            [
                link(base + "checkpoint", "checkpoint").html,
                link(base + "checkpoint.cosigned", "witness-cosigned checkpoint").html,
                link(base + f"proof/consistency?from=0&to={size}", "consistency proof").html,
            ]
        )
        + "</p>",
        "<h2>Policy in force</h2>",
        html_table(["version", "bundle SHA-256", "signer"], policy_rows),
        f"<h2>Recent calls</h2><p>The last {len(calls)} decisions among entries {first_index} to "
        f"{first_index + len(entries) - 1 if entries else first_index}.</p>",
        html_table(headers, rows(calls), row_classes=["deny" if c.decision == "deny" else "" for c in calls]),
        "<h2>Recent denials</h2>",
        svg_bars("Recent denials by code", [(c, float(n)) for c, n in by_code.most_common()]),
        html_table(headers, rows(denied), row_classes=["deny"] * len(denied)),
    ]
    return page(f"Cloister log {origin}", "".join(body))


def _esc(text: str) -> str:
    from html import escape

    return escape(text, quote=True)
