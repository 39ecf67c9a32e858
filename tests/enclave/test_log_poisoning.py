"""Issue 9, items 1 and 3: no request, however hostile, makes the enclave log an entry its own parser
refuses, grow the log at will, or act for an agent it should not.

The properties run hostile tokens, names, request ids, arguments, costs, payments, upstream errors
and server reports through `EnclaveCore` (the in-process world of tests/world.py) and require, for
every answer: each entry parses with `parse_entry` and the checkpoint that comes with it covers it;
then, once per property, that a fresh enclave resumes the stored log. The regression tests are
named after the attacks the issue reports; each fails on the code before the fix.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloister.audit.replay import DENIED_UNLOGGED
from cloister.enclave.anonymous import PER_WINDOW, WINDOW_MS
from cloister.enclave.core import LogAppend, PolicyRefused, Verdict
from cloister.verify.checkpoint import parse_checkpoint
from cloister.verify.entries import (
    MAX_ENTRY_BYTES,
    DecisionEntry,
    DenialsEntry,
    Entry,
    OutcomeEntry,
    ServerEntry,
    parse_entry,
)
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.jwt import encode_jwt
from cloister.verify.note import parse_note
from tests.audit.clirun import cli
from tests.audit.logbuilder import write_tiles
from tests.enclave.test_resume import material
from tests.world import BUNDLE_VALIDITY_S, ORIGIN, World, epoch_ms, make_world

FEW = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
MANY = settings(FEW, max_examples=500)

# ---- what must hold after every answer, and at the end ----------------------------------------


def persist(w: World, a: LogAppend) -> list[Entry]:
    """Store an answer's entries as the parent does; each parses, and its checkpoint covers them."""
    w.persist(a)
    size = parse_checkpoint(parse_note(a.checkpoint.note).text).size
    assert size >= a.first_index + len(a.entries)
    out = []
    for data in a.entries:
        assert len(data) <= MAX_ENTRY_BYTES
        out.append(parse_entry(data))
    return out


def authorize(
    w: World,
    token: str,
    server: str = "refunds",
    tool: str = "customer_lookup",
    args: Mapping[str, Any] | bytes = b"{}",
    *,
    request_id: str = "t",
    payment: str = "",
) -> Verdict:
    raw = args if isinstance(args, bytes) else json.dumps(args).encode()
    v = w.core.authorize(
        token=token,
        server=server,
        tool=tool,
        arguments_json=raw,
        request_id=request_id,
        persisted_size=len(w.log),
        payment_amount=payment,
    )
    persist(w, v.log)
    return v


def replay(w: World) -> dict[str, Any]:
    """`cloister audit replay` on the stored log (tlog-tiles in a directory), trusting the world's
    mock NSM root: it must verify, and its summary is returned."""
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    directory = w.root / "replay"
    write_tiles(directory, list(w.log), w.checkpoints[-1])
    r = cli(
        "audit",
        "replay",
        "--log",
        str(directory),
        "--trust-root",
        str(w.root / "mock-nsm" / "root.pem"),
        "--state",
        str(w.root / "auditor"),
        "--no-progress",
        "--json",
    )
    summary: dict[str, Any] = json.loads(r.out)
    # These worlds authorize calls and (mostly) never report their outcomes, on purpose: the
    # replay's only complaint may be those allowed decisions without an outcome.
    assert r.code == 0 or summary["problem_count"] == summary["missing_outcomes"], r.err
    return summary


def assert_log_sound(w: World, bundle: bytes | None = None) -> dict[str, Any]:
    """Every stored entry parses and `cloister audit replay` verifies the log; a fresh enclave
    resumes it and loads the bundle in force again (`bundle`, the bytes loaded; by default the
    world's first, as make_world signed it), and the replay still verifies after that restart."""
    for data in w.log:
        parse_entry(data)
    replay(w)
    fresh = w.new_core()
    persist(w, fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    assert w.core.policy is not None
    if bundle is None:
        bundle = w.sign_bundle(1, not_after=epoch_ms() // 1000 + BUNDLE_VALIDITY_S)
    version, _, a = fresh.load_policy(bundle)
    persist(w, a)
    assert version == w.core.policy.version
    w.core = fresh
    return replay(w)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned(header: object, claims: object, signature: bytes = b"\x00" * 64) -> str:
    """A token whose parts are any JSON values (not signed by anyone the bundle trusts)."""
    return ".".join(b64(json.dumps(part).encode()) for part in (header, claims)) + "." + b64(signature)


# ---- hostile values ---------------------------------------------------------------------------

# Any code point, lone surrogates and NUL included.
_char = st.characters(codec=None, categories=None)
# Short texts of anything, and long runs (cheap to make, thousands of characters).
hostile_text = st.one_of(
    st.text(_char, max_size=40),
    st.builds(lambda c, n: c * n, st.text(_char, min_size=1, max_size=3), st.integers(100, 6000)),
)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**60), 10**60),
    st.builds(lambda n: 10**n, st.integers(0, 4000)),  # dozens to thousands of digits
    st.floats(allow_nan=False),
    hostile_text,
)
json_value = st.recursive(
    json_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)
