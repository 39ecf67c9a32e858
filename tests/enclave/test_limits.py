"""The limit book on its own: rate and spend limits, sliding windows, costs, carry-over, replay.

Limits come from `limits.toml` text through the bundle's own parser (parse_limits), next to a
small entities.toml written here. Time is always passed in as milliseconds from a fixed epoch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.dev.state import example_bundle_dir
from cloister.enclave.bundle import MAX_LIMIT_VALUE, Limit, parse_entities, parse_limits, read_bundle_dir
from cloister.enclave.limits import BadCost, Charge, LimitBook, LimitCheck, charge_of
from cloister.verify.entries import DecisionEntry, OutcomeEntry, decimal_text, encode_entry, parse_entry
from tests.world import epoch_ms

pytestmark = pytest.mark.timeout(10)

T0 = epoch_ms()
SEC = 1000
MIN = 60 * SEC
HOUR = 60 * MIN

ENTITIES = """
[roles]
buyer = {}
auditor = {}
payer = {}

[agents.alice]
roles = ["buyer", "auditor"]

[agents.bob]
roles = ["buyer"]

[agents.carol]
roles = ["payer"]

[servers.shop]
tools = ["buy", "browse"]

[servers.bank]
tools = ["pay", "balance"]
"""
ROLES = {"alice": frozenset({"buyer", "auditor"}), "bob": frozenset({"buyer"}), "carol": frozenset({"payer"})}


def limits(toml: str) -> tuple[Limit, ...]:
    files = {"entities.toml": ENTITIES.encode(), "limits.toml": toml.encode()}
    roles, agents, servers = parse_entities(files)
    return parse_limits(files, roles, agents, servers)


def book(toml: str) -> LimitBook:
    return LimitBook(limits(toml), ROLES)


def rate(lid: str, per: str, maximum: int, window: str, **select: list[str]) -> str:
    lines = [f'id = "{lid}"', 'kind = "rate"', f'per = "{per}"', f'max = "{maximum}"', f'window = "{window}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in select.items()]
    return "[[limits]]\n" + "\n".join(lines) + "\n"


def spend(lid: str, per: str, maximum: str, window: str, cost: str, **select: list[str]) -> str:
    lines = [
        f'id = "{lid}"',
        'kind = "spend"',
        f'per = "{per}"',
        f'max = "{maximum}"',
        f'window = "{window}"',
        f'cost = "{cost}"',
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in select.items()]
    return "[[limits]]\n" + "\n".join(lines) + "\n"


def check(
    b: LimitBook,
    agent: str,
    server: str,
    tool: str,
    now: int,
    args: Mapping[str, Any] | None = None,
    payment: Decimal | None = None,
) -> LimitCheck:
    return b.check(agent, server, tool, args or {}, now, payment)


def call(
    b: LimitBook,
    agent: str,
    server: str,
    tool: str,
    now: int,
    args: Mapping[str, Any] | None = None,
    payment: Decimal | None = None,
) -> LimitCheck:
    """What the enclave does: check, and charge only what an allowed call charges."""
    c = check(b, agent, server, tool, now, args, payment)
    if c.ok:
        b.charge(agent, server, tool, c.charges, now)
    return c


def allowed(
    b: LimitBook,
    agent: str,
    server: str,
    tool: str,
    now: int,
    args: Mapping[str, Any] | None = None,
    payment: Decimal | None = None,
) -> bool:
    return call(b, agent, server, tool, now, args, payment).ok


# --- The example bundle ------------------------------------------------------------------------


def example_limits() -> tuple[Limit, ...]:
    """The shipped example's limits.toml, parsed against its entities (identities stripped)."""
    files = read_bundle_dir(example_bundle_dir())
    entities = re.sub(r"^identity = .*$", 'identity = { kind = "none" }', files["entities.toml"].decode(), flags=re.M)
    files["entities.toml"] = re.sub(r"^pins = .*\n", "", entities, flags=re.M).encode()
    roles, agents, servers = parse_entities(files)
    return parse_limits(files, roles, agents, servers)


