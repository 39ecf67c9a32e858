"""Rate limits and spend caps: state Cedar cannot hold, kept exactly in the enclave.

Each limit keeps, per key (an agent, a role, a tool, a server, or everyone), the charges made
inside a sliding window. A call is allowed only if every matching limit has room for its
cost; the check and the charge happen under the sequencer lock together with the decision's
append, so concurrent calls can never overshoot a cap. Costs are Decimals, never floats.

The state is kept bounded whatever agents do (docs/decisions/0016): a window holds its charges
one by one until it has 2 x SNAPSHOT_BUCKETS of them; then they are folded into at most
SNAPSHOT_BUCKETS + 1 time buckets, each charge moved to the last millisecond of its bucket (a
window / SNAPSHOT_BUCKETS wide). A folded charge leaves the window up to one bucket later than
it would have: a cap is never exceeded, only possibly reached a little early. The book tracks at
most MAX_SNAPSHOT_KEYS windows (limit x key); a call that would open another is denied.

Snapshots of the log carry these windows folded the same way (`snapshot`, `restore`), and the
live windows are replaced by the folded ones when a snapshot is taken, so a resume from the
snapshot plus the decisions after it rebuilds exactly the live state. Without a snapshot, the
state is rebuilt from the decision entries' recorded charges (`replay`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from cloister.enclave.bundle import MAX_COST_PLACES, MAX_LIMIT_VALUE, Limit, PolicyBundle, action_id
from cloister.verify.entries import (
    DECISION_FIELDS,
    MAX_SNAPSHOT_KEYS,
    SNAPSHOT_BUCKETS,
    DecisionEntry,
    SnapshotWindow,
    decimal_text,
)

__all__ = [
    "MAX_CHARGES",
    "MAX_COST_PLACES",
    "MAX_WINDOWS",
    "BadCost",
    "Charge",
    "LimitBook",
    "LimitCheck",
    "LimitStatus",
    "charge_of",
]
# A decision entry records what the call charged each limit, in a map this large at most.
MAX_CHARGES = DECISION_FIELDS["charges"].max_len


# Windows (limit x key) one book tracks; a snapshot carries them all, so the same cap.
MAX_WINDOWS = MAX_SNAPSHOT_KEYS
# A window folds its charges into buckets once it holds this many one by one.
FOLD_AT = 2 * SNAPSHOT_BUCKETS


@dataclass(frozen=True)
class Charge:
    """What an allowed decision charged, as a resume replays it: the decision entry's fields
    the limits key on, nothing else (a resume may hold many)."""

    time_ms: int
    agent: str
    server: str
    tool: str
    charges: tuple[tuple[str, Decimal], ...]


def charge_of(e: DecisionEntry) -> Charge | None:
    """The charges an allowed decision made, or None when it charged nothing."""
    if e.decision != "allow" or not e.charges:
        return None
    try:
        charges = tuple((k, Decimal(v)) for k, v in sorted(e.charges.items()))
    except ArithmeticError:
        return None  # cannot happen for an entry the enclave wrote (decimal_text); counts nothing
    if not any(c.is_finite() and c > 0 for _, c in charges):
        return None
    return Charge(e.time_ms, e.agent, e.server, e.tool, charges)


def bucket_ms(window_s: int) -> int:
    """How wide a window's buckets are: the window in SNAPSHOT_BUCKETS parts, rounded up."""
    return max(1, -(-window_s * 1000 // SNAPSHOT_BUCKETS))


class BadCost(Exception):
    """The call's arguments do not give a usable cost for a spend limit."""


@dataclass(frozen=True)
class LimitStatus:
    limit_id: str
    kind: str
    remaining: Decimal
    retry_after_s: float


@dataclass(frozen=True)
class LimitCheck:
    ok: bool
    charges: Mapping[str, Decimal]  # limit id -> amount this call charges (when ok)
    denied_by: LimitStatus | None
    statuses: tuple[LimitStatus, ...]
    reason: str = ""


class _Window:
    __slots__ = ("bucket_ms", "events", "total", "window_ms")

    def __init__(self, window_s: int) -> None:
        self.events: deque[tuple[int, Decimal]] = deque()
        self.total = Decimal(0)
        self.resize(window_s)

    def resize(self, window_s: int) -> None:
        self.window_ms = window_s * 1000
        self.bucket_ms = bucket_ms(window_s)

    def add(self, time_ms: int, amount: Decimal) -> None:
        self.events.append((time_ms, amount))
        self.total += amount
        if len(self.events) >= FOLD_AT:
            # What is left within the window fits SNAPSHOT_BUCKETS + 1 buckets.
            self.expire(time_ms - self.window_ms)
            self.fold()

    def fold(self) -> None:
        """Move every charge to the last millisecond of its bucket and merge equal times: later,
        never earlier, so the window only ever counts a charge longer (decision 0016)."""
        width = self.bucket_ms
        merged: dict[int, Decimal] = {}
        for t, amount in self.events:
            end = t // width * width + width - 1
            merged[end] = merged.get(end, Decimal(0)) + amount
        self.events = deque(sorted(merged.items()))

    def buckets(self) -> tuple[tuple[int, str], ...]:
        """The folded window as a snapshot writes it (call `fold` first)."""
        return tuple((t, decimal_text(min(a, _MAX_BUCKET))) for t, a in self.events if a > 0)

    def expire(self, cutoff_ms: int) -> None:
        while self.events and self.events[0][0] <= cutoff_ms:
            self.total -= self.events.popleft()[1]

    def retry_after_ms(self, need: Decimal, maximum: Decimal, window_ms: int, now_ms: int) -> int:
        """How long until `need` fits, as old charges leave the window."""
        freed = maximum - self.total
        for t, amount in self.events:
            if freed >= need:
                break
            freed += amount
            wait = t + window_ms - now_ms
            if freed >= need:
                return max(wait, 0)
        return 0 if freed >= need else window_ms


def _window(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _keys(limit: Limit, agent: str, roles: frozenset[str], server: str, tool: str) -> list[str]:
    if limit.per == "agent":
        return [agent]
    if limit.per == "role":
        return sorted((roles & limit.roles) if limit.roles else roles)
    if limit.per == "tool":
        return [action_id(server, tool)]
    if limit.per == "server":
        return [server]
    return ["*"]


def _cost(limit: Limit, arguments: Mapping[str, Any], payment: Decimal | None) -> Decimal:
    kind, value = limit.cost
    if kind == "call":
        return Decimal(1)
    if kind == "price":
        return Decimal(value)  # the bundle's, checked as parsed (cloister.enclave.bundle._decimal)
    if kind == "x402":
        # The payment the call carries; a call without one is the upstream's chance to say -32402.
        return _recordable(payment, "the x402 payment", limit) if payment is not None else Decimal(0)
    raw = arguments.get(value)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise BadCost(f"argument {value!r} must be a number for limit {limit.id!r}")
    try:
        amount = Decimal(str(raw))
    except (InvalidOperation, ValueError) as exc:  # ValueError: an int too long for str()
        raise BadCost(f"argument {value!r} is not a number (limit {limit.id!r})") from exc
    return _recordable(amount, f"argument {value!r}", limit)


def _recordable(amount: Decimal, what: str, limit: Limit) -> Decimal:
    """`amount` if a decision entry can record it and windows can add it exactly, else BadCost."""
    if not amount.is_finite() or amount < 0:
        raise BadCost(f"{what} must be a non-negative number (limit {limit.id!r})")
    # The amount is written into the decision entry (and a denial's reason), whose parser takes
    # short charges only; and it must add up exactly. No cap exceeds MAX_LIMIT_VALUE.
    if amount > MAX_LIMIT_VALUE:
        raise BadCost(f"{what} is larger than any limit allows ({MAX_LIMIT_VALUE}) (limit {limit.id!r})")
    if -int(amount.as_tuple().exponent) > MAX_COST_PLACES:  # finite, so the exponent is a number
        raise BadCost(f"{what} has more than {MAX_COST_PLACES} decimal places (limit {limit.id!r})")
    return amount


# A bucket's amount as a snapshot records it: larger sums (possible only from history replayed
# under a lower cap) are written as this, above any cap, so the window stays exhausted.
_MAX_BUCKET = MAX_LIMIT_VALUE * 2


class LimitBook:
    """The windows of one bundle's limits. Limits apply to an agent by its identity and by the
    roles the bundle grants it (`roles`, agent -> roles), never by the roles a token presents: a
    token that presents fewer roles narrows what Cedar permits, not what the limits count."""

    def __init__(self, limits: Iterable[Limit], roles: Mapping[str, frozenset[str]] | None = None) -> None:
        self.limits = tuple(limits)
        self._by_id = {lim.id: lim for lim in self.limits}
        self._roles = dict(roles or {})
        self._windows: dict[tuple[str, str], _Window] = {}

    @classmethod
    def for_bundle(cls, bundle: PolicyBundle) -> LimitBook:
        return cls(bundle.limits, {name: spec.roles for name, spec in bundle.agents.items()})

    def roles(self, agent: str) -> frozenset[str]:
        """The roles the bundle grants `agent` (none for an agent it does not know)."""
        return self._roles.get(agent, frozenset())

    def check(
        self,
        agent: str,
        server: str,
        tool: str,
        arguments: Mapping[str, Any],
        now_ms: int,
        payment: Decimal | None = None,
    ) -> LimitCheck:
        """Whether every matching limit has room for this call. Does not charge."""
        charges: dict[str, Decimal] = {}
        statuses: list[LimitStatus] = []
        roles = self.roles(agent)
        opens: list[tuple[Limit, str]] = []  # windows this call's charge would open
        for limit in self.limits:
            if not limit.matches(agent, roles, server, tool):
                continue
            cost = _cost(limit, arguments, payment)
            window_ms = limit.window_s * 1000
            for key in _keys(limit, agent, roles, server, tool):
                w = self._windows.get((limit.id, key))
                used = Decimal(0)
                if w is not None:
                    w.expire(now_ms - window_ms)
                    used = w.total
                remaining = limit.maximum - used
                # An x402 call without a payment only needs some budget left (it will learn the price).
                unpriced = limit.cost[0] == "x402" and payment is None
                exhausted = remaining <= 0 if unpriced else cost > remaining
                if exhausted:
                    need = cost if not unpriced else Decimal("0.000001")
                    wait_ms = w.retry_after_ms(need, limit.maximum, window_ms, now_ms) if w else window_ms
                    status = LimitStatus(limit.id, limit.kind, max(remaining, Decimal(0)), wait_ms / 1000)
                    what = "calls" if limit.kind == "rate" else "spend"
                    reason = (
                        f"limit {limit.id!r} reached: {what} of {limit.maximum} per {_window(limit.window_s)} "
                        f"for {limit.per} {key!r}; this call needs {decimal_text(cost)}, "
                        f"{decimal_text(max(remaining, Decimal(0)))} remains; "
                        f"retry in {wait_ms / 1000:.0f}s"
                    )
                    return LimitCheck(False, {}, status, (*statuses, status), reason)
                statuses.append(LimitStatus(limit.id, limit.kind, remaining - cost, 0.0))
                if w is None and cost > 0:
                    opens.append((limit, key))
            charges[limit.id] = cost
        if sum(1 for c in charges.values() if c) > MAX_CHARGES:
            raise BadCost(f"this call would charge more than {MAX_CHARGES} limits, more than its log entry can record")
        if opens and not self._room_for(len(opens), now_ms):
            # Fail closed: a budget the enclave cannot track (or snapshot) is no budget.
            limit, key = opens[0]
            status = LimitStatus(limit.id, limit.kind, Decimal(0), float(limit.window_s))
            reason = (
                f"limit {limit.id!r}: the enclave already tracks {MAX_WINDOWS} budgets (limit x key) and cannot "
                f"open one for {limit.per} {key!r}; retry when older budgets expire"
            )
            return LimitCheck(False, {}, status, (*statuses, status), reason)
        return LimitCheck(True, charges, None, tuple(statuses))

    def _room_for(self, count: int, now_ms: int) -> bool:
        if len(self._windows) + count <= MAX_WINDOWS:
            return True
        self._drop_expired(now_ms)
        return len(self._windows) + count <= MAX_WINDOWS

    def _drop_expired(self, now_ms: int) -> None:
        """Forget windows with nothing left in them (and those of limits this bundle lacks)."""
        for (limit_id, key), w in list(self._windows.items()):
            limit = self._by_id.get(limit_id)
            if limit is not None:
                w.expire(now_ms - limit.window_s * 1000)
            if limit is None or not w.events:
                del self._windows[(limit_id, key)]

    def charge(self, agent: str, server: str, tool: str, charges: Mapping[str, Decimal], time_ms: int) -> None:
        roles = self.roles(agent)
        for limit_id, amount in charges.items():
            limit = self._by_id.get(limit_id)
            if limit is None or amount == 0:
                continue
            for key in _keys(limit, agent, roles, server, tool):
                w = self._windows.get((limit_id, key))
                if w is None:
                    w = self._windows[(limit_id, key)] = _Window(limit.window_s)
                w.add(time_ms, amount)

    def carry_over(self, old: LimitBook) -> None:
        """Keep the windows of limits that survive a bundle change, so an update never resets budgets."""
        for (limit_id, key), window in old._windows.items():
            limit = self._by_id.get(limit_id)
            if limit is not None:
                window.resize(limit.window_s)
                self._windows[(limit_id, key)] = window

    def replay(self, charges: Iterable[Charge], now_ms: int) -> None:
        """Rebuild windows from the charges decisions recorded (after a restart), keyed as
        `check` keys them: by the agent and the roles this bundle grants it."""
        # Every charge, x402 payments included, is recorded on the decision that made it.
        for c in charges:
            recent = {
                k: v for k, v in c.charges if k in self._by_id and c.time_ms > now_ms - self._by_id[k].window_s * 1000
            }
            self.charge(c.agent, c.server, c.tool, recent, c.time_ms)

    def snapshot(self, now_ms: int) -> list[SnapshotWindow]:
        """Every window with something in it, folded (the live windows too, so that what a resume
        rebuilds from this is what the book holds), sorted by limit id and key."""
        self._drop_expired(now_ms)
        rows: list[SnapshotWindow] = []
        for (limit_id, key), w in sorted(self._windows.items()):
            w.fold()
            rows.append((limit_id, key, w.buckets()))
        return rows

    def restore(self, rows: Iterable[SnapshotWindow], now_ms: int) -> None:
        """Windows from a snapshot, for the limits this bundle has (as `carry_over` keeps them)."""
        for limit_id, key, buckets in rows:
            limit = self._by_id.get(limit_id)
            if limit is None:
                continue
            w = _Window(limit.window_s)
            for t, amount in buckets:
                w.events.append((t, Decimal(amount)))
                w.total += Decimal(amount)
            w.expire(now_ms - limit.window_s * 1000)
            if w.events:
                self._windows[(limit_id, key)] = w

    def window_totals(self, now_ms: int) -> dict[tuple[str, str], Decimal]:
        """What each window holds at `now_ms` (tests and the bench compare books with it)."""
        self._drop_expired(now_ms)
        return {k: w.total for k, w in self._windows.items() if w.total}

    def x402_limits(self, agent: str, server: str, tool: str) -> list[str]:
        roles = self.roles(agent)
        return [lim.id for lim in self.limits if lim.cost[0] == "x402" and lim.matches(agent, roles, server, tool)]

    @property
    def max_window_s(self) -> int:
        return max((lim.window_s for lim in self.limits), default=0)
