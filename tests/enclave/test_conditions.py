"""The example bundle's conditions, each shown working: arguments, residency, attestation level
per category, time windows, discovery scoping."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cloister.dev.examples.payments import payment as x402_payment
from cloister.verify.entries import DecisionEntry, parse_entry
from tests.world import Clock, World, make_world


def at(hour: int) -> int:
    return int(datetime(2026, 11, 26, hour, 30, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
def w(tmp_path: Path) -> World:
    # The scenario's clock exists before the world, so the mock CA is born on it too.
    w = make_world(tmp_path, identities=True, clock=Clock(at(10)))
    # Prove refunds' identity the way the relay would, with the mock NSM and the pinned PCR0.
    from cloister.dev.examples.refunds import expected_pcr0

    nonce, _ = w.core.server_challenge("refunds", reconnect=True)
    doc = w.mock_nsm({0: expected_pcr0()}).attestation(nonce=nonce)
    rep, a = w.core.report_server(
        server="refunds",
        attestation=doc,
        artifact=b"",
        certificates=[],
        tools_json=b"",
        failure="",
        evidence=True,
        persisted_size=len(w.log),
    )
    w.persist(a)
    assert rep.status == "verified", rep.detail
    return w


def decide(w: World, agent: str, roles: list[str], server: str, tool: str, args: dict[str, object]):  # type: ignore[no-untyped-def]
    v = w.core.authorize(
        token=w.token(agent, roles),
        server=server,
        tool=tool,
        arguments_json=json.dumps(args).encode(),
        request_id="",
        persisted_size=len(w.log),
    )
    w.persist(v.log)
    assert isinstance(parse_entry(v.log.entries[0]), DecisionEntry)
    return v


def test_argument_condition(w: World) -> None:
    assert decide(w, "refund-bot", ["refund-agent"], "refunds", "refund.create", {"amount": 5000}).allowed
    v = decide(w, "refund-bot", ["refund-agent"], "refunds", "refund.create", {"amount": 6000})
    assert not v.allowed and v.policy_ids == ("refund-single-cap",)
    v = decide(w, "refund-bot", ["refund-agent"], "refunds", "refund.create", {"amount": 5000.5})
    assert not v.allowed and v.policy_ids == ("refund-single-cap",)
    # Regression: a value the condition cannot compare made Cedar skip the forbid (and an earlier
    # version of the example compared decimals with `>`, so 5000.5 slipped through). An unevaluable
    # forbid now denies.
    v = decide(w, "refund-bot", ["refund-agent"], "refunds", "refund.create", {"amount": "lots"})
    assert not v.allowed and v.policy_ids == ("refund-single-cap",) and "failing closed" in v.reason


def test_attestation_level_for_payments(w: World) -> None:
    assert decide(w, "refund-bot", ["refund-agent"], "refunds", "customer_lookup", {}).allowed
    # Another reconnect revokes the proof: a payments call is refused until it is proven again.
    w.core.server_challenge("refunds", reconnect=True)
    v = decide(w, "refund-bot", ["refund-agent"], "refunds", "customer_lookup", {})
    assert not v.allowed and v.code == "quarantined"


def test_residency(w: World, tmp_path: Path) -> None:
    # A bundle where an EU agent may use the US research server by role: residency still forbids it.
    entities = (w.bundle_dir / "entities.toml").read_text()
    entities = entities.replace(
        '[agents.research-bot]\nroles = ["research-agent"]\nregion = "us"',
        '[agents.research-bot]\nroles = ["research-agent"]\nregion = "eu"',
    )
    entities = entities.replace('identity = { kind = "checksum"', 'identity = { kind = "none" }\n#')
    entities = entities.replace("pins = { web_search", "# pins = { web_search")
    w.persist(w.core.load_policy(w.sign_bundle(2, {"entities.toml": entities}))[2])
    v = decide(w, "research-bot", ["research-agent"], "research", "web_search", {"query": "x"})
    assert not v.allowed and v.policy_ids == ("eu-agents-stay-in-eu",)


@pytest.mark.parametrize(("hour", "allowed"), [(7, False), (8, True), (19, True), (20, False), (23, False)])
def test_time_window(w: World, hour: int, allowed: bool) -> None:
    w.clock.ms = at(hour)
    w.clock.ms -= 30 * 60 * 1000  # on the hour
    # Refresh refunds' proof at this time, then ask as a supervisor.
    from cloister.dev.examples.refunds import expected_pcr0

    nonce, _ = w.core.server_challenge("refunds", reconnect=True)
    doc = w.mock_nsm({0: expected_pcr0()}).attestation(nonce=nonce)
    w.persist(
        w.core.report_server(
            server="refunds",
            attestation=doc,
            artifact=b"",
            certificates=[],
            tools_json=b"",
            failure="",
            evidence=True,
            persisted_size=len(w.log),
        )[1]
    )
    entities = (
        (w.bundle_dir / "entities.toml")
        .read_text()
        .replace(
            '[agents.refund-bot]\nroles = ["refund-agent"]',
            '[agents.refund-bot]\nroles = ["refund-agent", "refund-supervisor"]',
        )
    )
    w.persist(w.core.load_policy(w.sign_bundle(2, {"entities.toml": entities}))[2])
    v = decide(w, "refund-bot", ["refund-supervisor"], "refunds", "refund.approve_above_threshold", {"refund_id": "r"})
    assert v.allowed is allowed, v.reason
    if not allowed:
        assert v.policy_ids == ("approvals-in-business-hours",)


def test_discovery_scoping(w: World) -> None:
    everything = [
        ("refunds", "customer_lookup"),
        ("refunds", "refund.create"),
        ("research", "web_search"),
        ("research", "db_write"),
    ]
    _, seen = w.core.visible_tools(w.token("research-bot", ["research-agent"]), everything)
    assert ("refunds", "customer_lookup") not in seen  # no permit reaches refunds for this role
    _, seen = w.core.visible_tools(w.token("refund-bot", ["refund-agent"]), everything)
    assert ("refunds", "customer_lookup") in seen and ("research", "web_search") not in seen


def test_an_oversize_bundle_is_refused_and_the_running_one_kept(w: World) -> None:
    from cloister.enclave.core import PolicyRefused

    with pytest.raises(Exception, match="limit"):
        w.sign_bundle(9, {"policies/huge.cedar": "// " + "x" * (9 << 20)})
    with pytest.raises(PolicyRefused, match="exceeds the limit"):
        w.core.load_policy(b"\xd2" + b"\x00" * (9 << 20))
    assert w.core.policy is not None and w.core.policy.version == 1


def test_x402_payments_are_charged_exactly_and_survive_a_restart(tmp_path: Path) -> None:
    from tests.enclave.test_resume import material

    w = make_world(tmp_path)  # no identities: research needs no checksum here
    tok = w.token("research-bot", ["research-agent"])

    def paid(amount: str):  # type: ignore[no-untyped-def]
        v = w.core.authorize(
            token=tok,
            server="research",
            tool="deep_search",
            arguments_json=b'{"query": "q"}',
            request_id="",
            persisted_size=len(w.log),
            payment=usdc(amount),
        )
        w.persist(v.log)
        return v

    def usdc(amount: str) -> bytes:
        """An x402 payment of `amount` USDC (as the example's research accepts), b"" for none."""
        if not amount:
            return b""
        try:
            body = x402_payment(amount, now_s=w.clock.seconds(), nonce=amount)
        except ArithmeticError:  # not a number: sent as the authorisation's value, as written
            body = x402_payment(now_s=w.clock.seconds(), value=amount)
        return json.dumps(body).encode()

    unpaid = paid("")
    assert unpaid.allowed  # the upstream will answer -32402 with its price
    first = paid("0.06")
    entry = parse_entry(w.log[first.log_index])
    assert first.allowed and isinstance(entry, DecisionEntry)
    assert entry.charges == {"research-daily-payments": "0.06"}
    over = paid("0.05")
    assert not over.allowed and over.code == "limit" and "0.04 remains" in over.reason
    assert paid("0.04").allowed
    assert not paid("0.000001").allowed  # exactly at the cap: nothing left
    assert not paid("-1").allowed and not paid("abc").allowed
    # After an enclave restart the day's payments still count.
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    fresh = w.new_core()
    w.persist(fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    w.persist(fresh.load_policy(w.sign_bundle(1))[2])
    v = fresh.authorize(
        token=tok,
        server="research",
        tool="deep_search",
        arguments_json=b'{"query": "q"}',
        request_id="",
        persisted_size=len(w.log),
        payment=usdc("0.01"),
    )
    assert not v.allowed and v.code == "limit"


def test_fixed_price_per_call(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    tok = w.token("research-bot", ["research-agent"])
    for i in range(250):
        v = w.core.authorize(
            token=tok,
            server="research",
            tool="web_search",
            arguments_json=b'{"query": "q"}',
            request_id="",
            persisted_size=len(w.log),
        )
        w.persist(v.log)
        assert v.allowed, (i, v.reason)
        entry = parse_entry(w.log[v.log_index])
        assert isinstance(entry, DecisionEntry) and entry.charges == {"research-search-budget": "0.002"}
    v = w.core.authorize(
        token=tok,
        server="research",
        tool="web_search",
        arguments_json=b'{"query": "q"}',
        request_id="",
        persisted_size=len(w.log),
    )
    assert not v.allowed and "research-search-budget" in v.reason and "needs 0.002, 0 remains" in v.reason
