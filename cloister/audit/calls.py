"""Per-call records from a log's entries: each decision with its outcome, in ISO times.

Used by `cloister audit replay --json` (`calls`), `cloister audit report` and the relay's `/log/`
page. The entries come parsed by the one parser (cloister.verify.entries.parse_entry); this only
pairs and summarises them. An entry that does not parse is counted, never skipped silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from cloister.verify.entries import DecisionEntry, DenialsEntry, Entry, KeyEntry, OutcomeEntry, PolicyEntry, ServerEntry

__all__ = ["CallRecord", "LogFacts", "collect", "iso"]


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC (`2026-12-06T08:01:02.345Z`)."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class CallRecord:
    index: int
    time: str
    time_ms: int
    agent: str
    server: str
    tool: str
    decision: str  # allow | deny
    code: str
    reason: str
    policies: list[str]
    policy_version: int
    mode: str
    charges: dict[str, str]
    outcome_index: int | None = None
    outcome_time: str | None = None
    outcome: str = ""  # ok | error | pending | "" (denied)
    error: str = ""
    paid: str = ""
    duration_ms: float | None = None
    response: str | None = None  # the enclave's verdict on the upstream's response signature

    def json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("time_ms")
        return out


@dataclass
class LogFacts:
    calls: list[CallRecord] = field(default_factory=list)
    keys: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    servers: list[dict[str, Any]] = field(default_factory=list)
    denials_by_reason: Counter[tuple[str, str]] = field(default_factory=Counter)
    unlogged_denials: Counter[str] = field(default_factory=Counter)  # counted anonymous denials by code
    payments_by_agent: dict[str, Decimal] = field(default_factory=dict)
    unreadable: list[int] = field(default_factory=list)
    entries: int = 0


def _decimal(text: str) -> Decimal | None:
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def collect(
    entries: Iterable[tuple[int, Entry | None]], *, from_ms: int | None = None, to_ms: int | None = None
) -> LogFacts:
    """Pair decisions with outcomes; keep calls decided in [from_ms, to_ms) (all when None).

    `entries` is (index, parsed entry or None when it did not parse), in log order."""
    facts = LogFacts()
    by_index: dict[int, CallRecord] = {}
    for index, entry in entries:
        facts.entries += 1
        if entry is None:
            facts.unreadable.append(index)
        elif isinstance(entry, DecisionEntry):
            if (from_ms is not None and entry.time_ms < from_ms) or (to_ms is not None and entry.time_ms >= to_ms):
                continue
            record = _decision(index, entry)
            by_index[index] = record
            facts.calls.append(record)
            if entry.decision == "deny":
                facts.denials_by_reason[(entry.code, entry.reason)] += 1
        elif isinstance(entry, OutcomeEntry):
            decided = by_index.get(entry.decision_index)
            if decided is not None:
                _outcome(decided, index, entry, facts)
        else:
            _other(index, entry, facts, from_ms, to_ms)
    return facts


def _decision(index: int, entry: DecisionEntry) -> CallRecord:
    return CallRecord(
        index=index,
        time=iso(entry.time_ms),
        time_ms=entry.time_ms,
        agent=entry.agent,
        server=entry.server,
        tool=entry.tool,
        decision=entry.decision,
        code=entry.code,
        reason=entry.reason,
        policies=list(entry.policies),
        policy_version=entry.policy_version,
        mode=entry.mode,
        charges=dict(entry.charges),
        outcome="pending" if entry.grant_nonce is not None else "",
    )


def _outcome(record: CallRecord, index: int, entry: OutcomeEntry, facts: LogFacts) -> None:
    record.outcome_index = index
    record.outcome_time = iso(entry.time_ms)
    record.outcome = "error" if entry.error else "ok"
    record.error = entry.error
    record.paid = entry.paid
    record.duration_ms = round(entry.duration_us / 1000, 3)
    record.response = entry.response
    amount = _decimal(entry.paid) if entry.paid else None
    if amount is not None:
        facts.payments_by_agent[record.agent] = facts.payments_by_agent.get(record.agent, Decimal(0)) + amount


def _other(index: int, entry: Entry, facts: LogFacts, from_ms: int | None, to_ms: int | None) -> None:
    if isinstance(entry, PolicyEntry):
        facts.policies.append(
            {
                "index": index,
                "time": iso(entry.time_ms),
                "version": entry.version,
                "bundle_sha256": entry.bundle_sha256.hex(),
                "signer": entry.signer,
                "mode": entry.mode,
            }
        )
    elif isinstance(entry, KeyEntry):
        facts.keys.append(
            {
                "index": index,
                "time": iso(entry.time_ms),
                "log_vkey": entry.log_vkey,
                "previous_size": entry.previous_size,
            }
        )
    elif isinstance(entry, ServerEntry):
        facts.servers.append(
            {
                "index": index,
                "time": iso(entry.time_ms),
                "server": entry.server,
                "kind": entry.kind,
                "status": entry.status,
                "detail": entry.detail,
            }
        )
    elif isinstance(entry, DenialsEntry):
        if (from_ms is not None and entry.last_ms < from_ms) or (to_ms is not None and entry.first_ms >= to_ms):
            return
        for code, n in entry.codes.items():
            facts.unlogged_denials[code] += n
