"""`roots/list` through Cloister (issue 11, decision 0027), with real processes: the enclave, the
relay, `@modelcontextprotocol/server-everything` (which asks for roots when the client declares
them, and offers `get-roots-list` then), and a hostile upstream on the TypeScript SDK (`roots_server.mjs`)
that asks for roots during calls, between them and while two agents' calls are in flight.

An upstream's roots/list reaches only the agent whose call it serves, decided as that agent's
(`Action::"ListRoots"`, forbiddable) and logged (decision, outcome with the answer's hash); with no
such agent, or two, it is refused, and it never gets another agent's roots. An agent's
`notifications/roots/list_changed` reaches the upstreams it uses, coalesced."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from cloister.dev.mcp_http import mcp_http_client
from cloister.dev.state import copy_example_bundle
from cloister.verify.entries import DecisionEntry, OutcomeEntry
from cloister.verify.response_sig import result_sha256
from tests.e2e.conftest import ADMIN_TOKEN, Stack
from tests.e2e.protocol_stack import EVERYTHING, EVERYTHING_UPSTREAM, protocol_stack, replayed
from tests.e2e.test_protocol import TOOLS, log_meta
from tests.e2e.test_relay import entry_at

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not EVERYTHING.exists(), reason="npm test peers not installed (scripts/test)")
NOSY_TOOLS = ["peek", "peek_slow", "peek_later", "hold"]
POLICY = """
@id("tester-tools")
permit (principal in Cloister::Role::"tester", action in Cloister::Action::"CallTool", resource);

@id("tester-roots")
permit (principal in Cloister::Role::"tester", action == Cloister::Action::"ListRoots", resource);

@id("private-roots")
forbid (principal in Cloister::Role::"private", action == Cloister::Action::"ListRoots", resource);
"""


def _bundle(dst: Path) -> Path:
    copy_example_bundle(dst)
    entities = (dst / "entities.toml").read_text()
    (dst / "entities.toml").write_text(
        entities.replace("[roles]\n", "[roles]\ntester = {}\nprivate = {}\n")
        + '\n[agents.test-bot]\nroles = ["tester"]\nregion = "eu"\n'
        + '\n[agents.peer-bot]\nroles = ["tester"]\nregion = "eu"\n'
        + '\n[agents.private-bot]\nroles = ["tester", "private"]\nregion = "eu"\n'
        + f'\n[servers.everything]\nregion = "eu"\ntools = {json.dumps([*TOOLS, "get-roots-list"])}\n'
        + f'\n[servers.nosy]\nregion = "eu"\ntools = {json.dumps(NOSY_TOOLS)}\n'
        + '\n[servers.modern]\nregion = "eu"\ntools = ["peek"]\n'
    )
    (dst / "policies" / "roots.cedar").write_text(POLICY)
    return dst


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("roots")
    # calls_file: what the hostile upstream learned (one JSON line per roots answer or notice).
    upstreams = f"""{EVERYTHING_UPSTREAM}
[[upstreams]]
name = "nosy"
command = ["node", "{HERE / "roots_server.mjs"}"]
env = {{ ROOTS_FILE = "{tmp / "roots.jsonl"}" }}
timeout_s = 20

[[upstreams]]
name = "modern"
command = [{json.dumps(sys.executable)}, "{HERE / "roots_modern_server.py"}"]
env = {{ ROOTS_FILE = "{tmp / "roots.jsonl"}" }}
timeout_s = 20
"""
    with protocol_stack(
        tmp, _bundle(tmp / "bundle"), upstreams, ["everything", "nosy", "modern"], tmp / "roots.jsonl"
    ) as s:
        yield s


class Agent:
    """An agent with roots; counts how often it was asked for them."""

    def __init__(self, *uris: str) -> None:
        self.uris = uris
        self.asked = 0

    async def roots(self, context: Any) -> types.ListRootsResult:
        self.asked += 1
        return self.result()

    def result(self) -> types.ListRootsResult:
        return types.ListRootsResult.model_validate(
            {"roots": [{"uri": u, "name": u.rsplit("/", 1)[-1]} for u in self.uris]}
        )

    def answer(self) -> dict[str, Any]:
        """The answer as the relay hashes it."""
        return self.result().model_dump(mode="json", by_alias=True, exclude_none=True)


def client(stack: Stack, token: str, agent: Agent | None, mode: str = "legacy") -> Client:
    http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    return Client(
        streamable_http_client(stack.mcp_url, http_client=http),
        cache=None,
        mode=mode,  # legacy, 2025-11-25: server-to-client requests on the call's stream
        list_roots_callback=agent.roots if agent is not None else None,
    )


def learned(stack: Stack) -> list[dict[str, Any]]:
    """Everything the hostile upstream got, in order."""
    return stack.forwarded()


async def until(done: Callable[[], bool], timeout_s: float) -> None:
    for _ in range(int(timeout_s * 10)):
        if done():
            return
        await anyio.sleep(0.1)
    raise TimeoutError(f"not done within {timeout_s}s")


def fast_path_answers(stack: Stack) -> int:
    r = httpx2.get(f"{stack.relay_url}/admin/fast-path", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    return int(r.json()["answers"])


def text(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


def between(stack: Stack, result: types.CallToolResult) -> list[Any]:
    """The entries logged inside a call: those of the upstream's requests to the agent."""
    call = log_meta(result)
    return [entry_at(stack, i) for i in range(call["decision"] + 1, call["outcome"])]


