"""The decision path's caches and shortcuts (docs/decisions/0026): each gives what the slow way
gave, and none outlives what it was made from (the bundle, the servers' levels, the agent's
entities and roles, the time).

- Cedar reads, per action, a store of the entities that action's policies can reach, not the
  bundle's every entity: the same answers as the whole store, errors included;
- stores with a principal in them are cached by (action, agent, roles), per generation of server
  levels; a bundle push brings a new engine;
- the checkpoint text and its signed note are built from parts checked once: byte for byte what
  `Checkpoint.to_text` and `sign_note` make;
- the Cedar datetime is formatted once per second.
"""

from __future__ import annotations

import json
import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cedarpy
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import cloister.enclave.policy as policy_mod
from cloister.enclave.bundle import NAMESPACE, action_id
from cloister.enclave.policy import PolicyEngine, Principal, cedar_value
from cloister.enclave.sequencer import CheckpointText, Sequencer
from cloister.verify.checkpoint import Checkpoint, verify_checkpoint
from cloister.verify.errors import DecodeError
from cloister.verify.note import Ed25519NoteSigner
from tests.world import ORIGIN, World, make_world

# Policies that name tool actions other than their own, in conditions: the per-action store must
# hold those actions too, or `in` on them would read no ancestors.
EXTRA = """
@id("us-agents-if-db-write-is-a-tool")
permit (principal, action, resource)
when { principal.region == "us" && Cloister::Action::"research___db_write" in Cloister::Action::"CallTool" };

@id("lookup-names-another-tool")
forbid (principal, action == Cloister::Action::"refunds___transaction_history", resource)
when { !(Cloister::Action::"refunds___customer_lookup" in Cloister::Action::"Mcp") };

@id("research-bot-web-search-in-hours")
forbid (principal, action == Cloister::Action::"research___web_search", resource)
when { context.system.now.toTime() >= duration("20h") };

@id("needs-nitro")
forbid (principal, action == Cloister::Action::"refunds___customer_lookup", resource)
when { resource.attestation != "nitro" && principal.region == "us" };
"""


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> World:
    w = make_world(tmp_path_factory.mktemp("fast"), policy=False)
    (w.bundle_dir / "policies" / "extra.cedar").write_text(EXTRA)
    w.persist(w.core.load_policy(w.sign_bundle(1))[2])
    return w