def test_the_example_bundles_limits() -> None:
    refund, research = frozenset({"refund-agent"}), frozenset({"research-agent"})
    b = LimitBook(example_limits(), {"refund-bot": refund, "research-bot": research})
    assert b.max_window_s == 86400
    for i in range(10):
        c = b.check("refund-bot", "refunds", "refund.create", {"amount": 1000}, T0 + i * MIN)
        assert c.ok and c.charges == {"refund-bot-hourly-refunds": Decimal(1000), "refund-agent-call-rate": 1}
        b.charge("refund-bot", "refunds", "refund.create", c.charges, T0 + i * MIN)
    over = b.check("refund-bot", "refunds", "refund.create", {"amount": "0.01"}, T0 + 10 * MIN)
    assert not over.ok and over.denied_by is not None and over.denied_by.limit_id == "refund-bot-hourly-refunds"
    # Lookups cost nothing against the spend cap, only a call against the rate limit.
    lookup = b.check("refund-bot", "refunds", "customer_lookup", {}, T0 + 10 * MIN)
    assert lookup.ok and lookup.charges == {"refund-agent-call-rate": 1}
    # Research: a fixed price per web search, and x402 payments on any research tool.
    search = b.check("research-bot", "research", "web_search", {"query": "q"}, T0)
    assert search.ok and search.charges == {"research-daily-payments": 0, "research-search-budget": Decimal("0.002")}
    assert b.x402_limits("research-bot", "research", "deep_search") == ["research-daily-payments"]
    assert b.x402_limits("refund-bot", "refunds", "refund.create") == []


# --- Rate and spend limits per agent, role, tool, server and everyone ---------------------------


def test_rate_limit_per_agent() -> None:
    b = book(rate("r", "agent", 3, "1m"))
    assert [allowed(b, "alice", "shop", "buy", T0 + i) for i in range(4)] == [True, True, True, False]
    assert allowed(b, "bob", "shop", "buy", T0 + 5)  # bob has his own window
    assert allowed(b, "alice", "shop", "buy", T0 + MIN)  # the first call left the window


def test_rate_limit_per_role_charges_each_role_of_the_caller() -> None:
    b = book(rate("r", "role", 2, "1m"))
    first = call(b, "alice", "shop", "buy", T0)  # charges buyer and auditor
    assert first.ok and len(first.statuses) == 2
    assert allowed(b, "bob", "shop", "buy", T0)  # buyer: 2 of 2
    assert not allowed(b, "bob", "shop", "buy", T0)
    c = check(b, "alice", "shop", "buy", T0)
    assert not c.ok and c.denied_by is not None and "for role 'buyer'" in c.reason
    assert allowed(b, "carol", "bank", "pay", T0)  # payer is untouched


def test_rate_limit_per_role_with_a_role_selector_charges_only_the_selected_roles() -> None:
    b = book(rate("r", "role", 1, "1m", roles=["auditor"]))
    first = call(b, "alice", "shop", "buy", T0)
    assert first.ok and len(first.statuses) == 1  # her auditor window only, not her buyer one
    assert not allowed(b, "alice", "shop", "buy", T0)
    assert allowed(b, "bob", "shop", "buy", T0)  # not an auditor: the limit does not apply
    assert allowed(b, "bob", "shop", "buy", T0)


def test_spend_limit_per_tool_is_shared_by_agents_and_separate_per_tool() -> None:
    b = book(spend("s", "tool", "10", "1h", "argument:amount"))
    assert allowed(b, "alice", "shop", "buy", T0, {"amount": 6})
    assert not allowed(b, "bob", "shop", "buy", T0, {"amount": 5})  # shop___buy has 4 left
    assert allowed(b, "bob", "shop", "buy", T0, {"amount": 4})
    assert allowed(b, "bob", "shop", "browse", T0, {"amount": 10})
    c = check(b, "carol", "bank", "pay", T0, {"amount": "10.01"})
    assert not c.ok and "for tool 'bank___pay'" in c.reason


