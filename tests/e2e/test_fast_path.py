"""The fast path (decision 0023) with real processes: the official MCP client's tools/call is
answered by it (the relay's admin-only debug stat counts it), a cancelled fast-path call gets its
"cancelled by the client" outcome, and what the fast path must not take (another agent's session,
a malformed or unusual request) reaches the SDK and gets the SDK's answer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest

from cloister.verify.entries import DecisionEntry
from tests.e2e.conftest import ADMIN_TOKEN, Stack
from tests.e2e.test_cancellation import logged
from tests.e2e.test_clients import INSPECTOR, MCP_REMOTE, NODE_MODULES, guide_block, needs_node, run
from tests.e2e.test_relay import client


def stats(stack: Stack) -> dict[str, int]:
    r = httpx2.get(f"{stack.relay_url}/admin/fast-path", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200, r.text
    body: dict[str, int] = r.json()
    return body


def test_the_stat_is_for_the_admin_only(stack: Stack) -> None:
    assert httpx2.get(f"{stack.relay_url}/admin/fast-path").status_code == 401
    r = httpx2.get(f"{stack.relay_url}/admin/fast-path", headers={"Authorization": f"Bearer {stack.token()}"})
    assert r.status_code == 401


def test_the_official_client_s_calls_take_the_fast_path(stack: Stack) -> None:
    before = stats(stack)

    async def calls() -> list[Any]:
        async with client(stack, stack.token()) as c:
            return [await c.call_tool("slow___echo", {"text": f"hello {i}"}) for i in range(5)]

    results = anyio.run(calls)
    assert [r.content[0].text for r in results] == [f"hello {i}" for i in range(5)]
    assert all(not r.is_error and r.meta["dev.cloister/log"]["outcome"] > 0 for r in results)
    after = stats(stack)
    assert after["calls"] - before["calls"] == 5, (before, after)


class Session:
    """A raw streamable HTTP session (initialize + initialized), for requests no client would send."""

    def __init__(self, stack: Stack, token: str, version: str = "2025-11-25") -> None:
        self.url = stack.mcp_url
        self.headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
        }
        r = httpx2.post(self.url, headers=self.headers, content=orjson.dumps(init))
        assert r.status_code == 200, r.text
        self.headers["Mcp-Session-Id"] = r.headers["mcp-session-id"]
        self.headers["MCP-Protocol-Version"] = version
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert httpx2.post(self.url, headers=self.headers, content=orjson.dumps(note)).status_code == 202
        # A request the SDK serves: the session is noted by the time it is answered.
        self.post({"jsonrpc": "2.0", "id": "list", "method": "tools/list"})

    def post(self, body: Any, **headers: str) -> httpx2.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        return httpx2.post(self.url, headers={**self.headers, **headers}, content=content, timeout=10)


def sse_message(r: httpx2.Response) -> Any:
    assert r.headers["content-type"].startswith("text/event-stream"), r.headers
    data = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    return orjson.loads(data[-1])


def call(n: Any, text: str = "x") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": n,
        "method": "tools/call",
        "params": {"name": "slow___echo", "arguments": {"text": text}},
    }


def test_string_and_number_ids_are_echoed_as_sent(stack: Stack) -> None:
    s = Session(stack, stack.token())
    before = stats(stack)
    for rid in (7, "7", "x-y", 2**53):
        r = s.post(call(rid))
        assert r.status_code == 200 and r.headers["mcp-session-id"] == s.headers["Mcp-Session-Id"]
        answer = sse_message(r)
        assert answer["id"] == rid and type(answer["id"]) is type(rid) and answer["result"]["content"][0]["text"] == "x"
    assert stats(stack)["calls"] - before["calls"] == 4


def test_another_agent_s_session_id_decides_as_the_sender(stack: Stack) -> None:
    """A malicious agent sends its own token with another agent's session id: the call is decided
    with the token it carries (as on the SDK's path), never the session owner's."""
    victim = Session(stack, stack.token("test-bot"))
    thief = httpx2.post(
        stack.mcp_url,
        headers={**victim.headers, "Authorization": f"Bearer {stack.token('research-bot', roles=['research-agent'])}"},
        content=orjson.dumps(call(1)),
    )
    answer = sse_message(thief)
    denial = answer["result"]["_meta"]["dev.cloister/denial"]
    assert answer["result"]["isError"] and denial["agent"] == "research-bot", answer
    entries = logged(stack)
    assert isinstance(entries[denial["log_index"]], DecisionEntry)
    assert entries[denial["log_index"]].agent == "research-bot"


def test_what_the_fast_path_must_not_take_reaches_the_sdk(stack: Stack) -> None:
    s = Session(stack, stack.token())
    before = stats(stack)
    # A progress token: the SDK's progress plumbing answers it (and still calls through the call path).
    r = s.post({**call(1), "params": {**call(1)["params"], "_meta": {"progressToken": "p"}}})
    assert sse_message(r)["result"]["content"][0]["text"] == "x"
    # Not JSON, not JSON-RPC, not one request: the SDK's errors.
    assert s.post(b"{not json").status_code == 400
    assert s.post({"jsonrpc": "1.0", "id": 1, "method": "tools/call"}).status_code == 400
    assert s.post([call(1), call(2)]).status_code == 400
    # Deep nesting is left to the SDK's parser before orjson spends anything on it.
    deep = (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"slow___echo","arguments":{"a":'
        + b"[" * 300
        + b"]" * 300
        + b"}}}"
    )
    assert s.post(deep).status_code == 400
    # An unknown session: the SDK's 404.
    assert s.post(call(1), **{"Mcp-Session-Id": "f" * 32}).status_code == 404
    # Wrong Accept / Content-Type: the SDK's 406 / 400.
    assert s.post(call(1), Accept="application/json").status_code == 406
    assert s.post(call(1), **{"Content-Type": "text/plain"}).status_code == 400
    after = stats(stack)
    assert after["calls"] == before["calls"] and after["fell_through"] - before["fell_through"] == 8


def test_a_cancelled_fast_path_call_gets_its_outcome(stack: Stack) -> None:
    s = Session(stack, stack.token())
    before = stats(stack)

    async def scenario() -> httpx2.Response:
        async with httpx2.AsyncClient(timeout=10) as h, anyio.create_task_group() as tg:
            answer: list[httpx2.Response] = []

            async def slow() -> None:
                body = {
                    "jsonrpc": "2.0",
                    "id": 41,
                    "method": "tools/call",
                    "params": {"name": "slow___sleep", "arguments": {"seconds": 1.5}},
                }
                answer.append(await h.post(s.url, headers=s.headers, content=orjson.dumps(body)))

            tg.start_soon(slow)
            await anyio.sleep(0.5)
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 41}}
            r = await h.post(s.url, headers=s.headers, content=orjson.dumps(cancel))
            assert r.status_code == 202
        return answer[0]

    r = anyio.run(scenario)
    assert sse_message(r)["error"] == {"code": -32800, "message": "Request cancelled"}
    after = stats(stack)
    assert after["cancelled"] - before["cancelled"] == 1
    sleeps = [e for e in logged(stack) if getattr(e, "decision_index", None) is not None]
    assert sleeps[-1].error == "cancelled by the client"


@needs_node
def test_the_typescript_sdk_s_calls_take_the_fast_path(stack: Stack, tmp_path: Path) -> None:
    """The client guide's TypeScript agent (a 2025-era session) against this relay."""
    (tmp_path / "node_modules").symlink_to(NODE_MODULES.resolve())
    (tmp_path / "agent.mjs").write_text(guide_block("typescript-sdk"))
    before = stats(stack)
    env = {**os.environ, "CLOISTER_URL": stack.mcp_url, "CLOISTER_TOKEN": stack.token()}
    out = run(["node", "agent.mjs"], env, cwd=tmp_path)
    assert "result: hello from typescript" in out, out
    assert stats(stack)["calls"] - before["calls"] == 1


@needs_node
@pytest.mark.skipif(not MCP_REMOTE.exists(), reason="needs mcp-remote in tests/node")
def test_the_inspector_through_mcp_remote_takes_the_fast_path(stack: Stack, tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    header = f"Authorization:Bearer {stack.token()}"
    cli = INSPECTOR / "cli" / "build" / "cli.js"
    args = ["node", str(cli), "--cli", "node", str(MCP_REMOTE), stack.mcp_url, "--header", header]
    before = stats(stack)
    out = run([*args, "--method", "tools/call", "--tool-name", "slow___echo", "--tool-arg", "text=inspected"], env)
    assert json.loads(out)["content"][0]["text"] == "inspected", out
    assert stats(stack)["calls"] - before["calls"] == 1
