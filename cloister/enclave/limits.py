"""Rate limits and spend caps: state Cedar cannot hold, kept exactly in the enclave.

Each limit keeps, per key (an agent, a role, a tool, a server, or everyone), the charges made
inside a sliding window. A call is allowed only if every matching limit has room for its
cost; the check and the charge happen under the sequencer lock together with the decision's
append, so concurrent calls can never overshoot a cap. Costs are Decimals, never floats.

The state is rebuilt after a restart from the decision entries' recorded charges.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from cloister.enclave.bundle import MAX_COST_PLACES, MAX_LIMIT_VALUE, Limit, PolicyBundle, action_id
from cloister.verify.entries import DECISION_FIELDS, decimal_text

__all__ = ["MAX_CHARGES", "MAX_COST_PLACES", "BadCost", "LimitBook", "LimitCheck", "LimitStatus"]
# A decision entry records what the call charged each limit, in a map this large at most.
MAX_CHARGES = DECISION_FIELDS["charges"].max_len


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
    __slots__ = ("events", "total")

    def __init__(self) -> None:
        self.events: deque[tuple[int, Decimal]] = deque()
        self.total = Decimal(0)

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
            charges[limit.id] = cost
        if sum(1 for c in charges.values() if c) > MAX_CHARGES:
            raise BadCost(f"this call would charge more than {MAX_CHARGES} limits, more than its log entry can record")
        return LimitCheck(True, charges, None, tuple(statuses))

    def charge(self, agent: str, server: str, tool: str, charges: Mapping[str, Decimal], time_ms: int) -> None:
        roles = self.roles(agent)
        for limit_id, amount in charges.items():
            limit = self._by_id.get(limit_id)
            if limit is None or amount == 0:
                continue
            for key in _keys(limit, agent, roles, server, tool):
                w = self._windows.setdefault((limit_id, key), _Window())
                w.events.append((time_ms, amount))
                w.total += amount

    def carry_over(self, old: LimitBook) -> None:
        """Keep the windows of limits that survive a bundle change, so an update never resets budgets."""
        for (limit_id, key), window in old._windows.items():
            if limit_id in self._by_id:
                self._windows[(limit_id, key)] = window

    def replay(self, history: Iterable[object], first_index: int, now_ms: int) -> None:
        """Rebuild windows from log entries (after a restart), from their recorded charges, keyed
        as `check` keys them: by the agent and the roles this bundle grants it."""
        from cloister.verify.entries import DecisionEntry

        # Every charge, x402 payments included, is recorded on the decision that made it.
        for e in history:
            if isinstance(e, DecisionEntry) and e.decision == "allow":
                charges = {k: Decimal(v) for k, v in e.charges.items() if k in self._by_id}
                recent = {k: v for k, v in charges.items() if e.time_ms > now_ms - self._by_id[k].window_s * 1000}
                self.charge(e.agent, e.server, e.tool, recent, e.time_ms)

    def x402_limits(self, agent: str, server: str, tool: str) -> list[str]:
        roles = self.roles(agent)
        return [lim.id for lim in self.limits if lim.cost[0] == "x402" and lim.matches(agent, roles, server, tool)]

    @property
    def max_window_s(self) -> int:
        return max((lim.window_s for lim in self.limits), default=0)
