"""Printing what the auditor verified: entries as JSON, replay summaries, a progress bar."""

from __future__ import annotations

import base64
import dataclasses
import sys
import time
from typing import IO, Any

from cloister.audit.replay import ReplayResult
from cloister.verify.entries import Entry

__all__ = ["Progress", "entry_json", "replay_json", "replay_text"]


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def entry_json(entry: Entry, index: int | None = None) -> dict[str, Any]:
    """A decoded entry with its type; bytes as hex (hashes read as they are usually printed)."""
    out: dict[str, Any] = {"type": entry.TYPE}
    if index is not None:
        out["index"] = index
    for f in dataclasses.fields(entry):
        name = f.name
        value = getattr(entry, name)
        if name == "attestation" and isinstance(value, bytes):
            out[name] = base64.b64encode(value).decode("ascii")  # a document: base64, as `attest verify` reads
        else:
            out[name] = _plain(value)
    return out


def _b64(h: bytes | None) -> str | None:
    return None if h is None else base64.b64encode(h).decode("ascii")


def replay_json(result: ReplayResult, *, checkpoint_root: bytes, rate: float | None) -> dict[str, Any]:
    s = result.summary
    return {
        "ok": not result.problem_count,
        "tree_size": result.tree_size,
        "root": _b64(result.root),
        "checkpoint_root": _b64(checkpoint_root),
        "entries_per_second": round(rate) if rate else None,
        "problems": [{"where": p.where, "message": p.message} for p in result.problems],
        "problem_count": result.problem_count,
        "decisions": dict(s.decisions),
        "calls_by_agent": dict(s.by_agent),
        "calls_by_tool": dict(s.by_tool),
        "denials_by_code": dict(s.denials),
        "denials_by_reason": [{"code": c, "reason": r, "count": n} for (c, r), n in s.deny_reasons.most_common()],
        "outcomes": {"total": s.outcomes, "errors": s.outcome_errors, "paid": s.payments},
        # Decision 0017: outcomes by their recorded response-signature status ("missing" and
        # "invalid" are problems; "unrecorded": entries from before signed outcomes), and how many
        # recorded signatures this replay verified again.
        "response_signatures": {
            "by_status": {(k or "unrecorded"): n for k, n in sorted(s.responses.items())},
            "missing": s.responses.get("missing", 0),
            "invalid": s.responses.get("invalid", 0),
            "rechecked": s.signatures_checked,
        },
        # Decisions that issued a grant without an outcome: past their outcome window (each also a
        # problem; indexes capped) or still open, judged as of the log's last entry.
        "missing_outcomes": result.missing_outcomes,
        "missing_outcome_indexes": result.missing_outcome_indexes,
        "open_decisions": result.open_decisions,
        "outcomes_as_of_ms": result.outcomes_as_of_ms,
        "servers": [{"server": a, "kind": k, "status": st, "count": n} for (a, k, st), n in sorted(s.servers.items())],
        "key_introductions": [dataclasses.asdict(k) for k in result.keys],
        "policy_versions": [dataclasses.asdict(p) for p in result.policies],
        "decoded": {"by_template": s.fast_decodes, "by_parser": s.full_decodes},
    }


def _table(title: str, counts: Any, limit: int = 20) -> list[str]:
    items = counts.most_common()
    if not items:
        return []
    lines = [f"{title}:"]
    width = max(len(str(k)) for k, _ in items[:limit])
    for k, n in items[:limit]:
        lines.append(f"  {k!s:<{width}}  {n:>10,}")
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return lines


def replay_text(result: ReplayResult) -> str:
    s = result.summary
    lines: list[str] = []
    lines += _table("calls by decision", s.decisions)
    lines += _table("calls by agent", s.by_agent)
    lines += _table("calls by tool", s.by_tool)
    lines += _table("denials by code", s.denials)
    if s.deny_reasons:
        lines.append("denials by reason:")
        for (code, reason), n in s.deny_reasons.most_common(20):
            lines.append(f"  {n:>8,}  [{code}] {reason[:160]}")
        if len(s.deny_reasons) > 20:
            lines.append(f"  ... and {len(s.deny_reasons) - 20} more reasons")
    if s.outcomes:
        lines.append(f"outcomes: {s.outcomes:,} ({s.outcome_errors:,} with an error, {s.payments:,} paid)")
    signed = {k: n for k, n in s.responses.items() if k}
    if signed:
        statuses = ", ".join(f"{n:,} {k}" for k, n in sorted(signed.items()))
        lines.append(f"upstream response signatures: {statuses} ({s.signatures_checked:,} verified again)")
    if result.missing_outcomes or result.open_decisions:
        lines.append(
            f"allowed decisions without an outcome: {result.missing_outcomes:,} past their outcome window "
            f"(problems), {result.open_decisions:,} still open"
        )
    if s.servers:
        lines.append("server attestations:")
        for (server, kind, status), n in sorted(s.servers.items()):
            lines.append(f"  {server} ({kind}): {status} x{n}")
    if result.keys:
        lines.append("key introductions:")
        for k in result.keys:
            prev = "new log" if k.previous_size is None else f"continues size {k.previous_size}"
            ok = "verified" if k.verified else "NOT VERIFIED"
            pcr0 = f", PCR0 {k.pcr0[:16]}..." if k.pcr0 else ""
            lines.append(f"  entry {k.index}: {k.log_vkey} ({prev}{pcr0}) {ok}")
    if result.policies:
        lines.append("policy versions:")
        for p in result.policies:
            lines.append(
                f"  entry {p.index}: version {p.version} bundle {p.bundle_sha256[:16]}... "
                f"signed by {p.signer}, {p.mode}"
            )
    return "\n".join(lines)


class Progress:
    """`[#####.....]  45%  123,456/274,000 entries  512,000/s` on stderr, redrawn at most 10 times a second.

    Silent unless enabled and the stream is a terminal.
    """

    def __init__(self, enabled: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        rate = done / (now - self.start) if now > self.start else 0.0
        self.stream.write(f"\r[{bar:<30}] {frac * 100:5.1f}%  {done:,}/{total:,} entries  {rate:,.0f}/s ")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