claim_names = st.sampled_from(["iss", "aud", "sub", "roles", "exp", "iat", "nbf", "kid"])


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        return False
    return True


@st.composite
def hostile_token(draw: st.DrawFn, w: World) -> str:
    """A token that is garbage, unsigned, or signed by the bundle's issuer with hostile claims."""
    kind = draw(st.sampled_from(["garbage", "unsigned", "signed"]))
    if kind == "garbage":
        return draw(hostile_text)
    now = w.clock.seconds()
    claims: dict[str, Any] = {"iss": "cloister-dev", "aud": ORIGIN, "sub": "refund-bot", "exp": now + 60}
    for name, value in draw(st.dictionaries(claim_names, json_value, max_size=3)).items():
        claims[name] = value
    claims = {k: v for k, v in claims.items() if _jsonable(v)}
    if kind == "unsigned":
        header = draw(
            st.fixed_dictionaries({"alg": st.sampled_from(["EdDSA", "none", "HS256"])}, optional={"kid": json_value})
        )
        return unsigned(header if _jsonable(header) else {"alg": "EdDSA"}, claims)
    kid = draw(st.none() | hostile_text)
    return encode_jwt(claims, w.issuer, kid=kid if kid and _jsonable(kid) else None)


# A name: one the bundle has, or anything.
server_name = st.one_of(st.sampled_from(["refunds", "research"]), hostile_text)
tool_name = st.one_of(st.sampled_from(["customer_lookup", "refund.create", "web_search"]), hostile_text)
# A cost argument: numbers and decimal texts of every shape (exponents, dozens of digits).
cost = st.one_of(
    st.integers(-(10**40), 10**40),
    st.builds(lambda n: 10**n, st.integers(0, 2000)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.builds(lambda d, e: f"{d}E{e}", st.integers(0, 10**6), st.integers(-(10**6), 10**6)),
    st.builds(lambda n: "0." + "1" * n, st.integers(0, 80)),
    hostile_text,
)
amount_text = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.builds(lambda n: "9" * n, st.integers(1, 3000)),
    st.builds(lambda e: f"1E{e}", st.integers(-(10**6), 10**6)),
    hostile_text,
)


# ---- properties -------------------------------------------------------------------------------


@pytest.fixture
def w(tmp_path: Path) -> World:
    return make_world(tmp_path)


def run(w: World, prop: Callable[..., None], strategy: st.SearchStrategy[Any], setting: settings) -> None:
    """Run `prop` on hostile values against one world (the clock moves 7 s per example, so anonymous
    budgets open and close), then require that the log it made is sound."""

    @setting
    @given(strategy)
    def example(value: Any) -> None:
        w.clock.advance(7)
        prop(value)

    example()
    assert_log_sound(w)


def test_hostile_tokens_never_poison_the_log(w: World) -> None:
    def prop(case: tuple[str, str, str, str]) -> None:
        token, server, tool, request_id = case
        v = authorize(w, token, server, tool, request_id=request_id)
        assert not v.allowed

    strategy = st.tuples(hostile_token(w), server_name, tool_name, hostile_text)
    run(w, prop, strategy, MANY)


