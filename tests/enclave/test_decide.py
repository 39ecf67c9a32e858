"""`decide()`, the one decision: each step on its own, then the enclave and `policy explain` on the
same inputs, which must agree."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cloister.dev.examples.payments import payment as x402_payment
from cloister.enclave.bundle import PolicyBundle, ServerSpec, read_bundle_dir
from cloister.enclave.decide import (
    Call,
    Decision,
    Identity,
    State,
    Step,
    decide,
    decide_before_limits,
    decide_limits,
    principal_from_token,
)
from cloister.enclave.limits import LimitBook
from cloister.enclave.policy import Principal
from cloister.policytools.explain import ClaimedIdentity, explain
from cloister.policytools.validate import validate_files
from cloister.verify.entries import DecisionEntry, parse_entry
from tests.world import World, epoch_ms, make_world


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("decide"))


class Servers:
    """A ServerView: every server proven unless `refused` names it; input schemas as given."""

    def __init__(
        self, refused: dict[str, str] | None = None, schemas: dict[tuple[str, str], dict[str, Any]] | None = None
    ) -> None:
        self.refused = refused or {}
        self.schemas = schemas or {}

    def refusal(self, spec: ServerSpec, tool: str, now_ms: int) -> str | None:
        return self.refused.get(spec.name)

    def input_schema(self, server: str, tool: str) -> dict[str, Any] | None:
        return self.schemas.get((server, tool))


@dataclass(frozen=True)
class BearerToken:
    """A token verified on every call (the enclave caches it)."""

    token: str

    def principal(self, bundle: PolicyBundle, now_ms: int) -> Principal:
        return principal_from_token(bundle, self.token, now_ms)[0]


class Nobody:
    """An identity that must not be asked (a step before identity has denied)."""

    def principal(self, bundle: PolicyBundle, now_ms: int) -> Principal:
        raise AssertionError("identity was consulted")


def state(w: World, servers: Servers | None = None, limits: LimitBook | None = None) -> State:
    ps = w.core.policy
    assert ps is not None
    return State(ps.bundle, ps.engine, servers or Servers(), limits or LimitBook.for_bundle(ps.bundle))


def call(
    w: World,
    identity: Identity | None = None,
    *,
    server: str = "refunds",
    tool: str = "customer_lookup",
    args: object = None,
    raw: bytes | None = None,
    payment: str = "",
    now_ms: int | None = None,
) -> Call:
    data = raw if raw is not None else json.dumps({} if args is None else args).encode()
    return Call(
        identity=identity or ClaimedIdentity("refund-bot", ("refund-agent",)),
        server=server,
        tool=tool,
        arguments_json=data,
        payment_amount="" if payment.startswith("{") else payment,
        now_ms=w.clock.ms if now_ms is None else now_ms,
        payment=payment.encode() if payment.startswith("{") else b"",
    )


def pay(amount: str) -> str:
    """An x402 payment payload (JSON) of `amount` USDC to research, as the example bundle accepts."""
    return json.dumps(x402_payment(amount, now_s=epoch_ms() // 1000))


RESEARCH = ClaimedIdentity("research-bot", ("research-agent",))


# ---- each step ------------------------------------------------------------------------------------


def test_step_1_arguments_come_first(w: World) -> None:
    raw = b'{"a": 1, "a": 2}'
    d = decide(call(w, Nobody(), raw=raw), state(w))
    assert (d.code, d.step, d.principal) == ("bad-arguments", Step.ARGUMENTS, None)
    assert "duplicate member name" in d.reason and d.args_sha256 == hashlib.sha256(raw).digest()
    assert decide(call(w, Nobody(), raw=b"[1]"), state(w)).reason == "arguments: must be a JSON object"
    for bad in ("abc", "-1", "0", "Infinity"):
        d = decide(call(w, Nobody(), payment=bad), state(w))
        assert (d.code, d.step, d.payment) == ("bad-arguments", Step.ARGUMENTS, None)
        assert d.reason == f"x402 payment amount {bad!r} is not a positive decimal"
    ok = decide(call(w, args={"customer_id": "c"}, payment="0.5"), state(w))
    assert ok.allowed and ok.payment == Decimal("0.5") and ok.arguments == {"customer_id": "c"}


def test_step_2_identity_is_a_token_or_a_claimed_principal(w: World) -> None:
    missing = decide(call(w, BearerToken("")), state(w))
    assert (missing.code, missing.step) == ("unauthenticated", Step.IDENTITY)
    assert missing.reason.startswith("missing: no bearer token")
    stranger = decide(call(w, BearerToken(w.token("mallory-bot", []))), state(w))
    assert (stranger.code, stranger.reason) == (
        "unknown-agent",
        "unknown-agent: agent 'mallory-bot' is not registered in the policy bundle",
    )
    claimed = decide(call(w, ClaimedIdentity("research-bot", ("research-agent", "refund-agent"))), state(w))
    assert (claimed.code, claimed.reason) == (
        "unauthenticated",
        "role-not-granted: the bundle does not grant role 'refund-agent' to agent 'research-bot'",
    )
    token = w.token("refund-bot", ["refund-agent"], ttl=600)
    good = decide(call(w, BearerToken(token)), state(w))
    assert good.allowed and good.principal == Principal("refund-bot", frozenset({"refund-agent"}), "cloister-dev")
    # The time is the call's, never a clock: the same token, an hour later, has expired.
    late = decide(call(w, BearerToken(token), now_ms=w.clock.ms + 3_600_000), state(w))
    assert late.code == "unauthenticated" and late.reason.startswith("expired")


def test_step_3_the_server_and_tool_must_be_the_bundles(w: World) -> None:
    d = decide(call(w, server="billing", tool="charge"), state(w))
    assert (d.code, d.step, d.reason) == (
        "unknown-server",
        Step.SERVER_AND_TOOL,
        "server 'billing' is not in the policy bundle",
    )
    d = decide(call(w, tool="delete_all"), state(w))
    assert (d.code, d.step) == ("unknown-tool", Step.SERVER_AND_TOOL)


def test_step_4_quarantine_comes_before_cedar(w: World) -> None:
    servers = Servers(refused={"refunds": "server 'refunds' is quarantined: not attested yet"})
    # A call Cedar would forbid is refused as quarantined: Cedar is never asked.
    d = decide(call(w, tool="refund.create", args={"amount": 6000}), state(w, servers))
    assert (d.code, d.step, d.reason, d.policy_ids) == (
        "quarantined",
        Step.QUARANTINE,
        "server 'refunds' is quarantined: not attested yet",
        (),
    )


def test_step_5_cedar_with_the_servers_input_schema(w: World) -> None:
    d = decide(call(w, tool="refund.create", args={"amount": 6000}), state(w))
    assert (d.code, d.step, d.policy_ids) == ("policy", Step.CEDAR, ("refund-single-cap",))
    allowed = decide(call(w, tool="refund.create", args={"amount": 100}), state(w))
    assert allowed.allowed and allowed.reason == "permitted by refund-agent-tools"
    # The view's input schema types the arguments: an integer amount is a Long, which the
    # decimal comparison cannot take, so the forbid errors and fails closed.
    integer = Servers(
        schemas={("refunds", "refund.create"): {"type": "object", "properties": {"amount": {"type": "integer"}}}}
    )
    typed = decide(call(w, tool="refund.create", args={"amount": 100}), state(w, integer))
    assert (typed.code, typed.policy_ids) == ("policy", ("refund-single-cap",)) and "failing closed" in typed.reason
    none = decide(call(w, RESEARCH, server="research", tool="db_write", args={"key": "k"}), state(w))
    assert (none.code, none.step, none.policy_ids) == ("no-permit", Step.CEDAR, ())


def test_step_6_limits_check_and_never_charge(w: World) -> None:
    book = LimitBook.for_bundle(w.core.policy.bundle)  # type: ignore[union-attr]
    st = state(w, limits=book)
    paid = call(w, RESEARCH, server="research", tool="deep_search", args={"query": "q"}, payment=pay("0.06"))
    for _ in range(3):  # checked, not charged: the same answer every time
        d = decide(paid, st)
        assert d.allowed and d.charges == {"research-daily-payments": "0.06"}
    book.charge(
        "research-bot",
        "research",
        "deep_search",
        {"research-daily-payments": Decimal("0.06")},
        w.clock.ms,
    )
    over = decide(paid, st)
    assert (over.code, over.step, over.charges) == ("limit", Step.LIMITS, {})
    assert over.limit_check is not None and over.limit_check.denied_by is not None
    assert "0.04 remains" in over.reason
    # Steps 1-5 and step 6 apart, as the enclave runs them (step 6 under its sequencer lock).
    pending = decide_before_limits(paid, st)
    assert pending.allowed and pending.limit_check is None
    assert decide_limits(paid, pending, st.limits) == over
    cost = decide(call(w, tool="refund.create", args={"amount": -5}), st)
    assert (cost.code, cost.step) == ("bad-arguments", Step.LIMITS) and "non-negative" in cost.reason


def test_log_only_lets_policy_and_limit_denials_through_only() -> None:
    for code, through in (
        ("policy", True),
        ("no-permit", True),
        ("limit", True),
        ("quarantined", False),
        ("unauthenticated", False),
        ("bad-arguments", False),
        ("", True),
    ):
        d = Decision(mode="log-only", args_sha256=b"", code=code, denial="x")
        assert d.goes_through is through and d.log_only is (bool(code) and through)
        assert not Decision(mode="enforce", args_sha256=b"", code=code, denial="x").log_only


# ---- the enclave and explain agree ----------------------------------------------------------------

LOG_ONLY = {"bundle.toml": '[bundle]\nname = "v2"\nmode = "log-only"\n'}


@dataclass(frozen=True)
class Case:
    name: str
    agent: str
    roles: tuple[str, ...]  # the token's roles (explain: --role)
    server: str
    tool: str
    args: object
    code: str  # what both must decide
    payment: str = ""
    edits: dict[str, str] = field(default_factory=dict)  # a bundle version 2
    identities: bool = False  # the example's upstream identities (refunds: nitro, research: checksum)
    prove_refunds: bool = False
    attestation: str | None = None  # explain's view of the called server


REFUND = ("refund-bot", ("refund-agent",))
SEARCH = ("research-bot", ("research-agent",))
CASES = [
    Case("allow", *REFUND, "refunds", "customer_lookup", {"customer_id": "cus_1001"}, ""),
    Case("allow-spend", *REFUND, "refunds", "refund.create", {"customer_id": "c", "amount": 700}, ""),
    Case("forbid", *REFUND, "refunds", "refund.approve_above_threshold", {"refund_id": "r"}, "policy"),
    Case("forbid-argument", *REFUND, "refunds", "refund.create", {"amount": 6000}, "policy"),
    Case("forbid-fails-closed", *REFUND, "refunds", "refund.create", {"amount": "lots"}, "policy"),
    Case("no-permit", *SEARCH, "research", "db_write", {"key": "k", "value": "v"}, "no-permit"),
    Case("unknown-server", *REFUND, "billing", "charge", {}, "unknown-server"),
    Case("unknown-tool", *REFUND, "refunds", "delete_all", {}, "unknown-tool"),
    Case("unknown-agent", "mallory-bot", (), "refunds", "customer_lookup", {}, "unknown-agent"),
    Case("role-not-granted", "research-bot", ("refund-agent",), "refunds", "customer_lookup", {}, "unauthenticated"),
    Case("bad-arguments", *REFUND, "refunds", "customer_lookup", [1, 2], "bad-arguments"),
    Case("bad-cost", *REFUND, "refunds", "refund.create", {"customer_id": "c", "amount": -500}, "bad-arguments"),
    Case("bad-payment", *SEARCH, "research", "deep_search", {"query": "q"}, "bad-arguments", payment="abc"),
    Case("x402-unpaid", *SEARCH, "research", "deep_search", {"query": "q"}, ""),
    Case("x402-paid", *SEARCH, "research", "deep_search", {"query": "q"}, "", payment=pay("0.06")),
    Case("x402-over-cap", *SEARCH, "research", "deep_search", {"query": "q"}, "limit", payment=pay("0.25")),
    Case("fixed-price", *SEARCH, "research", "web_search", {"query": "q"}, ""),
    Case(
        "log-only-forbid",
        *REFUND,
        "refunds",
        "refund.approve_above_threshold",
        {"refund_id": "r"},
        "policy",
        edits=LOG_ONLY,
    ),
    Case(
        "log-only-over-cap",
        *SEARCH,
        "research",
        "deep_search",
        {"query": "q"},
        "limit",
        payment=pay("0.25"),
        edits=LOG_ONLY,
    ),
    Case(
        "log-only-unknown-agent", "mallory-bot", (), "refunds", "customer_lookup", {}, "unknown-agent", edits=LOG_ONLY
    ),
    Case(
        "quarantined-nitro",
        *REFUND,
        "refunds",
        "customer_lookup",
        {},
        "quarantined",
        identities=True,
        attestation="unverified",
    ),
    Case(
        "quarantined-checksum",
        *SEARCH,
        "research",
        "web_search",
        {"query": "q"},
        "quarantined",
        identities=True,
        attestation="unverified",
    ),
    Case(
        "quarantined-before-cedar",
        *REFUND,
        "refunds",
        "refund.create",
        {"amount": 6000},
        "quarantined",
        identities=True,
        attestation="unverified",
    ),
    Case("proven", *REFUND, "refunds", "customer_lookup", {}, "", identities=True, prove_refunds=True),
    Case(
        "proven-forbid",
        *REFUND,
        "refunds",
        "refund.create",
        {"amount": 6000},
        "policy",
        identities=True,
        prove_refunds=True,
    ),
]


def prove_refunds(w: World) -> None:
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_explain_decides_what_the_enclave_decides(tmp_path: Path, case: Case) -> None:
    world = make_world(tmp_path, identities=case.identities)
    if case.prove_refunds:
        prove_refunds(world)
    if case.edits:
        world.persist(world.core.load_policy(world.sign_bundle(2, dict(case.edits)))[2])
    arguments = json.dumps(case.args)
    v = world.core.authorize(
        token=world.token(case.agent, list(case.roles)),
        server=case.server,
        tool=case.tool,
        arguments_json=arguments.encode(),
        request_id="",
        persisted_size=len(world.log),
        payment_amount="" if case.payment.startswith("{") else case.payment,
        payment=case.payment.encode() if case.payment.startswith("{") else b"",
    )
    world.persist(v.log)
    entry = parse_entry(world.log[v.log_index])
    assert isinstance(entry, DecisionEntry)

    files = read_bundle_dir(world.bundle_dir)
    files.update({path: text.encode() for path, text in case.edits.items()})
    ex = explain(
        validate_files(files),
        agent=case.agent,
        roles=list(case.roles) or None,
        server=case.server,
        tool=case.tool,
        arguments_json=arguments,
        at=world.clock.datetime(),
        attestation=case.attestation,
        payment=case.payment,
    )

    assert entry.code == case.code, entry.reason  # the table covers what it says it covers
    assert (ex.decision, ex.code, [p["id"] for p in ex.policies]) == (entry.decision, entry.code, list(entry.policies))
    # Log-only: a denial that goes through in the enclave is not enforced in explain.
    assert ex.enforced is not (v.allowed and entry.decision == "deny")
    # The same reason, except where explain restates it for what it assumes (quarantine: which
    # level it took; a limit: that it cannot pass even on an empty book).
    if entry.code not in ("quarantined", "limit"):
        assert ex.reason == entry.reason