def test_server_everything_gets_the_callers_roots_when_allowed_never_when_forbidden(stack: Stack) -> None:
    """One test, in order: server-everything caches the first roots it gets for its (shared) session."""

    async def go() -> None:
        private, tester = Agent("file:///home/private/secrets"), Agent("file:///work/project-a")
        # Forbidden: the agent is never asked, the upstream gets the denial, both logged.
        async with client(stack, stack.token("private-bot", ["tester", "private"]), private) as c:
            names = [t.name for t in (await c.list_tools()).tools]
            assert "everything___get-roots-list" in names  # offered because the relay declares roots
            denied = await c.call_tool("everything___get-roots-list", {})
        assert private.asked == 0 and "secrets" not in text(denied), text(denied)
        decisions = [e for e in between(stack, denied) if isinstance(e, DecisionEntry)]
        assert [(e.tool, e.decision, e.agent, e.policies) for e in decisions] == [
            ("roots/list:", "deny", "private-bot", ("private-roots",))
        ]
        assert not any(isinstance(e, OutcomeEntry) for e in between(stack, denied))  # nothing asked of the agent
        # Allowed: the calling agent's roots, decided as its own, the answer's hash in the outcome.
        async with client(stack, stack.token(), tester) as c:
            allowed = await c.call_tool("everything___get-roots-list", {})
        assert tester.asked == 1 and "file:///work/project-a" in text(allowed), text(allowed)
        entries = between(stack, allowed)
        decision = next(e for e in entries if isinstance(e, DecisionEntry))
        assert (decision.tool, decision.decision, decision.agent, decision.policies) == (
            "roots/list:",
            "allow",
            "test-bot",
            ("tester-roots",),
        )
        outcome = next(e for e in entries if isinstance(e, OutcomeEntry))
        assert outcome.result_sha256 == result_sha256(tester.answer()) and outcome.error == ""

    anyio.run(go)


def test_a_hostile_upstream_never_gets_another_agents_roots(stack: Stack) -> None:
    """It asks while serving agent A, after A's call answered, and while calls of A and B are both
    in flight: it gets A's roots only in the first case, B's never, and nothing is asked of B."""

    async def go() -> None:
        a, b = Agent("file:///home/alice"), Agent("file:///home/bob")
        async with (
            client(stack, stack.token(), a) as ca,
            client(stack, stack.token("peer-bot", ["tester"]), b) as cb,
        ):
            await ca.list_tools()
            await cb.list_tools()  # B's session is known to the relay, and idle
            # 1. During A's call: A's roots, and only A's (the call and the agent's answer taken by
            # the fast path, decision 0023).
            answers = fast_path_answers(stack)
            peeked = json.loads(text(await ca.call_tool("nosy___peek", {})))
            assert peeked == {"when": "peek", "roots": ["file:///home/alice"]} and a.asked == 1
            assert fast_path_answers(stack) == answers + 1
            # 2. Outside any call: refused, an error and not an empty list.
            assert text(await ca.call_tool("nosy___peek_later", {"seconds": 1.0})) == "scheduled"
            await until(lambda: any(e["when"] == "later" for e in learned(stack)), 15)
            later = next(e for e in learned(stack) if e["when"] == "later")
            assert "roots" not in later and "no agent call is in flight" in later["message"], later
            # 3. A holds a call on nosy while B's call asks: it could be either's, so it is neither's.
            async with anyio.create_task_group() as tg:
                tg.start_soon(ca.call_tool, "nosy___hold", {"seconds": 3})
                await anyio.sleep(0.5)
                both = json.loads(text(await cb.call_tool("nosy___peek", {})))
            assert "roots" not in both and "calls of 2 agents are in flight" in both["message"], both
        assert a.asked == 1 and b.asked == 0
        everything_seen = json.dumps(learned(stack))
        assert "bob" not in everything_seen

    anyio.run(go)


