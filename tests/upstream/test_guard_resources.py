"""GrantGuard on resources/read and prompts/get (decision 0018): the relay forwards a read or a
prompt only with the grant the enclave issued for exactly that request; an upstream using the
guard refuses one without it, with another request's grant, or with a tool call's grant."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from cloister.enclave.bundle import ActionKind
from cloister.upstream.guard import GrantGuard
from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY
from tests.enclave.test_mcp_actions import POLICIES, ask
from tests.upstream.test_guard import guard_for, refused
from tests.world import World, make_world


@pytest.fixture
def w(tmp_path: Path) -> World:
    world = make_world(tmp_path)
    _, _, a = world.core.load_policy(world.sign_bundle(2, {"policies/mcp.cedar": POLICIES}))
    world.persist(a)
    return world


def meta(w: World, grant: bytes) -> dict[str, Any]:
    doc, _ = w.core.attest(b"n" * 16, include_checkpoint=False)
    return {GRANT_META_KEY: base64.b64encode(grant).decode(), ATTESTATION_META_KEY: base64.b64encode(doc).decode()}


def test_a_granted_read_and_prompt_pass_and_nothing_else_does(w: World) -> None:
    guard: GrantGuard = guard_for(w)
    read = ask(w, "refund-bot", ActionKind.RESOURCE, "docs://a", {"uri": "docs://a"})
    prompt = ask(w, "refund-bot", ActionKind.PROMPT, "greet", {"name": "greet", "arguments": {"who": "x"}})
    assert read.allowed and prompt.allowed
    claims = guard.check_request("resources/read", {"uri": "docs://a", "_meta": meta(w, read.grant)})
    assert claims.tool == "resources/read:docs://a"
    guard.check_request("prompts/get", {"name": "greet", "arguments": {"who": "x"}, "_meta": meta(w, prompt.grant)})
    # Another URI, other prompt arguments, no grant, the read's grant for a prompt: refused.
    other = ask(w, "refund-bot", ActionKind.RESOURCE, "docs://b", {"uri": "docs://b"})
    with pytest.raises(Exception, match="grant refused"):
        guard.check_request("resources/read", {"uri": "docs://a", "_meta": meta(w, other.grant)})
    again = ask(w, "refund-bot", ActionKind.PROMPT, "greet", {"name": "greet", "arguments": {"who": "x"}})
    with pytest.raises(Exception, match="wrong-arguments|different arguments"):
        guard.check_request("prompts/get", {"name": "greet", "arguments": {"who": "y"}, "_meta": meta(w, again.grant)})
    with pytest.raises(Exception, match="missing"):
        guard.check_request("resources/read", {"uri": "docs://a"})
    third = ask(w, "refund-bot", ActionKind.RESOURCE, "docs://a", {"uri": "docs://a"})
    with pytest.raises(Exception, match="grant refused"):
        guard.check_request("prompts/get", {"name": "docs://a", "_meta": meta(w, third.grant)})


def test_a_read_grant_is_single_use_and_never_a_tool_call(w: World) -> None:
    guard = guard_for(w)
    read = ask(w, "refund-bot", ActionKind.RESOURCE, "docs://a", {"uri": "docs://a"})
    params = {"uri": "docs://a", "_meta": meta(w, read.grant)}
    guard.check_request("resources/read", params)
    with pytest.raises(Exception, match="grant refused"):
        guard.check_request("resources/read", params)  # replayed
    fresh = ask(w, "refund-bot", ActionKind.RESOURCE, "docs://a", {"uri": "docs://a"})
    refused(guard, {"name": "docs://a", "arguments": {"uri": "docs://a"}, "_meta": meta(w, fresh.grant)}, "wrong-call")


def test_the_attestation_read_needs_no_grant_and_other_reads_do(w: World) -> None:
    """The relay reads `cloister://attestation/<nonce>` to prove the server before any grant
    exists (attested_server); every other read goes through the grant check."""
    from types import SimpleNamespace

    import anyio
    from mcp.shared.exceptions import MCPError

    guard = guard_for(w)

    answered: dict[str, Any] = {"contents": []}

    async def next_(_ctx: object) -> dict[str, Any]:
        return answered

    async def main() -> None:
        attest = SimpleNamespace(method="resources/read", params={"uri": "cloister://attestation/00ff"})
        assert await guard(attest, next_) is answered  # type: ignore[arg-type]
        other = SimpleNamespace(method="resources/read", params={"uri": "docs://a"})
        with pytest.raises(MCPError, match="grant refused"):
            await guard(other, next_)  # type: ignore[arg-type]

    anyio.run(main)
