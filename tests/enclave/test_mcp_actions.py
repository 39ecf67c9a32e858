"""Resources, prompts, sampling and elicitation decided by the enclave (decision 0018): their own
Cedar actions, one decide() with tools, logged in entries every parser reads, and no confusion
with a tool call (a grant for a resource or prompt cannot pass for a tools/call grant)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from cloister.enclave.bundle import ActionKind
from cloister.enclave.core import Verdict
from cloister.enclave.service import EnclaveService
from cloister.verify.enclave_identity import EnclaveBinding
from cloister.verify.entries import DecisionEntry, OutcomeEntry, parse_entry
from cloister.verify.grant import GrantError, verify_grant
from cloister.wire import enclave_pb2 as pb
from tests.world import World, make_world

POLICIES = """
@id("docs") permit (principal in Cloister::Role::"refund-agent", action == Cloister::Action::"ReadResource",
    resource == Cloister::Server::"refunds") when { context.input.uri like "docs://*" };
@id("prompts") permit (principal in Cloister::Role::"refund-agent", action == Cloister::Action::"GetPrompt",
    resource == Cloister::Server::"refunds");
@id("no-secret-prompt") forbid (principal, action == Cloister::Action::"GetPrompt", resource)
    when { context.input.name == "secret" };
@id("sampling") permit (principal in Cloister::Role::"refund-agent", action == Cloister::Action::"CreateMessage",
    resource == Cloister::Server::"refunds") when { context.input.maxTokens <= 100 };