def test_spend_limit_per_server_covers_all_its_tools() -> None:
    b = book(spend("s", "server", "10", "1h", "argument:amount"))
    assert allowed(b, "alice", "shop", "buy", T0, {"amount": 6})
    assert not allowed(b, "bob", "shop", "browse", T0, {"amount": 5})
    assert allowed(b, "bob", "bank", "pay", T0, {"amount": 10})


def test_limit_for_everyone_and_selectors() -> None:
    b = book(rate("r", "all", 2, "1m", agents=["alice", "bob"], servers=["shop"], tools=["shop___buy"]))
    assert allowed(b, "alice", "shop", "buy", T0) and allowed(b, "bob", "shop", "buy", T0)
    assert not allowed(b, "alice", "shop", "buy", T0)
    # Calls the selectors do not match are neither limited nor charged.
    for agent, server, tool in (("carol", "shop", "buy"), ("alice", "shop", "browse"), ("bob", "bank", "pay")):
        c = call(b, agent, server, tool, T0)
        assert c.ok and c.charges == {} and c.statuses == ()


def test_a_call_must_fit_every_matching_limit_and_a_denial_charges_nothing() -> None:
    b = book(rate("calls", "agent", 5, "1m") + spend("money", "agent", "10", "1m", "argument:amount"))
    assert allowed(b, "alice", "shop", "buy", T0, {"amount": 8})
    c = call(b, "alice", "shop", "buy", T0, {"amount": 3})
    assert not c.ok and c.denied_by is not None and c.denied_by.limit_id == "money" and c.charges == {}
    # The denied call used none of the rate limit: four more calls fit.
    assert [allowed(b, "alice", "shop", "buy", T0, {"amount": "0.5"}) for _ in range(5)] == [True] * 4 + [False]


# --- Windows, exactness, denials -----------------------------------------------------------------


def test_sliding_window_expires_a_charge_exactly_at_the_boundary() -> None:
    b = book(rate("r", "agent", 1, "1m"))
    assert allowed(b, "alice", "shop", "buy", T0)
    assert not allowed(b, "alice", "shop", "buy", T0 + MIN - 1)
    assert allowed(b, "alice", "shop", "buy", T0 + MIN)
    assert not allowed(b, "alice", "shop", "buy", T0 + 2 * MIN - 1)


def test_the_window_slides_one_charge_at_a_time() -> None:
    b = book(spend("s", "agent", "10", "10s", "argument:amount"))
    for i, amount in enumerate((4, 3, 3)):
        assert allowed(b, "alice", "shop", "buy", T0 + i * SEC, {"amount": amount})
    assert not allowed(b, "alice", "shop", "buy", T0 + 10 * SEC - 1, {"amount": 1})
    assert not allowed(b, "alice", "shop", "buy", T0 + 10 * SEC, {"amount": 5})  # only the 4 left
    assert allowed(b, "alice", "shop", "buy", T0 + 10 * SEC, {"amount": 4})
    assert allowed(b, "alice", "shop", "buy", T0 + 11 * SEC, {"amount": 3})


def test_check_does_not_charge_and_check_then_charge_is_exact() -> None:
    b = book(spend("s", "agent", "10", "1h", "argument:amount"))
    for _ in range(3):
        assert check(b, "alice", "shop", "buy", T0, {"amount": 10}).ok  # checking alone charges nothing
    c = call(b, "alice", "shop", "buy", T0, {"amount": "4.25"})
    assert c.ok and c.charges == {"s": Decimal("4.25")} and c.statuses[0].remaining == Decimal("5.75")
    assert not check(b, "alice", "shop", "buy", T0, {"amount": "5.750000000001"}).ok
    last = call(b, "alice", "shop", "buy", T0, {"amount": "5.75"})  # exactly what remains
    assert last.ok and last.statuses[0].remaining == 0
    assert not check(b, "alice", "shop", "buy", T0, {"amount": "0.000000000001"}).ok
    assert check(b, "alice", "shop", "buy", T0, {"amount": 0}).ok  # a free call still fits