def _engine(w: World) -> PolicyEngine:
    ps = w.core.policy
    assert ps is not None
    return PolicyEngine(ps.bundle)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every raw answer the engine gets from Cedar, parsed."""
    seen: list[dict[str, Any]] = []
    real = cedarpy._internal.is_authorized_batch

    def spy(*args: Any) -> list[str]:
        out: list[str] = real(*args)
        seen.extend(json.loads(x) for x in out)
        return out

    monkeypatch.setattr(cedarpy._internal, "is_authorized_batch", spy)
    return seen


def _whole_store_answer(
    engine: PolicyEngine,
    levels: dict[str, str],
    p: Principal,
    server: str,
    tool: str,
    args: dict[str, Any],
    now: datetime,
) -> tuple[str, list[str], list[str]]:
    """Cedar's answer as the engine asked it before 0026: every policy, every entity of the bundle."""
    bundle = engine.bundle
    entities = json.loads(bundle.entities_json)
    for e in entities:
        if e["uid"]["type"] == f"{NAMESPACE}::Server" and e["uid"]["id"] in levels:
            e["attrs"]["attestation"] = levels[e["uid"]["id"]]
    spec = bundle.agents.get(p.agent)
    attrs = {**(dict(spec.attrs) if spec else {}), "id": p.agent}
    attrs.setdefault("region", "")
    entities.append(
        {
            "uid": {"type": f"{NAMESPACE}::Agent", "id": p.agent},
            "attrs": attrs,
            "parents": [{"type": f"{NAMESPACE}::Role", "id": r} for r in sorted(p.roles)],
        }
    )
    policies = cedarpy.PolicySet.from_json_str(
        json.dumps({"staticPolicies": dict(bundle.policies), "templates": {}, "templateLinks": []})
    )
    text = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{now.microsecond // 1000:03d}Z"
    request = {
        "principal": {"type": f"{NAMESPACE}::Agent", "id": p.agent},
        "action": {"type": f"{NAMESPACE}::Action", "id": action_id(server, tool)},
        "resource": {"type": f"{NAMESPACE}::Server", "id": server},
        "context": {
            "input": cedar_value(args),
            "issuer": p.issuer,
            "system": {"now": {"__extn": {"fn": "datetime", "arg": text}}},
        },
    }
    r = cedarpy.is_authorized(request, policies, json.dumps(entities))
    return r.decision.value, sorted(r.diagnostics.reasons), sorted(map(str, r.diagnostics.errors))


def _principals() -> list[Principal]:
    return [
        Principal("refund-bot", frozenset({"refund-agent"}), "cloister-dev"),
        Principal("refund-bot", frozenset(), "cloister-dev"),
        Principal("research-bot", frozenset({"research-agent"}), "cloister-dev"),
        Principal("research-bot", frozenset(), "cloister-dev"),
    ]


def test_per_action_stores_answer_as_the_whole_store(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(w)
    seen = _spy(monkeypatch)
    args_cases: list[dict[str, Any]] = [{}, {"amount": 6000}, {"amount": "lots"}, {"query": "x"}]
    times = [datetime(2026, 11, 26, 10, 0, tzinfo=UTC), datetime(2026, 11, 26, 21, 0, 0, 5000, tzinfo=UTC)]
    compared = 0
    for levels in ({}, {"refunds": "nitro", "research": "checksum"}, {"refunds": "unverified"}):
        engine.set_server_levels(levels)
        for server, spec in sorted(engine.bundle.servers.items()):
            for tool in sorted(spec.tools):
                for p in _principals():
                    for args in args_cases:
                        for now in times:
                            engine.evaluate(p, server, tool, args, now)
                            got = seen.pop()
                            errors = sorted(map(str, got["diagnostics"]["errors"]))
                            want = _whole_store_answer(engine, levels, p, server, tool, args, now)
                            assert (got["decision"], sorted(got["diagnostics"]["reason"]), errors) == want, (
                                server,
                                tool,
                                p,
                                args,
                                now,
                            )
                            compared += 1
    # The extra policies' literal actions decided something (the comparison can fail).
    assert compared > 100


def test_discovery_with_per_action_stores_answers_as_the_whole_store(w: World) -> None:
    """`may_call` (partial evaluation, the input unknown) reads the same per-action stores."""
    engine = _engine(w)
    bundle = engine.bundle
    policies = cedarpy.PolicySet.from_json_str(
        json.dumps({"staticPolicies": dict(bundle.policies), "templates": {}, "templateLinks": []})
    )
    now = datetime(2026, 11, 26, 21, 0, tzinfo=UTC)
    shown = 0
    for server, spec in sorted(bundle.servers.items()):
        for tool in sorted(spec.tools):
            for p in _principals():
                entities = json.loads(bundle.entities_json)
                attrs = {**dict(bundle.agents[p.agent].attrs), "id": p.agent}
                attrs.setdefault("region", "")
                parents = [{"type": f"{NAMESPACE}::Role", "id": r} for r in sorted(p.roles)]
                entities.append(
                    {"uid": {"type": f"{NAMESPACE}::Agent", "id": p.agent}, "attrs": attrs, "parents": parents}
                )
                request = {
                    "principal": f"{NAMESPACE}::Agent::{json.dumps(p.agent)}",
                    "action": f"{NAMESPACE}::Action::{json.dumps(action_id(server, tool))}",
                    "resource": f"{NAMESPACE}::Server::{json.dumps(server)}",
                    "context": {
                        "input": policy_mod.UNKNOWN,
                        "system": {"now": policy_mod._cedar_datetime(now)},
                        "issuer": p.issuer,
                    },
                }
                whole = cedarpy.is_authorized_partial(request, policies, json.dumps(entities))
                want = whole.decision != cedarpy.Decision.Deny
                assert engine.may_call(p, server, tool, now) is want, (server, tool, p)
                shown += want
    assert 0 < shown < len(_principals()) * sum(len(s.tools) for s in bundle.servers.values())


def test_server_levels_take_effect_on_the_next_decision(w: World) -> None:
    engine = _engine(w)
    us = Principal("research-bot", frozenset({"research-agent"}), "cloister-dev")
    now = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    assert engine.evaluate(us, "refunds", "customer_lookup", {}, now).policy_ids == ("needs-nitro",)
    engine.set_server_levels({"refunds": "nitro"})
    v = engine.evaluate(us, "refunds", "customer_lookup", {}, now)
    assert "needs-nitro" not in v.policy_ids
    engine.set_server_levels({"refunds": "unverified"})  # a reconnect revokes the proof
    assert engine.evaluate(us, "refunds", "customer_lookup", {}, now).policy_ids == ("needs-nitro",)


def test_token_roles_are_part_of_the_cached_store(w: World) -> None:
    """The same agent with fewer roles in its token reads a store with fewer roles, whichever came first."""
    engine = _engine(w)
    now = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    full = Principal("refund-bot", frozenset({"refund-agent"}), "cloister-dev")
    none = Principal("refund-bot", frozenset(), "cloister-dev")
    for _ in range(2):
        assert engine.evaluate(full, "refunds", "customer_lookup", {}, now).allowed
        v = engine.evaluate(none, "refunds", "customer_lookup", {}, now)
        assert not v.allowed and v.code == "no-permit"


def test_time_is_read_at_every_decision(w: World) -> None:
    """The datetime text is cached per second: crossing 20:00 by a millisecond, and going back, flips it."""
    engine = _engine(w)
    p = Principal("research-bot", frozenset({"research-agent"}), "cloister-dev")
    before = datetime(2026, 11, 26, 19, 59, 59, 999_000, tzinfo=UTC)
    after = before + timedelta(milliseconds=1)
    for now, allowed in ((before, True), (after, False), (before, True), (after, False)):
        assert engine.evaluate(p, "research", "web_search", {}, now).allowed is allowed, now


def test_datetime_text_matches_strftime_in_any_order() -> None:
    rng = random.Random(26)
    base = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    stamps = [base + timedelta(milliseconds=rng.randrange(-5000, 5000)) for _ in range(2000)]
    stamps += [datetime(1999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC), datetime(2000, 1, 1, tzinfo=UTC)]
    for now in stamps:
        want = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{now.microsecond // 1000:03d}Z"
        assert policy_mod._datetime_text(now) == want


def test_policy_and_agent_changes_take_effect_on_the_next_call(tmp_path: Path) -> None:
    """A bundle push is a new engine: a new policy, and an agent's changed attributes, decide the
    very next call, with every cache of the old bundle warm."""
    w = make_world(tmp_path)

    def call() -> Any:
        v = w.core.authorize(
            token=w.token("refund-bot", ["refund-agent"]),
            server="refunds",
            tool="customer_lookup",
            arguments_json=b"{}",
            request_id="",
            persisted_size=len(w.log),
        )
        w.persist(v.log)
        return v

    assert call().allowed and call().allowed
    forbid_us = '@id("no-us")\nforbid (principal, action, resource) when { principal.region == "us" };\n'
    w.persist(w.core.load_policy(w.sign_bundle(2, {"policies/no-us.cedar": forbid_us}))[2])
    assert call().allowed  # refund-bot is in the EU
    entities = (w.bundle_dir / "entities.toml").read_text()
    moved = entities.replace('[agents.refund-bot]\nroles = ["refund-agent"]\nregion = "eu"', "X", 1)
    assert moved != entities
    moved = moved.replace("X", '[agents.refund-bot]\nroles = ["refund-agent"]\nregion = "us"')
    w.persist(w.core.load_policy(w.sign_bundle(3, {"policies/no-us.cedar": forbid_us, "entities.toml": moved}))[2])
    v = call()
    assert not v.allowed and v.policy_ids == ("no-us",)


def test_a_malicious_agent_cannot_poison_another_agents_store(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent controls its calls (tools, arguments, the roles its token presents) and can fill the
    caches, evicting others' entries; it cannot make another agent's decision read its store."""
    monkeypatch.setattr(policy_mod, "AGENT_STORES", 4)  # small: the attacker evicts constantly
    monkeypatch.setattr(policy_mod, "ACTION_STORES", 2)
    engine = _engine(w)
    fresh = _engine(w)
    now = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    victim = Principal("refund-bot", frozenset({"refund-agent"}), "cloister-dev")
    victim_no_roles = Principal("refund-bot", frozenset(), "cloister-dev")
    rng = random.Random(13)
    tools = [(s, t) for s, spec in sorted(engine.bundle.servers.items()) for t in sorted(spec.tools)]
    for i in range(300):
        # The attacker: research-bot, with and without its role, every tool, hostile arguments,
        # and names of agents it is not (an unknown agent gets no attributes, never another's).
        attacker = Principal(
            rng.choice(["research-bot", "refund-bot ", "refund-bot\x00", "Refund-bot"]),
            frozenset(rng.choice([[], ["research-agent"], ["refund-agent"]])),
            "cloister-dev",
        )
        server, tool = rng.choice(tools)
        engine.evaluate(attacker, server, tool, {"amount": rng.choice([1, 6000, "x"])}, now)
        if i % 3 == 0:
            engine.set_server_levels(rng.choice([{}, {"refunds": "nitro"}]))
            fresh.set_server_levels(engine._levels)
        for p in (victim, victim_no_roles):
            server, tool = rng.choice(tools)
            assert engine.evaluate(p, server, tool, {"amount": 10}, now) == fresh.evaluate(
                p, server, tool, {"amount": 10}, now
            )


# ---- checkpoints and notes: byte for byte ------------------------------------------------------


@pytest.mark.parametrize("extensions", [(), ("cloister-policy 3 " + "ab" * 32,), ("a", "ünïcode line", "x" * 300)])
def test_checkpoint_text_is_checkpoint_to_text(extensions: tuple[str, ...]) -> None:
    rng = random.Random(len(extensions))
    text = CheckpointText(ORIGIN, extensions)
    for size in [0, 1, 9, 10, 2**63, 2**64 - 1, *(rng.randrange(2**64) for _ in range(200))]:
        root = os.urandom(32)
        assert text.of(size, root) == Checkpoint(ORIGIN, size, root, extensions).to_text()


def test_checkpoint_text_refuses_what_checkpoint_refuses() -> None:
    bad = CheckpointText(ORIGIN, ("bad\x01line",))
    with pytest.raises(DecodeError, match="control character"):
        bad.of(1, bytes(32))
    with pytest.raises(DecodeError):
        CheckpointText(ORIGIN, ()).of(2**64, bytes(32))
    with pytest.raises(DecodeError):
        CheckpointText(ORIGIN, ()).of(1, bytes(31))
    with pytest.raises(DecodeError, match="empty"):
        CheckpointText("", ()).of(1, bytes(32))


def test_sequencer_checkpoints_verify() -> None:
    signer = Ed25519NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    seq = Sequencer(ORIGIN, signer)
    with seq.lock:
        seq.set_extensions(("cloister-policy 1 00",))
    for i in range(5):
        seq.append(b"entry %d" % i)
        cp = seq.checkpoint_covering(i + 1)
        parsed = verify_checkpoint(cp.note, [signer.verifier], origin=ORIGIN).checkpoint
        assert (parsed.size, parsed.root_hash, parsed.extensions) == (i + 1, cp.root, ("cloister-policy 1 00",))