def test_hostile_names_and_request_ids_from_an_agent_never_poison_the_log(w: World) -> None:
    def prop(case: tuple[str, str, str, bytes]) -> None:
        server, tool, request_id, args = case
        v = authorize(w, w.token("refund-bot", ["refund-agent"]), server, tool, args, request_id=request_id)
        if v.code == "bad-arguments":  # step 1, before the token is read: an anonymous denial
            return
        entry = parse_entry(w.log[v.log_index])
        assert isinstance(entry, DecisionEntry) and entry.agent == "refund-bot"

    long_member = st.builds(lambda n: "m" * n, st.integers(1000, 20_000))
    args = st.one_of(
        st.binary(max_size=64),
        json_value.filter(_jsonable).map(lambda v: json.dumps(v).encode()),
        long_member.map(lambda k: b'{"%s": 1, "%s": 2}' % (k.encode(), k.encode())),  # a duplicate, quoted
        long_member.map(lambda k: json.dumps({"a": {k: {"__extn": 1}}}).encode()),  # a path to an escape
    )
    run(w, prop, st.tuples(server_name, tool_name, hostile_text, args), MANY)


def test_hostile_costs_and_payments_never_poison_the_log(w: World) -> None:
    def prop(case: tuple[Any, str, str]) -> None:
        amount, payment, tool = case
        args = {"customer_id": "c", "amount": amount}
        if not _jsonable(args):
            return
        server = "research" if tool == "deep_search" else "refunds"
        agent, role = ("research-bot", "research-agent") if server == "research" else ("refund-bot", "refund-agent")
        v = authorize(w, w.token(agent, [role]), server, tool, args, payment=payment)
        entry = parse_entry(w.log[v.log_index])
        assert isinstance(entry, DecisionEntry)
        for text in entry.charges.values():  # recorded normalised: plain digits, no trailing zeros
            assert re.fullmatch(r"(0|[1-9]\d*)(\.\d*[1-9])?", text), text
            assert Decimal(text) <= Decimal("1e15")

    strategy = st.tuples(cost, st.one_of(st.just(""), amount_text), st.sampled_from(["refund.create", "deep_search"]))
    run(w, prop, strategy, MANY)


def test_hostile_outcomes_never_poison_the_log(w: World) -> None:
    def prop(case: tuple[str, str, int]) -> None:
        error, paid, duration = case
        v = authorize(w, w.token("refund-bot", ["refund-agent"]))
        assert v.allowed
        try:
            a = w.core.record_outcome(
                decision_index=v.log_index,
                result_sha256=None if error else b"\x01" * 32,
                error=error,
                duration_us=duration,
                paid_amount=paid,
                persisted_size=len(w.log),
            )
        except DecodeError:  # refused whole: nothing is logged, and the decision stays open
            return
        (entry,) = persist(w, a)
        assert isinstance(entry, OutcomeEntry) and entry.decision_index == v.log_index
        if entry.paid:
            assert re.fullmatch(r"(0|[1-9]\d*)(\.\d*[1-9])?", entry.paid), entry.paid

    strategy = st.tuples(hostile_text, st.one_of(st.just(""), amount_text), st.integers(-5, 2**64 - 1))
    run(w, prop, strategy, FEW)


def test_hostile_server_reports_never_poison_the_log(tmp_path: Path) -> None:
    w = make_world(tmp_path, identities=True)  # research pins web_search's definition

    def prop(case: tuple[str, bytes, bool]) -> None:
        failure, tools_json, evidence = case
        try:
            _, a = w.core.report_server(
                server="research",
                attestation=b"",
                artifact=failure.encode("utf-8", "surrogatepass"),
                certificates=[],
                tools_json=tools_json,
                failure=failure,
                evidence=evidence,
                persisted_size=len(w.log),
            )
        except (DecodeError, VerificationError):
            return
        assert all(isinstance(e, ServerEntry) for e in persist(w, a))

    tool = st.fixed_dictionaries(
        {"name": st.one_of(st.just("web_search"), hostile_text)},
        optional={"description": hostile_text, "inputSchema": st.just({"type": "object"})},
    )
    tools = st.lists(tool, max_size=3).filter(_jsonable).map(lambda t: json.dumps(t).encode())
    run(w, prop, st.tuples(hostile_text, st.one_of(st.just(b""), tools), st.booleans()), FEW)


# ---- regressions, named after the attacks of issue 9 ------------------------------------------