def test_totals_are_exact_at_the_largest_cap_and_the_finest_cost() -> None:
    b = book(spend("s", "all", str(MAX_LIMIT_VALUE), "1h", "argument:amount"))
    assert allowed(b, "alice", "shop", "buy", T0, {"amount": "999999999999999.999999999999"})
    assert allowed(b, "alice", "shop", "buy", T0 + SEC, {"amount": "0.000000000001"})
    assert not allowed(b, "alice", "shop", "buy", T0 + SEC, {"amount": "0.000000000001"})
    # Once the big charge leaves the window, exactly the small one is still counted.
    assert not allowed(b, "alice", "shop", "buy", T0 + HOUR, {"amount": str(MAX_LIMIT_VALUE)})
    assert allowed(b, "alice", "shop", "buy", T0 + HOUR, {"amount": "999999999999999.999999999999"})


def test_a_denial_reports_what_remains_and_when_to_retry() -> None:
    b = book(spend("s", "agent", "10", "1m", "argument:amount"))
    for i in range(3):
        assert allowed(b, "alice", "shop", "buy", T0 + i * 10 * SEC, {"amount": 3})
    now = T0 + 30 * SEC
    c = check(b, "alice", "shop", "buy", now, {"amount": 5})
    assert not c.ok and c.denied_by is not None and c.statuses[-1] == c.denied_by
    # 1 remains; 5 fits once the charges at T0 and T0+10s have left, at T0+70s: 40 s from now.
    assert (c.denied_by.limit_id, c.denied_by.kind, c.denied_by.remaining, c.denied_by.retry_after_s) == (
        "s",
        "spend",
        Decimal(1),
        40.0,
    )
    assert c.reason == (
        "limit 's' reached: spend of 10 per 1m for agent 'alice'; this call needs 5, 1 remains; retry in 40s"
    )
    retry = now + int(c.denied_by.retry_after_s * 1000)
    assert not check(b, "alice", "shop", "buy", retry - 1, {"amount": 5}).ok
    assert check(b, "alice", "shop", "buy", retry, {"amount": 5}).ok


def test_a_rate_denial_says_calls_and_waits_for_the_oldest_call() -> None:
    b = book(rate("r", "agent", 2, "1h"))
    assert allowed(b, "bob", "shop", "buy", T0) and allowed(b, "bob", "shop", "buy", T0 + 5 * MIN)
    c = check(b, "bob", "shop", "buy", T0 + 20 * MIN)
    assert c.denied_by is not None and c.denied_by.remaining == 0 and c.denied_by.retry_after_s == 40 * 60
    assert "calls of 2 per 1h for agent 'bob'" in c.reason and "retry in 2400s" in c.reason


def test_a_cost_larger_than_the_cap_is_denied_with_nothing_to_wait_for_but_the_window() -> None:
    b = book(spend("s", "agent", "10", "1h", "argument:amount"))
    c = check(b, "alice", "shop", "buy", T0, {"amount": 11})
    assert c.denied_by is not None and c.denied_by.remaining == 10 and c.denied_by.retry_after_s == 3600


# --- Costs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "amount"),
    [
        (7, Decimal(7)),
        (2.5, Decimal("2.5")),
        ("3.10", Decimal("3.10")),
        ("0", Decimal(0)),
        (1e-12, Decimal("1e-12")),
        ("1E+3", Decimal(1000)),
        (str(MAX_LIMIT_VALUE), MAX_LIMIT_VALUE),
        ("0.000000000001", Decimal("1e-12")),
    ],
)
def test_cost_from_an_argument(raw: object, amount: Decimal) -> None:
    b = book(spend("s", "agent", str(MAX_LIMIT_VALUE), "1h", "argument:amount"))
    c = check(b, "alice", "shop", "buy", T0, {"amount": raw})
    assert c.ok and c.charges == {"s": amount}


def test_fixed_price_per_call() -> None:
    b = book(spend("s", "agent", "0.01", "1h", "price:0.002"))
    got = [call(b, "alice", "shop", "buy", T0, {"amount": "ignored"}) for _ in range(6)]
    assert [c.ok for c in got] == [True] * 5 + [False]
    assert got[0].charges == {"s": Decimal("0.002")}
    assert got[5].denied_by is not None and got[5].denied_by.remaining == 0