"""


@pytest.fixture
def w(tmp_path: Path) -> World:
    world = make_world(tmp_path)
    _, _, a = world.core.load_policy(world.sign_bundle(2, {"policies/mcp.cedar": POLICIES}))
    world.persist(a)
    return world


def ask(w: World, who: str, kind: ActionKind, name: str, request: dict[str, Any], **extra: Any) -> Verdict:
    token = w.token(who, ["refund-agent"] if who == "refund-bot" else ["research-agent"])
    v = w.core.authorize(
        token=token,
        server="refunds",
        tool=name,
        arguments_json=json.dumps(request).encode(),
        request_id="r",
        persisted_size=len(w.log),
        kind=kind,
        **extra,
    )
    w.persist(v.log)
    return v


def test_a_resource_read_is_its_own_action_decided_and_logged(w: World) -> None:
    v = ask(w, "refund-bot", ActionKind.RESOURCE, "docs://a", {"uri": "docs://a"})
    assert v.allowed and v.policy_ids == ("docs",)
    entry = parse_entry(w.log[v.log_index])
    assert isinstance(entry, DecisionEntry) and entry.tool == "resources/read:docs://a" and entry.decision == "allow"
    # Not a tool's permit: the same agent, another URI, no permit.
    no = ask(w, "refund-bot", ActionKind.RESOURCE, "file:///etc/passwd", {"uri": "file:///etc/passwd"})
    assert not no.allowed and no.code == "no-permit" and not no.grant
    # Another role's agent: nothing permits it.
    assert ask(w, "research-bot", ActionKind.RESOURCE, "docs://a", {"uri": "docs://a"}).code == "no-permit"


def test_a_resource_grant_never_verifies_as_a_tool_call(w: World) -> None:
    """A compromised host holding a grant for a resource read cannot present it as a tools/call."""
    v = ask(w, "refund-bot", ActionKind.RESOURCE, "docs://a", {"uri": "docs://a"})
    keys = EnclaveBinding("o", w.core.log_public, w.core.grant_public).grant_keys()
    common: dict[str, Any] = {"grant_keys": keys, "server": "refunds", "now_ms": w.clock(), "audience": "refunds-eu-1"}
    claims = verify_grant(v.grant, tool="resources/read:docs://a", arguments={"uri": "docs://a"}, **common)
    assert claims.log_index == v.log_index
    for tool in ("customer_lookup", "docs://a", "read"):
        with pytest.raises(GrantError):
            verify_grant(v.grant, tool=tool, arguments={"uri": "docs://a"}, **common)


def test_prompts_by_name_and_sampling_by_its_request(w: World) -> None:
    assert ask(w, "refund-bot", ActionKind.PROMPT, "greet", {"name": "greet", "arguments": {}}).allowed
    secret = ask(w, "refund-bot", ActionKind.PROMPT, "secret", {"name": "secret", "arguments": {}})
    assert secret.code == "policy" and secret.policy_ids == ("no-secret-prompt",)
    small = ask(w, "refund-bot", ActionKind.SAMPLING, "", {"messages": [], "maxTokens": 50})
    assert small.allowed and small.grant == b""  # sampling goes to the agent: no upstream grant
    entry = parse_entry(w.log[small.log_index])
    assert isinstance(entry, DecisionEntry) and entry.tool == "sampling/createMessage:"
    big = ask(w, "refund-bot", ActionKind.SAMPLING, "", {"messages": [], "maxTokens": 5000})
    assert big.code == "no-permit"
    # The sampling request's answer is its outcome, like a tool call's.
    out = w.core.record_outcome(
        decision_index=small.log_index,
        result_sha256=b"\x01" * 32,
        error="",
        duration_us=5,
        paid_amount="",
        persisted_size=len(w.log),
    )
    w.persist(out)
    outcome = parse_entry(w.log[out.first_index])
    assert isinstance(outcome, OutcomeEntry) and outcome.decision_index == small.log_index
    # Elicitation: nothing permits it here.
    assert ask(w, "refund-bot", ActionKind.ELICITATION, "", {"message": "your card number?"}).code == "no-permit"


def test_tool_limits_and_payments_do_not_apply_to_other_kinds(w: World) -> None:
    paid = ask(w, "refund-bot", ActionKind.PROMPT, "greet", {"name": "greet"}, payment=b'{"x402Version":1}')
    assert paid.code == "bad-arguments" and "only a tools/call" in paid.reason
    v = ask(w, "refund-bot", ActionKind.PROMPT, "greet", {"name": "greet"})
    entry = parse_entry(w.log[v.log_index])
    assert isinstance(entry, DecisionEntry) and entry.charges == {}  # the refund agent's call rate counts tools


def test_a_hostile_uri_is_bounded_and_leaves_a_parseable_entry(w: World) -> None:
    uri = "docs://" + "\ud800é" * 3000
    raw = json.dumps({"uri": uri}).encode()  # escaped as JSON: the lone surrogate reaches the enclave
    v = w.core.authorize(
        token=w.token("refund-bot", ["refund-agent"]),
        server="refunds",
        tool=uri,
        arguments_json=raw,
        request_id="r",
        persisted_size=len(w.log),
        kind=ActionKind.RESOURCE,
    )
    w.persist(v.log)
    entry = parse_entry(w.log[v.log_index])
    assert isinstance(entry, DecisionEntry) and len(entry.tool) <= 256 and entry.tool.startswith("resources/read:")


def test_listing_filters_resources_by_uri_and_prompts_by_name(w: World) -> None:
    items = [
        (ActionKind.RESOURCE, "refunds", "docs://a"),
        (ActionKind.RESOURCE, "refunds", "file:///x"),
        (ActionKind.RESOURCE, "refunds", "docs://{id}"),  # a template: its URIs are not made yet
        (ActionKind.PROMPT, "refunds", "greet"),
        (ActionKind.PROMPT, "refunds", "secret"),
        (ActionKind.PROMPT, "nowhere", "greet"),
        (ActionKind.TOOL, "refunds", "customer_lookup"),
    ]
    agent, shown = w.core.visible_items(w.token("refund-bot", ["refund-agent"]), items)
    assert agent == "refund-bot" and shown == [0, 2, 3, 6]
    _, none = w.core.visible_items(w.token("research-bot", ["research-agent"]), items[:6])
    assert none == []


def test_an_unknown_action_kind_on_the_wire_is_refused(w: World) -> None:
    class Aborted(Exception):
        pass

    class Context:
        def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise Aborted(code, details)

    request = pb.AuthorizeRequest(token="t", server="refunds", tool="x", arguments_json=b"{}", kind=99)  # type: ignore[arg-type]
    with pytest.raises(Aborted) as aborted:
        EnclaveService(w.core).Authorize(request, Context())  # type: ignore[arg-type]
    assert aborted.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT and "unknown action kind" in aborted.value.args[1]


def test_policy_explain_runs_the_same_decision_for_the_other_kinds(w: World) -> None:
    from cloister.enclave.bundle import read_bundle_dir
    from cloister.policytools.explain import explain, parse_at, render
    from cloister.policytools.validate import validate_files

    files = read_bundle_dir(w.bundle_dir)
    files["policies/mcp.cedar"] = POLICIES.encode()
    validation = validate_files(files)
    at = parse_at(None)
    common: dict[str, Any] = {"agent": "refund-bot", "roles": None, "server": "refunds", "at": at}
    ok = explain(validation, tool="docs://a", arguments_json='{"uri": "docs://a"}', kind=ActionKind.RESOURCE, **common)
    assert ok.decision == "allow" and [p["id"] for p in ok.policies] == ["docs"] and ok.limits == []
    assert "resources/read 'docs://a' on refunds" in render(ok)
    no = explain(validation, tool="secret", arguments_json='{"name": "secret"}', kind=ActionKind.PROMPT, **common)
    assert no.decision == "deny" and no.code == "policy" and [p["id"] for p in no.policies] == ["no-secret-prompt"]
    big = explain(validation, tool="", arguments_json='{"maxTokens": 500}', kind=ActionKind.SAMPLING, **common)
    assert big.code == "no-permit" and big.evaluation_errors == []