def test_long_token_claims_cannot_poison_the_log(w: World) -> None:
    """One unauthenticated request whose claims are thousands of characters long made the enclave
    sequence a denial its own parser refuses; replay and restart then failed for good."""
    for header, claims in (
        ({"alg": "EdDSA"}, {"iss": "x" * 5000}),
        ({"alg": "EdDSA", "kid": "k" * 5000}, {"iss": "cloister-dev"}),
        ({"alg": "x" * 5000}, {"iss": "cloister-dev"}),
    ):
        token = unsigned(header, claims)
        assert len(token) < 8192  # under the token size cap: the claims are read and quoted
        v = authorize(w, token)
        assert not v.allowed and v.code == "unauthenticated"
    hostile: list[dict[str, object]] = [
        {"aud": "a" * 5000},
        {"aud": ORIGIN, "sub": "s" * 5000},
        {"aud": ORIGIN, "roles": ["r" * 5000]},
    ]
    for over in hostile:
        now = w.clock.seconds()
        signed = encode_jwt({"iss": "cloister-dev", "sub": "refund-bot", "exp": now + 60, **over}, w.issuer)
        assert not authorize(w, signed).allowed
    assert_log_sound(w)


def test_long_unknown_tool_and_server_names_cannot_poison_the_log(w: World) -> None:
    token = w.token("refund-bot", ["refund-agent"])
    for server, tool in (("refunds", "t" * 5000), ("s" * 5000, "x"), ("refunds", "é" * 4000 + "\ud800")):
        v = authorize(w, token, server, tool, request_id="r" * 3000)
        assert v.code in ("unknown-tool", "unknown-server")
        entry = parse_entry(w.log[v.log_index])
        assert isinstance(entry, DecisionEntry) and entry.agent == "refund-bot"
        assert len(entry.tool) <= 256 and len(entry.server) <= 256 and len(entry.reason) <= 4096
    # The whole name is named by its hash, so whoever holds it can match it to the entry.
    assert "sha256:" in parse_entry(w.log[-1]).tool  # type: ignore[union-attr]
    assert_log_sound(w)


def test_long_argument_member_names_cannot_poison_the_log(w: World) -> None:
    """The arguments' parser quotes a duplicate member name in its error, and the enclave logged
    the error as the denial's reason: a 20,000-character name made an entry the parser refuses."""
    name = "m" * 20_000
    v = authorize(
        w, w.token("refund-bot", ["refund-agent"]), args=b'{"%s": 1, "%s": 2}' % (name.encode(), name.encode())
    )
    assert not v.allowed and v.code == "bad-arguments" and len(v.reason) <= 4096
    assert_log_sound(w)


def test_cost_with_dozens_of_digits_in_an_allowed_call_cannot_poison_the_log(w: World) -> None:
    """A cost argument the enclave charged as written ("0.1" and 68 zeros) made an allowed call's
    decision entry record a charge its parser refuses. Costs are bounded, and recorded normalised."""
    limit = (
        '\n[[limits]]\nid = "search-by-budget"\nkind = "spend"\nper = "agent"\ntools = ["research___web_search"]\n'
        'cost = "argument:budget"\nmax = "100"\nwindow = "1h"\n'
    )
    bundle = w.sign_bundle(2, {"limits.toml": (w.bundle_dir / "limits.toml").read_text() + limit})
    persist(w, w.core.load_policy(bundle)[2])
    search = w.token("research-bot", ["research-agent"])
    for budget, charged in (
        ("0.1" + "0" * 68, None),
        ("0." + "1" * 70, None),
        ("1" * 40, None),
        ("1E+1", "10"),
        ("12.500", "12.5"),
        ("0.000000000001", "0.000000000001"),
    ):
        v = authorize(w, search, "research", "web_search", {"query": "q", "budget": budget})
        if charged is None:
            assert not v.allowed and v.code == "bad-arguments", v.reason
            continue
        assert v.allowed, v.reason
        entry = parse_entry(w.log[v.log_index])
        assert isinstance(entry, DecisionEntry) and entry.charges["search-by-budget"] == charged
    # JSON numbers too: recorded in plain digits, without an exponent or trailing zeros.
    refund = w.token("refund-bot", ["refund-agent"])
    for number, charged in ((b"1E+3", "1000"), (b"100.5000", "100.5"), (b"2.50E-1", "0.25")):
        v = authorize(w, refund, "refunds", "refund.create", b'{"customer_id": "c", "amount": %s}' % number)
        entry = parse_entry(w.log[v.log_index])
        assert isinstance(entry, DecisionEntry) and entry.charges["refund-bot-hourly-refunds"] == charged
    assert_log_sound(w, bundle)