def test_x402_payments() -> None:
    b = book(spend("pay", "agent", "0.10", "1d", "x402", servers=["bank"]))
    assert b.x402_limits("carol", "bank", "pay") == ["pay"]
    assert b.x402_limits("carol", "shop", "buy") == []
    # A call without a payment is let through at no charge, to learn the price.
    unpaid = call(b, "carol", "bank", "pay", T0)
    assert unpaid.ok and unpaid.charges == {"pay": 0}
    assert call(b, "carol", "bank", "pay", T0, payment=Decimal("0.06")).charges == {"pay": Decimal("0.06")}
    over = call(b, "carol", "bank", "pay", T0, payment=Decimal("0.05"))
    assert not over.ok and over.denied_by is not None and over.denied_by.remaining == Decimal("0.04")
    assert allowed(b, "carol", "bank", "pay", T0, payment=Decimal("0.04"))
    # With nothing left, even an unpriced call is refused, and it can retry when the day is over.
    broke = check(b, "carol", "bank", "pay", T0 + HOUR)
    assert not broke.ok and broke.denied_by is not None and broke.denied_by.retry_after_s == 23 * 3600
    assert check(b, "carol", "bank", "pay", T0 + 24 * HOUR).ok


def short_id(value: object) -> str:
    if isinstance(value, int) and value.bit_length() > 4000:
        return "int-of-over-a-thousand-digits"
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:16]}...{len(text)}-chars"


@pytest.mark.parametrize(
    "raw",
    [
        float("nan"),
        "NaN",
        "sNaN",
        float("inf"),
        "-Infinity",
        -1,
        "-0.01",
        "abc",
        "",
        "1,5",
        None,
        True,
        [1],
        {"value": 1},
        10**16,
        "1e16",
        "1e999999999",
        1e300,
        10**5000,
        "0.1234567890123",
        "1.0000000000000",
        "0." + "1" * 70,
        "9" * 5000,
    ],
    ids=short_id,
)
def test_bad_costs_raise_bad_cost(raw: object) -> None:
    b = book(spend("s", "agent", "10", "1h", "argument:amount"))
    args: dict[str, object] = {} if raw is None else {"amount": raw}
    with pytest.raises(BadCost, match="argument 'amount'.*limit 's'"):
        check(b, "alice", "shop", "buy", T0, args)


def test_a_bad_cost_matters_only_where_a_limit_reads_it() -> None:
    b = book(spend("s", "agent", "10", "1h", "argument:amount", tools=["shop___buy"]))
    assert check(b, "alice", "shop", "browse", T0, {"amount": "abc"}).ok


@pytest.mark.parametrize(
    "raw",
    [
        "999999999999999.999999999999",
        "0.000000000001",
        str(MAX_LIMIT_VALUE),
        "1" + "0" * 15,
        10**15,
        1e15,
        "0." + "0" * 11 + "1",
        "12345.678901234567",
        "9" * 5000,
        "0." + "1" * 70,
        1.7976931348623157e308,
    ],
    ids=short_id,
)
def test_every_cost_the_book_accepts_fits_the_decision_entry_it_is_written_to(raw: object) -> None:
    """Regression: an agent chose an amount whose digits made the enclave write a decision entry
    (charges over 64 characters, or a denial reason over 4096) that parse_entry refuses, so
    auditors could no longer read the log. Such costs are now BadCost; the rest must fit."""
    b = book(spend("s", "agent", str(MAX_LIMIT_VALUE), "1h", "argument:amount"))
    for used in (Decimal(0), MAX_LIMIT_VALUE):  # an allow, then (with the cap used up) a denial
        if used:
            b.charge("alice", "shop", "buy", {"s": used}, T0)
        try:
            c = check(b, "alice", "shop", "buy", T0, {"amount": raw})
        except BadCost:
            continue
        entry = decision(
            T0,
            "alice",
            {k: decimal_text(v) for k, v in c.charges.items()} if c.ok else {},
            "allow" if c.ok else "deny",
            reason=c.reason or "permitted",
        )
        assert parse_entry(encode_entry(entry)) == entry


