"""The enclave's decision path, end to end in-process: identity, Cedar, limits, grants, the log."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from cloister.enclave.core import NotReady, PolicyRefused
from cloister.verify.canonical import canonical_sha256
from cloister.verify.checkpoint import verify_checkpoint
from cloister.verify.enclave_identity import EnclaveBinding
from cloister.verify.entries import DecisionEntry, KeyEntry, OutcomeEntry, PolicyEntry, parse_entry
from cloister.verify.grant import GrantError, ReplayGuard, verify_grant
from cloister.verify.merkle import leaf_hash, root_from_leaf_hashes
from tests.world import World, make_world


@pytest.fixture
def w(tmp_path: Path) -> World:
    return make_world(tmp_path)


def call(w: World, token: str, server: str, tool: str, args: Mapping[str, object] | bytes):  # type: ignore[no-untyped-def]
    raw = args if isinstance(args, bytes) else json.dumps(args).encode()
    v = w.core.authorize(
        token=token, server=server, tool=tool, arguments_json=raw, request_id="t", persisted_size=len(w.log)
    )
    w.persist(v.log)
    return v


def refund_bot(w: World) -> str:
    return w.token("refund-bot", ["refund-agent"])


def test_log_starts_with_key_entry_and_policy(w: World) -> None:
    key = parse_entry(w.log[0])
    assert isinstance(key, KeyEntry) and key.previous_size is None
    assert key.log_key == w.core.log_public and key.grant_key == w.core.grant_public
    assert isinstance(parse_entry(w.log[1]), PolicyEntry)
    binding = EnclaveBinding(origin="cloister.test/log", log_key=key.log_key, grant_key=key.grant_key)
    cp = verify_checkpoint(w.checkpoints[-1], [binding.log_verifier()], origin="cloister.test/log").checkpoint
    assert cp.size == 2 and cp.root_hash == root_from_leaf_hashes([leaf_hash(e) for e in w.log])
    assert cp.extensions and cp.extensions[0].startswith("cloister-policy 1 ")


def test_allowed_call_gets_a_grant_for_exactly_these_arguments(w: World) -> None:
    args = {"customer_id": "cus_1001"}
    v = call(w, refund_bot(w), "refunds", "customer_lookup", args)
    assert v.allowed and v.policy_ids == ("refund-agent-tools",)
    entry = parse_entry(w.log[v.log_index])
    assert isinstance(entry, DecisionEntry) and entry.decision == "allow" and entry.agent == "refund-bot"
    keys = EnclaveBinding("o", w.core.log_public, w.core.grant_public).grant_keys()
    aud = "refunds-eu-1"  # the grant names the upstream instance the bundle gives refunds
    claims = verify_grant(
        v.grant,
        grant_keys=keys,
        server="refunds",
        tool="customer_lookup",
        arguments=args,
        now_ms=w.clock.ms,
        audience=aud,
    )
    assert claims.log_index == v.log_index and claims.entry_hash == leaf_hash(w.log[v.log_index])
    assert claims.args_sha256 == canonical_sha256(args) == entry.args_sha256
    for bad in ({"customer_id": "cus_1002"}, {}, {"customer_id": "cus_1001", "x": 1}):
        with pytest.raises(GrantError, match="different arguments"):
            verify_grant(
                v.grant,
                grant_keys=keys,
                server="refunds",
                tool="customer_lookup",
                arguments=bad,
                now_ms=w.clock.ms,
                audience=aud,
            )
    with pytest.raises(GrantError, match="not refunds/refund.create"):
        verify_grant(
            v.grant, grant_keys=keys, server="refunds", tool="refund.create", arguments=args, now_ms=w.clock.ms
        )
    with pytest.raises(GrantError, match="expired"):
        verify_grant(
            v.grant,
            grant_keys=keys,
            server="refunds",
            tool="customer_lookup",
            arguments=args,
            now_ms=w.clock.ms + 61_000,
            audience="refunds-eu-1",
        )
    guard = ReplayGuard()
    guard.use(claims, w.clock.ms)
    with pytest.raises(GrantError, match="already used"):
        guard.use(claims, w.clock.ms)


@pytest.mark.parametrize(
    ("agent", "roles", "server", "tool", "args", "code", "reason"),
    [
        (
            "refund-bot",
            ["refund-agent"],
            "refunds",
            "refund.approve_above_threshold",
            {"refund_id": "re_1"},
            "policy",
            "approvals-need-a-supervisor",
        ),
        (
            "research-bot",
            ["research-agent"],
            "research",
            "db_write",
            {"key": "k", "value": "v"},
            "no-permit",
            "no policy permits",
        ),
        (
            "research-bot",
            ["research-agent"],
            "refunds",
            "customer_lookup",
            {"customer_id": "cus_1001"},
            "no-permit",
            "no policy permits",
        ),
        (
            "refund-bot",
            ["refund-agent"],
            "refunds",
            "refund.create",
            {"customer_id": "c", "amount": 6000},
            "policy",
            "refund-single-cap",
        ),
        ("refund-bot", ["refund-agent"], "billing", "charge", {}, "unknown-server", "'billing' is not in"),
        ("refund-bot", ["refund-agent"], "refunds", "delete_all", {}, "unknown-tool", "'delete_all' is not a tool"),
        ("mallory-bot", [], "refunds", "customer_lookup", {}, "unknown-agent", "not registered"),
        ("research-bot", ["refund-agent"], "refunds", "customer_lookup", {}, "unauthenticated", "does not grant role"),
    ],
)
def test_denials_are_logged_with_their_reason(
    w: World, agent: str, roles: list[str], server: str, tool: str, args: dict[str, object], code: str, reason: str
) -> None:
    v = call(w, w.token(agent, roles), server, tool, args)
    assert not v.allowed and v.code == code and reason in v.reason and not v.grant
    entry = parse_entry(w.log[v.log_index])
    assert isinstance(entry, DecisionEntry) and entry.decision == "deny" and entry.code == code
    assert entry.grant_nonce is None


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda w: "", "missing"),
        (lambda w: w.token("refund-bot", ["refund-agent"], ttl=-120), "expired"),
        (lambda w: w.token("refund-bot", ["refund-agent"])[:-4] + "AAAA", "bad-signature"),
        (lambda w: w.token("refund-bot", ["refund-agent"], iss="evil"), "unknown-issuer"),
        (lambda w: "garbage.token.here", "malformed"),
    ],
)
def test_bad_tokens_are_denied_and_logged(w: World, make_token, reason: str) -> None:  # type: ignore[no-untyped-def]
    v = call(w, make_token(w), "refunds", "customer_lookup", {"customer_id": "cus_1001"})
    assert not v.allowed and v.code == "unauthenticated" and reason in v.reason
    assert isinstance(parse_entry(w.log[v.log_index]), DecisionEntry)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"customer_id": "x", "customer_id": "y"}', "duplicate member name"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"a": ', "line 1"),
        (json.dumps({"customer_id": "x" * 70000}).encode(), "exceeds the limit of 65536"),
        (b'{"customer_id": "c", "amount": -500}', "non-negative"),
    ],
)
def test_bad_arguments_are_denied(w: World, raw: bytes, reason: str) -> None:
    tool = "refund.create" if b"amount" in raw else "customer_lookup"
    v = call(w, refund_bot(w), "refunds", tool, raw)
    assert not v.allowed and v.code == "bad-arguments" and reason in v.reason


def test_spend_cap_denies_the_eleventh_thousand(w: World) -> None:
    tok = refund_bot(w)
    for _ in range(10):
        v = call(w, tok, "refunds", "refund.create", {"customer_id": "cus_1001", "amount": 1000})
        assert v.allowed, v.reason
        w.clock.advance(60)
    v = call(w, tok, "refunds", "refund.create", {"customer_id": "cus_1001", "amount": 1000})
    assert not v.allowed and v.code == "limit" and "refund-bot-hourly-refunds" in v.reason
    assert v.limits[-1].remaining == 0 and 2900 < v.limits[-1].retry_after_s <= 3000
    w.clock.advance(v.limits[-1].retry_after_s + 1)
    assert call(w, refund_bot(w), "refunds", "refund.create", {"customer_id": "cus_1001", "amount": 1000}).allowed


def test_spend_cap_is_exact_under_concurrency(w: World) -> None:
    tok = refund_bot(w)
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(4):
            v = w.core.authorize(
                token=tok,
                server="refunds",
                tool="refund.create",
                arguments_json=b'{"customer_id": "c", "amount": 333.33}',
                request_id="",
                persisted_size=0,
            )
            with lock:
                results.append(v.allowed)

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 30  # 30 * 333.33 = 9999.90; a 31st would exceed 10000 by 333.23


def test_discovery_is_filtered(w: World) -> None:
    everything = [
        ("refunds", t)
        for t in ("customer_lookup", "transaction_history", "refund.create", "refund.approve_above_threshold")
    ] + [("research", "web_search"), ("research", "db_write"), ("ghost", "x")]
    agent, visible = w.core.visible_tools(w.token("research-bot", ["research-agent"]), everything)
    assert agent == "research-bot" and visible == [("research", "web_search")]
    _, visible = w.core.visible_tools(refund_bot(w), everything)
    assert visible == [("refunds", "customer_lookup"), ("refunds", "transaction_history"), ("refunds", "refund.create")]


def test_outcome_is_logged_once_per_decision(w: World) -> None:
    v = call(w, refund_bot(w), "refunds", "customer_lookup", {"customer_id": "cus_1001"})
    a = w.core.record_outcome(
        decision_index=v.log_index,
        result_sha256=b"\x01" * 32,
        error="",
        duration_us=10,
        paid_amount="",
        persisted_size=len(w.log),
    )
    w.persist(a)
    out = parse_entry(w.log[a.first_index])
    assert isinstance(out, OutcomeEntry) and out.decision_index == v.log_index
    with pytest.raises(Exception, match="not an open allowed decision"):
        w.core.record_outcome(
            decision_index=v.log_index,
            result_sha256=None,
            error="x",
            duration_us=1,
            paid_amount="",
            persisted_size=len(w.log),
        )
    denied = call(w, refund_bot(w), "refunds", "refund.approve_above_threshold", {"refund_id": "r"})
    with pytest.raises(Exception, match="not an open allowed decision"):
        w.core.record_outcome(
            decision_index=denied.log_index,
            result_sha256=None,
            error="",
            duration_us=1,
            paid_amount="",
            persisted_size=len(w.log),
        )


def test_nothing_is_decided_before_the_log_and_policy(tmp_path: Path) -> None:
    w = make_world(tmp_path, start=False)
    with pytest.raises(NotReady):
        w.core.authorize(token="", server="a", tool="b", arguments_json=b"{}", request_id="", persisted_size=0)
    w.persist(w.core.start_new_log())
    with pytest.raises(NotReady, match="no policy bundle"):
        w.core.authorize(token="", server="a", tool="b", arguments_json=b"{}", request_id="", persisted_size=0)


def test_policy_bundles_are_checked(w: World) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    cases = [
        (w.sign_bundle(1), "not above the version in force"),
        (w.sign_bundle(2, key=ed25519.Ed25519PrivateKey.generate()), "not a pinned admin key"),
        (w.sign_bundle(2)[:-5] + b"xxxxx", "does not verify"),
        (
            w.sign_bundle(2, {"policies/bad.cedar": "permit(principal, action, resource) when { oops };"}),
            "policies/bad.cedar: invalid Cedar",
        ),
        (
            w.sign_bundle(
                2, {"limits.toml": '[[limits]]\nid="x"\nkind="spend"\ncost="price:1"\nmax="-5"\nwindow="1h"\n'}
            ),
            "negative or absurdly large",
        ),
        (
            w.sign_bundle(
                2, {"limits.toml": '[[limits]]\nid="x"\nkind="rate"\nmax="5"\nwindow="1h"\ntools=["refunds___nope"]\n'}
            ),
            "unknown tool 'refunds___nope'",
        ),
        (
            w.sign_bundle(2, {"entities.toml": '[roles]\nr = {}\n[agents.a]\nroles = ["ghost"]\n'}),
            "role 'ghost' is not declared",
        ),
        (w.sign_bundle(2, {"bundle.toml": None}), "bundle.toml: missing"),
        (b"\x00" * 100, "COSE_Sign1"),
    ]
    for data, message in cases:
        with pytest.raises(PolicyRefused, match=message):
            w.core.load_policy(data)
    assert w.core.policy is not None and w.core.policy.version == 1  # untouched
    version, _, a = w.core.load_policy(w.sign_bundle(2, {"bundle.toml": '[bundle]\nname="v2"\nmode="log-only"\n'}))
    w.persist(a)
    assert version == 2 and isinstance(parse_entry(w.log[-1]), PolicyEntry)


def test_log_only_mode_logs_the_denial_but_grants(w: World) -> None:
    w.persist(w.core.load_policy(w.sign_bundle(2, {"bundle.toml": '[bundle]\nname="v2"\nmode="log-only"\n'}))[2])
    v = call(w, refund_bot(w), "refunds", "refund.approve_above_threshold", {"refund_id": "r"})
    entry = parse_entry(w.log[v.log_index])
    assert v.allowed and v.grant and isinstance(entry, DecisionEntry)
    assert entry.decision == "deny" and entry.mode == "log-only" and entry.code == "policy"
    # Identity failures are never waved through.
    assert not call(w, "", "refunds", "customer_lookup", {}).allowed


def test_storage_backpressure_stops_decisions(w: World) -> None:
    from cloister.enclave.sequencer import Backpressure

    seq = w.core.sequencer
    assert seq is not None
    seq._max_pending = len(w.log) + 3
    tok = refund_bot(w)
    with pytest.raises(Backpressure):
        for _ in range(10):
            w.core.authorize(
                token=tok,
                server="refunds",
                tool="customer_lookup",
                arguments_json=b"{}",
                request_id="",
                persisted_size=0,
            )
    # Once the parent reports what it persisted, decisions resume.
    v = w.core.authorize(
        token=tok,
        server="refunds",
        tool="customer_lookup",
        arguments_json=b"{}",
        request_id="",
        persisted_size=seq.size,
    )
    assert v.allowed


def test_bundles_naming_unknown_entities_or_breaking_their_schema_are_refused(w: World) -> None:
    typo = '@id("no-approvals")\nforbid (principal, action == Cloister::Action::"refunds___refund.aprove", resource);\n'
    with pytest.raises(
        PolicyRefused,
        match=r'policies/typo.cedar: policy .no-approvals. names Cloister::Action::"refunds___refund.aprove"',
    ):
        w.core.load_policy(w.sign_bundle(2, {"policies/typo.cedar": typo}))
    ghost = '@id("ghost")\npermit (principal in Cloister::Role::"admin", action, resource);\n'
    with pytest.raises(PolicyRefused, match=r'Cloister::Role::"admin", which entities.toml does not declare'):
        w.core.load_policy(w.sign_bundle(2, {"policies/ghost.cedar": ghost}))
    schema = (
        "namespace Cloister { entity Role; entity Agent in [Role] { region: String };"
        " entity Server { region: String, category: String };"
        ' action "CallTool"; action "refunds___customer_lookup" in ["CallTool"] appliesTo { principal: [Agent],'
        " resource: [Server], context: { input: { customer_id: String } } }; }"
    )
    bad = (
        '@id("bad-type")\npermit (principal, action == Cloister::Action::"refunds___customer_lookup", resource)'
        " when { context.input.customer_id > 5 };\n"
    )
    with pytest.raises(PolicyRefused, match="does not validate against schema.cedarschema"):
        w.core.load_policy(
            w.sign_bundle(
                2,
                {
                    "schema.cedarschema": schema,
                    "policies/refunds.cedar": bad,
                    "policies/research.cedar": None,
                    "limits.toml": "",
                },
            )
        )
    assert w.core.policy is not None and w.core.policy.version == 1


def test_log_only_policy_sets_are_recorded_not_enforced(w: World) -> None:
    trial = (
        '@id("trial-no-lookups")\nforbid (principal, action == Cloister::Action::"refunds___customer_lookup", '
        "resource);\n"
    )
    bundle_toml = '[bundle]\nname = "trial"\n\n[modes]\n"trial.cedar" = "log-only"\n"research.cedar" = "log-only"\n'
    w.persist(w.core.load_policy(w.sign_bundle(2, {"bundle.toml": bundle_toml, "policies/trial.cedar": trial}))[2])
    v = call(w, refund_bot(w), "refunds", "customer_lookup", {"customer_id": "cus_1001"})
    entry = parse_entry(w.log[v.log_index])
    assert v.allowed and isinstance(entry, DecisionEntry) and entry.decision == "allow"
    assert "log-only policy set would deny: forbidden by policy trial-no-lookups" in entry.reason
    # A permit in a log-only set grants nothing.
    v = call(w, w.token("research-bot", ["research-agent"]), "research", "web_search", {"query": "q"})
    assert not v.allowed and v.code == "no-permit"
    bad = '[bundle]\nname = "trial"\n\n[modes]\n"nope.cedar" = "log-only"\n'
    with pytest.raises(PolicyRefused, match="not a file under policies/"):
        w.core.load_policy(w.sign_bundle(3, {"bundle.toml": bad}))


def test_an_oidc_issuer_with_a_jwks(w: World) -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from cloister.verify.jwt import encode_jwt

    def b64(n: int, size: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()

    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ecn, rsan = ec_key.public_key().public_numbers(), rsa_key.public_key().public_numbers()
    jwks = {
        "keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec-1", "x": b64(ecn.x, 32), "y": b64(ecn.y, 32), "use": "sig"},
            {"kty": "RSA", "kid": "rsa-1", "n": b64(rsan.n, 256), "e": b64(rsan.e, 3)},
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc", "x": "AA", "y": "AA"},
        ]
    }
    issuers = (
        '[issuers.idp]\nissuer = "https://idp.example.com/realms/agents"\naudience = "cloister"\n'
        'jwks = "issuers/idp.jwks.json"\n'
    )
    # The bundle's only issuer: agents that list none are bound to it.
    entities = re.sub(r"^issuers = .*\n", "", (w.bundle_dir / "entities.toml").read_text(), flags=re.M)
    files: dict[str, str | None] = {
        "issuers.toml": issuers,
        "issuers/idp.jwks.json": json.dumps(jwks),
        "entities.toml": entities,
    }
    w.persist(w.core.load_policy(w.sign_bundle(2, files))[2])
    now = w.clock.ms // 1000
    claims = {
        "iss": "https://idp.example.com/realms/agents",
        "aud": "cloister",
        "sub": "refund-bot",
        "roles": ["refund-agent"],
        "iat": now,
        "exp": now + 300,
    }
    for key, kid in ((ec_key, "ec-1"), (rsa_key, "rsa-1")):
        assert call(w, encode_jwt(claims, key, kid=kid), "refunds", "customer_lookup", {}).allowed
    bad = '{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}'
    with pytest.raises(PolicyRefused, match=r"issuers/idp.jwks.json: JWK Set key #0"):
        w.core.load_policy(w.sign_bundle(3, {**files, "issuers/idp.jwks.json": bad}))


def test_a_bundle_refused_by_backpressure_leaves_the_checkpoints_naming_the_one_in_force(w: World) -> None:
    # Regression: the checkpoint extension was switched to the new bundle before its entry was
    # appended, so a load refused by back-pressure left checkpoints naming a bundle never in force.
    from cloister.enclave.sequencer import Backpressure

    seq = w.core.sequencer
    assert seq is not None and w.core.policy is not None
    in_force = w.core.policy.version
    seq._max_pending = len(w.log)
    with pytest.raises(Backpressure):
        w.core.load_policy(w.sign_bundle(2))
    assert w.core.policy.version == in_force
    seq._max_pending = 1000
    w.persist(call(w, refund_bot(w), "refunds", "customer_lookup", {"customer_id": "cus_1001"}).log)
    binding = EnclaveBinding(origin="cloister.test/log", log_key=w.core.log_public, grant_key=w.core.grant_public)
    cp = verify_checkpoint(w.checkpoints[-1], [binding.log_verifier()], origin="cloister.test/log").checkpoint
    assert cp.extensions[0].startswith(f"cloister-policy {in_force} ")
