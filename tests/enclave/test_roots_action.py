"""An upstream's roots/list, decided by the enclave as the agent's (decision 0027): its own Cedar
action `ListRoots` a policy can permit or forbid, logged as `roots/list:` in entries every parser
reads, with no grant (the answer comes from the agent), and on the wire as ACTION_KIND_ROOTS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloister.enclave.bundle import MCP_ACTIONS, ActionKind, entry_name
from cloister.enclave.core import Verdict
from cloister.enclave.service import KINDS
from cloister.verify.entries import DecisionEntry, OutcomeEntry, parse_entry
from cloister.wire import enclave_pb2 as pb
from tests.world import World, make_world

POLICIES = """
@id("roots") permit (principal in Cloister::Role::"refund-agent", action == Cloister::Action::"ListRoots",
    resource == Cloister::Server::"refunds");
@id("no-roots-for-research") forbid (principal in Cloister::Role::"research-agent",
    action == Cloister::Action::"ListRoots", resource);
@id("research-tools") permit (principal in Cloister::Role::"research-agent", action == Cloister::Action::"Mcp",
    resource == Cloister::Server::"refunds");
"""


@pytest.fixture
def w(tmp_path: Path) -> World:
    world = make_world(tmp_path)
    _, _, a = world.core.load_policy(world.sign_bundle(2, {"policies/roots.cedar": POLICIES}))
    world.persist(a)
    return world


def ask(w: World, who: str, role: str) -> Verdict:
    v = w.core.authorize(
        token=w.token(who, [role]),
        server="refunds",
        tool="",
        arguments_json=b"{}",
        request_id="r",
        persisted_size=len(w.log),
        kind=ActionKind.ROOTS,
    )
    w.persist(v.log)
    return v


def test_roots_is_its_own_action_on_the_wire_and_in_the_log() -> None:
    assert MCP_ACTIONS[ActionKind.ROOTS] == "ListRoots"
    assert KINDS[pb.ACTION_KIND_ROOTS] is ActionKind.ROOTS
    assert entry_name(ActionKind.ROOTS, "") == "roots/list:"
    # No other kind shares the wire value or the Cedar action.
    assert len(set(KINDS.values())) == len(KINDS) and len(set(MCP_ACTIONS.values())) == len(MCP_ACTIONS)


def test_roots_allowed_is_logged_without_a_grant_and_its_answer_is_an_outcome(w: World) -> None:
    v = ask(w, "refund-bot", "refund-agent")
    assert v.allowed and v.policy_ids == ("roots",) and v.grant == b""  # the agent answers: no upstream grant
    entry = parse_entry(w.log[v.log_index])
    assert isinstance(entry, DecisionEntry) and entry.tool == "roots/list:" and entry.agent == "refund-bot"
    out = w.core.record_outcome(
        decision_index=v.log_index,
        result_sha256=b"\x02" * 32,
        error="",
        duration_us=7,
        paid_amount="",
        persisted_size=len(w.log),
    )
    w.persist(out)
    outcome = parse_entry(w.log[out.first_index])
    assert isinstance(outcome, OutcomeEntry) and outcome.decision_index == v.log_index
    assert outcome.result_sha256 == b"\x02" * 32


def test_a_policy_forbids_roots_even_where_every_mcp_action_is_permitted(w: World) -> None:
    v = ask(w, "research-bot", "research-agent")
    assert not v.allowed and v.code == "policy" and v.policy_ids == ("no-roots-for-research",)
    entry = parse_entry(w.log[v.log_index])
    assert isinstance(entry, DecisionEntry) and entry.decision == "deny" and entry.tool == "roots/list:"


def test_without_a_permit_roots_are_denied(tmp_path: Path) -> None:
    """The example bundle's policies say nothing of ListRoots: no agent's roots reach an upstream."""
    world = make_world(tmp_path)
    v = ask(world, "refund-bot", "refund-agent")
    assert not v.allowed and v.code == "no-permit"


def test_policy_explain_and_the_validator_know_list_roots(w: World) -> None:
    from cloister.enclave.bundle import read_bundle_dir
    from cloister.policytools.explain import explain, parse_at
    from cloister.policytools.validate import validate_files

    files = read_bundle_dir(w.bundle_dir)
    files["policies/roots.cedar"] = POLICIES.encode()
    validation = validate_files(files)
    assert validation.errors == []  # `ListRoots` is an action the (generated) schema declares
    common: dict[str, Any] = {"server": "refunds", "at": parse_at(None), "tool": "", "arguments_json": "{}"}
    ok = explain(validation, agent="refund-bot", roles=None, kind=ActionKind.ROOTS, **common)
    assert ok.decision == "allow" and [p["id"] for p in ok.policies] == ["roots"]
    no = explain(validation, agent="research-bot", roles=None, kind=ActionKind.ROOTS, **common)
    assert no.decision == "deny" and [p["id"] for p in no.policies] == ["no-roots-for-research"]
    # A typo of the action is caught, so a forbid cannot silently miss.
    files["policies/roots.cedar"] = POLICIES.replace('"ListRoots", resource);', '"ListRoot", resource);').encode()
    assert validate_files(files).errors