# --- Carry-over and replay ---------------------------------------------------------------------


def test_carry_over_keeps_surviving_limits_and_drops_the_rest() -> None:
    v1 = book(spend("money", "agent", "10", "1h", "argument:amount") + rate("calls", "agent", 3, "1h"))
    assert allowed(v1, "alice", "shop", "buy", T0, {"amount": 8})
    assert allowed(v1, "alice", "shop", "buy", T0, {"amount": 1})
    # Version 2 keeps "money" with a lower cap, drops "calls" and adds "fresh".
    v2 = book(spend("money", "agent", "9.5", "1h", "argument:amount") + rate("fresh", "agent", 1, "1h"))
    v2.carry_over(v1)
    c = check(v2, "alice", "shop", "buy", T0 + 1, {"amount": "0.5"})
    assert c.ok and [(s.limit_id, s.remaining) for s in c.statuses] == [("money", Decimal(0)), ("fresh", Decimal(0))]
    assert not check(v2, "alice", "shop", "buy", T0 + 1, {"amount": "0.51"}).ok
    # Carried charges still leave the window when their time comes.
    assert check(v2, "alice", "shop", "buy", T0 + HOUR, {"amount": "9.5"}).ok
    # A limit dropped by version 2 and brought back by version 3 starts afresh: dropped windows
    # are not kept around.
    v3 = book(rate("calls", "agent", 3, "1h"))
    v3.carry_over(v2)
    assert [allowed(v3, "alice", "shop", "buy", T0 + 2) for _ in range(4)] == [True] * 3 + [False]
    # Without carry_over the same book would have started from nothing: the test can tell.
    assert check(
        book(spend("money", "agent", "9.5", "1h", "argument:amount")), "alice", "shop", "buy", T0 + 1, {"amount": "9.5"}
    ).ok


def decision(
    time_ms: int,
    agent: str,
    charges: dict[str, str],
    verdict: str = "allow",
    *,
    reason: str = "permitted",
    server: str = "shop",
    tool: str = "buy",
) -> DecisionEntry:
    allow = verdict == "allow"
    return DecisionEntry(
        time_ms=time_ms,
        agent=agent,
        roles=tuple(sorted(ROLES[agent])),
        issuer="test",
        server=server,
        tool=tool,
        args_sha256=b"\x01" * 32,
        decision="allow" if allow else "deny",
        code="" if allow else "limit",
        reason=reason,
        policies=(),
        policy_sha256=b"\x02" * 32,
        policy_version=1,
        request_id="",
        grant_nonce=b"\x03" * 16 if allow else None,
        grant_expiry_ms=time_ms + MIN if allow else None,
        charges=charges,
    )


def charges_of(history: list[object]) -> list[Charge]:
    """What a resume replays: the charges of the allowed decisions (outcomes and denials add none)."""
    return [c for e in history if isinstance(e, DecisionEntry) and (c := charge_of(e)) is not None]


REPLAYED = (
    spend("money", "agent", "10", "1h", "argument:amount")
    + rate("calls", "role", 4, "10m")
    + spend("shop-money", "server", "100", "1d", "argument:amount", servers=["shop"])
)


def test_replay_rebuilds_the_same_state_as_the_live_book() -> None:
    live = book(REPLAYED)
    history: list[object] = []
    plan = [
        ("alice", 0, 3),
        ("bob", 1, 4),
        ("alice", 2, 2),
        ("alice", 9, 5),
        ("bob", 11, 1),
        ("alice", 30, 4),
        ("bob", 45, 9),
        ("alice", 59, 1),
        ("bob", 61, 2),
    ]
    for agent, minute, amount in plan:
        now = T0 + minute * MIN
        c = call(live, agent, "shop", "buy", now, {"amount": amount})
        charges = {k: decimal_text(v) for k, v in c.charges.items() if v} if c.ok else {}
        entry = decision(now, agent, charges, "allow" if c.ok else "deny", reason=c.reason or "permitted")
        history.append(parse_entry(encode_entry(entry)))  # as read back from the log
    assert any(isinstance(e, DecisionEntry) and e.decision == "deny" for e in history)
    restart = T0 + 62 * MIN
    rebuilt = book(REPLAYED)
    rebuilt.replay(charges_of(history), restart)
    for minute in (62, 65, 70, 75, 90, 24 * 60):
        for who in ("alice", "bob"):
            for cost in ("0", "1", "4", "9.5", "100"):
                want = check(live, who, "shop", "buy", T0 + minute * MIN, {"amount": cost})
                got = check(rebuilt, who, "shop", "buy", T0 + minute * MIN, {"amount": cost})
                assert got == want, (minute, who, cost)