def test_a_2026_upstream_gets_the_callers_roots_in_an_input_round(stack: Stack) -> None:
    """A Python SDK upstream on 2026-07-28 asks inside its tools/call result (input_required): the
    relay answers the round through the same decision, for the same one agent, or refuses it."""

    async def go() -> None:
        a = Agent("file:///home/alice")
        async with client(stack, stack.token(), a) as c:
            result = await c.call_tool("modern___peek", {})
            assert not result.is_error and json.loads(text(result)) == ["file:///home/alice"], result
            assert a.asked == 1
            decisions = [e for e in between(stack, result) if isinstance(e, DecisionEntry)]
            assert [(e.tool, e.decision, e.agent) for e in decisions] == [("roots/list:", "allow", "test-bot")]
        private = Agent("file:///home/private")
        async with client(stack, stack.token("private-bot", ["tester", "private"]), private) as c:
            # The SDK's input-round driver fails the call on a refused round: an upstream failure.
            with pytest.raises(MCPError) as denied:
                await c.call_tool("modern___peek", {})
        assert private.asked == 0 and "forbidden by policy private-roots" in denied.value.error.message
        assert not [e for e in learned(stack) if e.get("when") == "modern" and "file:///home/private" in e["roots"]]

    anyio.run(go)


def test_an_agent_without_roots_answers_method_not_found(stack: Stack) -> None:
    async def go() -> None:
        async with client(stack, stack.token(), None) as c:
            got = json.loads(text(await c.call_tool("nosy___peek", {})))
        assert got["error"] == -32601 and "does not offer it" in got["message"], got
        # A 2026-07-28 agent that offers roots answers in an input round of its call (decision 0030).
        modern = Agent("file:///x")
        async with client(stack, stack.token(), modern, mode="auto") as c:
            assert c.protocol_version == "2026-07-28"
            result = await c.call_tool("nosy___peek", {})
            got = json.loads(text(result))
        assert got["roots"] == ["file:///x"] and modern.asked == 1, got
        assert [e.tool for e in between(stack, result) if isinstance(e, DecisionEntry)] == ["roots/list:"]
        # One that declares no roots is never asked: refused (-32601) before any decision.
        async with client(stack, stack.token(), None, mode="auto") as c:
            result = await c.call_tool("nosy___peek", {})
            got = json.loads(text(result))
        assert got["error"] == -32601 and "cannot take it" in got["message"], got
        assert not [e for e in between(stack, result) if isinstance(e, DecisionEntry)]

    anyio.run(go)


def test_an_agents_roots_list_changed_reaches_the_upstreams_it_uses_coalesced(stack: Stack) -> None:
    async def go() -> None:
        before = len([e for e in learned(stack) if e["when"] == "list_changed"])
        async with client(stack, stack.token(), Agent("file:///a")) as c:
            await c.list_tools()  # the session uses everything and nosy
            started = time.monotonic()
            for _ in range(50):  # a flood: coalesced per upstream
                await c.send_roots_list_changed()
            await until(lambda: len([e for e in learned(stack) if e["when"] == "list_changed"]) > before, 10)
            await anyio.sleep(1.5)
            elapsed = time.monotonic() - started
        got = len([e for e in learned(stack) if e["when"] == "list_changed"]) - before
        assert 1 <= got <= 2 + elapsed, (got, elapsed)

    anyio.run(go)


def test_roots_entries_replay(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The auditor reads every entry the roots requests left (decisions and outcomes)."""

    async def deny() -> None:
        private = Agent("file:///home/private")
        async with client(stack, stack.token("private-bot", ["tester", "private"]), private) as c:
            got = json.loads(text(await c.call_tool("nosy___peek", {})))
        assert "roots" not in got and "forbidden by policy private-roots" in got["message"], got
        assert private.asked == 0

    anyio.run(deny)
    monkeypatch.setenv("CLOISTER_STATE", str(stack.state.root))
    summary = replayed(stack.relay_url, tmp_path / "a")
    assert summary["denials_by_code"].get("policy", 0) >= 1, summary