def test_payment_with_thousands_of_digits_cannot_poison_the_outcome(w: World) -> None:
    v = authorize(w, w.token("refund-bot", ["refund-agent"]))
    for paid in ("9" * 2000, "1E-5000", "0." + "0" * 30 + "1"):
        with pytest.raises(DecodeError):
            w.core.record_outcome(
                decision_index=v.log_index,
                result_sha256=None,
                error="e" * 10_000,
                duration_us=1,
                paid_amount=paid,
                persisted_size=len(w.log),
            )
    a = w.core.record_outcome(
        decision_index=v.log_index,
        result_sha256=None,
        error="e" * 10_000,
        duration_us=1,
        paid_amount="0.0500",
        persisted_size=len(w.log),
    )
    (entry,) = persist(w, a)
    assert isinstance(entry, OutcomeEntry) and entry.paid == "0.05" and "sha256:" in entry.error
    assert_log_sound(w)


def test_anonymous_flood_does_not_grow_the_log_without_bound(w: World) -> None:
    start = len(w.log)
    minutes = 20
    per_minute = 100
    for i in range(minutes * per_minute):
        v = authorize(w, unsigned({"alg": "EdDSA"}, {"iss": f"flood-{i}"}), request_id=str(i))
        assert not v.allowed and v.code == "unauthenticated"
        w.clock.advance(60 / per_minute)
    # One authenticated call after the flood carries the count of the last window.
    assert authorize(w, w.token("refund-bot", ["refund-agent"])).allowed
    grown = len(w.log) - start
    assert grown <= (minutes + 1) * (PER_WINDOW + 1) + 1
    entries = [parse_entry(e) for e in w.log[start:]]
    counted = [e for e in entries if isinstance(e, DenialsEntry)]
    logged = [e for e in entries if isinstance(e, DecisionEntry) and not e.agent]
    # Every denial is either logged one by one or counted: none is lost.
    assert len(logged) + sum(e.count for e in counted) == minutes * per_minute
    assert all(e.codes == {"unauthenticated": e.count} and e.first_ms <= e.last_ms <= e.time_ms for e in counted)
    # The auditor's replay counts them all, one by one or counted, as unauthenticated denials.
    summary = assert_log_sound(w)
    assert summary["denials_by_code"] == {"unauthenticated": minutes * per_minute}
    assert summary["decisions"][DENIED_UNLOGGED] == sum(e.count for e in counted) > 0


def test_a_counted_denial_is_still_a_denial_and_the_relay_can_tell(w: World) -> None:
    for _ in range(PER_WINDOW):
        v = authorize(w, "not a token")
        assert not v.allowed and v.log_index == v.log.first_index + len(v.log.entries) - 1
    size = len(w.log)
    v = authorize(w, "not a token")
    # Counted, not logged: a denial all the same; its LogAppend has no entry of its own, and its
    # log_index is one past what the append carries (the log's size).
    assert not v.allowed and v.code == "unauthenticated" and not v.grant
    assert not v.log.entries and v.log_index == v.log.first_index == size == len(w.log)
    w.clock.advance(WINDOW_MS / 1000)
    v = authorize(w, w.token("refund-bot", ["refund-agent"]))
    counted, decision = (parse_entry(e) for e in v.log.entries)
    assert isinstance(counted, DenialsEntry) and counted.count == 1 and isinstance(decision, DecisionEntry)
    assert v.log_index == v.log.first_index + 1