def test_replay_skips_denials_other_entries_old_charges_and_unknown_limits() -> None:
    b = book(spend("money", "agent", "10", "1h", "argument:amount"))
    history: list[object] = [
        # An outcome's payment was already charged on its decision: it must not count twice.
        OutcomeEntry(time_ms=T0 - MIN, decision_index=4, result_sha256=None, error="", duration_us=5, paid="5"),
        decision(T0 - HOUR, "alice", {"money": "9"}),  # left the window exactly at T0
        decision(T0 - 10 * MIN, "alice", {"money": "2", "gone": "5"}),
        decision(T0 - 5 * MIN, "alice", {"money": "7"}, "deny", reason="limit"),
        decision(T0 - MIN, "bob", {"money": "10"}),
    ]
    b.replay(charges_of(history), T0)
    assert check(b, "alice", "shop", "buy", T0, {"amount": 8}).ok
    assert not check(b, "alice", "shop", "buy", T0, {"amount": "8.01"}).ok
    assert not check(b, "bob", "shop", "buy", T0, {"amount": "0.01"}).ok
    assert check(b, "bob", "shop", "buy", T0 + 59 * MIN, {"amount": 10}).ok


# --- The cap holds, and denials are never needless ---------------------------------------------

CAP = Decimal(10)
CALLS = 6
WINDOW_MS = 10 * SEC


# Steps between calls that add up to the window's length often, and land 1 ms either side of it.
STEPS = st.one_of(
    st.sampled_from([0, 1, 2499, 2500, 2501, 5000, 9999, WINDOW_MS, 10001]), st.integers(0, 2 * WINDOW_MS)
)
COSTS = st.one_of(st.integers(0, 11).map(Decimal), st.integers(0, 1100).map(lambda c: Decimal(c).scaleb(-2)))
CENT = Decimal("0.01")


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.data())
def test_no_window_ever_holds_more_than_the_cap(data: st.DataObject) -> None:
    """Random calls by two agents against a spend cap shared by all and a per-agent rate limit.

    Costs are random or, as often, exactly what remains give or take a cent (computed here from
    the charges made so far, independently of the book): every allowed call leaves every window
    within both limits, and every refused call really did not fit.
    """
    b = book(spend("money", "all", str(CAP), "10s", "argument:amount") + rate("calls", "agent", CALLS, "10s"))
    charged: list[tuple[int, str, Decimal]] = []
    now = T0

    def in_window(t: int) -> list[tuple[int, str, Decimal]]:
        return [c for c in charged if t - WINDOW_MS < c[0] <= t]

    for _ in range(data.draw(st.integers(0, 40), label="calls")):
        agent = data.draw(st.sampled_from(["alice", "bob"]), label="agent")
        now += data.draw(STEPS, label="step")
        before = in_window(now)
        spent = sum((c[2] for c in before), Decimal(0))
        calls = sum(1 for c in before if c[1] == agent)
        edge = [x for x in (CAP - spent - CENT, CAP - spent, CAP - spent + CENT) if x >= 0]
        cost = data.draw(st.one_of(COSTS, st.sampled_from(edge)), label="cost")
        c = call(b, agent, "shop", "buy", now, {"amount": str(cost)})
        if c.ok:
            charged.append((now, agent, cost))
            window = in_window(now)
            assert sum((x[2] for x in window), Decimal(0)) <= CAP
            assert sum(1 for x in window if x[1] == agent) <= CALLS
        else:  # exact: a call is refused only when it really does not fit
            assert spent + cost > CAP or calls + 1 > CALLS