def test_any_issuer_cannot_mint_for_any_agent(w: World) -> None:
    """A second issuer in a bundle could mint tokens for every agent; agents are now bound to theirs."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    other = ed25519.Ed25519PrivateKey.generate()
    pem = other.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    issuers = (w.bundle_dir / "issuers.toml").read_text() + '\n[issuers.partner]\nkeys = ["issuers/partner.pem"]\n'
    entities = (w.bundle_dir / "entities.toml").read_text()
    entities = entities.replace('region = "us"\nissuers = ["cloister-dev"]', 'region = "us"\nissuers = ["partner"]')
    files: dict[str, str | None] = {"issuers.toml": issuers, "issuers/partner.pem": pem, "entities.toml": entities}
    persist(w, w.core.load_policy(w.sign_bundle(2, files))[2])
    now = w.clock.seconds()

    def token(agent: str, role: str, key: ed25519.Ed25519PrivateKey, iss: str) -> str:
        claims = {"iss": iss, "aud": ORIGIN, "sub": agent, "roles": [role], "iat": now, "exp": now + 60}
        return encode_jwt(claims, key)

    forged = authorize(w, token("refund-bot", "refund-agent", other, "partner"))
    assert not forged.allowed and forged.code == "unauthenticated" and "issuer-not-bound" in forged.reason
    assert authorize(w, token("refund-bot", "refund-agent", w.issuer, "cloister-dev")).allowed
    research = authorize(w, token("research-bot", "research-agent", other, "partner"), "research", "web_search")
    assert research.allowed and parse_entry(w.log[research.log_index]).issuer == "partner"  # type: ignore[union-attr]
    assert not authorize(w, token("research-bot", "research-agent", w.issuer, "cloister-dev"), "research").allowed
    # Several issuers and an agent that lists none: refused, naming the agent.
    unbound = re.sub(r"^issuers = .*\n", "", entities, flags=re.M)
    with pytest.raises(PolicyRefused, match=r"\[agents.refund-bot\]: the bundle has 2 issuers"):
        w.core.load_policy(w.sign_bundle(3, {**files, "entities.toml": unbound}))


def test_the_issuer_is_visible_to_cedar(w: World) -> None:
    policy = (
        '@id("only-dev-tokens-refund")\nforbid (principal, action == Cloister::Action::"refunds___refund.create", '
        'resource) unless { context.issuer == "cloister-dev" };\n'
    )
    persist(w, w.core.load_policy(w.sign_bundle(2, {"policies/issuer.cedar": policy}))[2])
    token = w.token("refund-bot", ["refund-agent"])
    assert authorize(w, token, "refunds", "refund.create", {"customer_id": "c", "amount": 1}).allowed
    policy = policy.replace('"cloister-dev"', '"someone-else"')
    persist(w, w.core.load_policy(w.sign_bundle(3, {"policies/issuer.cedar": policy}))[2])
    v = authorize(w, token, "refunds", "refund.create", {"customer_id": "c", "amount": 1})
    assert v.code == "policy" and v.policy_ids == ("only-dev-tokens-refund",)


def test_the_default_audience_is_the_log_origin_not_a_shared_word(w: World) -> None:
    assert w.core.policy is not None and w.core.policy.bundle.issuers["cloister-dev"].audience == ORIGIN
    shared = w.token("refund-bot", ["refund-agent"], aud="cloister")
    v = authorize(w, shared)
    assert not v.allowed and "wrong-audience" in v.reason


def test_token_without_iat_cannot_escape_max_lifetime(w: World) -> None:
    now = w.clock.seconds()
    claims = {"iss": "cloister-dev", "aud": ORIGIN, "sub": "refund-bot", "roles": ["refund-agent"]}
    forever = encode_jwt({**claims, "exp": now + 10 * 365 * 86400}, w.issuer)
    v = authorize(w, forever)
    assert not v.allowed and "too-long-lived" in v.reason
    assert authorize(w, encode_jwt({**claims, "exp": now + 3600}, w.issuer)).allowed


def test_downscoped_token_cannot_escape_a_role_limit(w: World) -> None:
    """The refund cap applies to role refund-agent; a token presenting no role, for an agent a permit
    names directly, escaped it. Limits now apply by the roles the bundle grants the agent."""
    permit = (
        '@id("refund-bot-by-name")\npermit (principal == Cloister::Agent::"refund-bot", '
        'action == Cloister::Action::"refunds___refund.create", resource == Cloister::Server::"refunds");\n'
    )
    bundle = w.sign_bundle(2, {"policies/by-name.cedar": permit})
    persist(w, w.core.load_policy(bundle)[2])
    bare = w.token("refund-bot", [])
    refund = {"customer_id": "c", "amount": 1000}
    assert all(authorize(w, bare, "refunds", "refund.create", refund).allowed for _ in range(10))
    v = authorize(w, bare, "refunds", "refund.create", refund)
    assert not v.allowed and v.code == "limit" and "refund-bot-hourly-refunds" in v.reason
    # The same holds after a restart: the windows are rebuilt by the bundle's roles too.
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    fresh = w.new_core()
    persist(w, fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    persist(w, fresh.load_policy(bundle)[2])
    w.core = fresh
    assert authorize(w, bare, "refunds", "refund.create", refund).code == "limit"
    assert authorize(w, w.token("refund-bot", ["refund-agent"]), "refunds", "refund.create", refund).code == "limit"
