"""The fast path (decision 0023) in-process: the relay's real McpHandlers, CallPath and in-process
enclave, the SDK's real Starlette app and session manager, driven over ASGI. Every request is sent
twice, once through the fast path and once straight to the SDK's app (same server, same sessions),
and the answers must agree: the fast path answers only what it answers exactly as the SDK does,
and leaves everything else to it (counted in its stats)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
from mcp.server import Server
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.types import ASGIApp, Message, Scope

from cloister.relay.fast_path import FastPath, live_sdk_session
from cloister.relay.mcp_handlers import McpHandlers
from tests.relay.test_call_path import Rig, refund_bot, research_bot, run

HOST = "127.0.0.1:8000"
LEGACY = "2025-11-25"
MODERN = "2026-07-28"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def message(self) -> Any:
        """The JSON-RPC message: a JSON body, or the last SSE event's data."""
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            data = [line[6:] for line in self.body.decode().splitlines() if line.startswith("data: ")]
            return orjson.loads(data[-1])
        return orjson.loads(self.body) if self.body else None

    def comparable(self) -> Any:
        """What must agree between the two paths: status, media type, the message with its log
        indexes and session id masked (each call appends its own entries; sessions are random)."""
        try:
            message = self.message() if self.body.strip() else None
        except orjson.JSONDecodeError:  # a plain-text refusal (transport security, 413)
            message = self.body
        return (self.status, self.headers.get("content-type", "").split(";")[0], _masked(message))


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<log>" if k == "dev.cloister/log" else _masked(v)) for k, v in value.items() if k != "log_index"}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"index \d+", "index <n>", value)
    return value


async def asgi(app: ASGIApp, body: bytes, headers: dict[str, str], user: Any = None, method: str = "POST") -> Answer:
    """One HTTP request through `app`, as uvicorn would present it."""
    done = anyio.Event()
    sent: list[Message] = []
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", HOST.encode()), (b"content-length", str(len(body)).encode()), *raw],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    if user is not None:
        scope["user"] = user
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    with anyio.fail_after(10):
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    hdrs = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    return Answer(
        start["status"], hdrs, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    )


@dataclass
class Relay:
    rig: Rig
    server: Server[Any]
    sdk: ASGIApp  # the SDK's app alone
    fast: FastPath  # the fast path in front of it

    @property
    def manager(self) -> StreamableHTTPSessionManager:
        return self.server.session_manager

    async def session(self, token: str, user: Any = None) -> dict[str, str]:
        """A 2025-era session the SDK established (initialize, initialized, tools/list): its headers."""
        headers = _headers(token, LEGACY)
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": LEGACY,
                "capabilities": {"sampling": {}},
                "clientInfo": {"name": "t", "version": "0"},
            },
        }
        r = await asgi(
            self.sdk, orjson.dumps(init), {k: v for k, v in headers.items() if k != "MCP-Protocol-Version"}, user
        )
        assert r.status == 200, r.body
        headers["Mcp-Session-Id"] = r.headers["mcp-session-id"]
        note = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert (await asgi(self.sdk, note, headers, user)).status == 202
        listing = orjson.dumps({"jsonrpc": "2.0", "id": "l", "method": "tools/list"})
        assert (await asgi(self.sdk, listing, headers, user)).status == 200
        return headers

    async def both(self, body: Any, headers: dict[str, str], user: Any = None) -> tuple[Answer, Answer]:
        """The same request through the fast path and straight to the SDK."""
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        return await asgi(self.fast, raw, headers, user), await asgi(self.sdk, raw, headers, user)


def _headers(token: str, version: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": version,
    }


def in_relay(tmp: Path, scenario: Callable[[Relay], Awaitable[None]]) -> None:
    async def with_relay(rig: Rig) -> None:
        handlers = McpHandlers(rig.state, rig.upstreams, rig.calls)
        server = handlers.server()
        sdk = server.streamable_http_app(host="127.0.0.1")
        fast = FastPath(sdk, server, handlers)
        async with server.session_manager.run():
            await scenario(Relay(rig, server, sdk, fast))

    run(tmp, with_relay)


def call(rid: Any = 1, name: str = "refunds___customer_lookup", arguments: Any = None, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "name": name,
        "arguments": {"customer_id": "cus_1001"} if arguments is None else arguments,
    }
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {**params, **extra}}


def modern_call(rid: Any = 1, name: str = "refunds___customer_lookup", **extra: Any) -> dict[str, Any]:
    body = call(rid, name)
    body["params"]["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "0"},
        **extra,
    }
    return body


def modern_headers(token: str, name: str = "refunds___customer_lookup") -> dict[str, str]:
    return {**_headers(token, MODERN), "Mcp-Method": "tools/call", "Mcp-Name": name}


# ---- the SDK internals the fast path reads --------------------------------------------------------


def test_the_sdk_internals_the_fast_path_reads(tmp_path: Path) -> None:
    """live_sdk_session reads the SDK session manager's private tables: this fails if the SDK
    changes them (then the fast path would take nothing, and the e2e stat tests fail too)."""

    async def scenario(r: Relay) -> None:
        headers = await r.session(refund_bot(r.rig))
        sid = headers["Mcp-Session-Id"]
        assert isinstance(r.manager._server_instances, dict) and isinstance(r.manager._session_owners, dict)
        assert isinstance(r.manager._server_instances[sid], StreamableHTTPServerTransport)
        scope: Scope = {"type": "http"}
        assert live_sdk_session(r.manager, sid, scope) is r.manager._server_instances[sid]
        assert live_sdk_session(r.manager, "0" * 32, scope) is None
        # A session ended by its client (DELETE) is not live.
        deleted = await asgi(r.sdk, b"", headers, method="DELETE")
        assert deleted.status == 200
        assert live_sdk_session(r.manager, sid, scope) is None

    in_relay(tmp_path, scenario)


# ---- taken, and answered as the SDK answers -------------------------------------------------------


def test_a_call_is_taken_and_answered_as_the_sdk_answers(tmp_path: Path) -> None:
    async def scenario(r: Relay) -> None:
        headers = await r.session(refund_bot(r.rig))
        for rid in (1, "1", "a-b", 2**53, -5):
            before = r.fast.stats.calls
            fast, sdk = await r.both(call(rid), headers)
            assert r.fast.stats.calls == before + 1
            assert fast.comparable() == sdk.comparable(), (fast, sdk)
            assert fast.headers["mcp-session-id"] == sdk.headers["mcp-session-id"] == headers["Mcp-Session-Id"]
            for name in ("cache-control", "x-accel-buffering", "content-type"):
                assert fast.headers[name] == sdk.headers[name]
            message = fast.message()
            assert message["id"] == rid and type(message["id"]) is type(rid)
            assert message["result"]["_meta"]["dev.cloister/log"]["outcome"] > 0
        # A denial the model can act on: an isError result, the same on both paths.
        research = await r.session(research_bot(r.rig))
        fast, sdk = await r.both(call(9), research)
        assert fast.comparable() == sdk.comparable()
        assert fast.message()["result"]["isError"] is True
        # Denials asked for as JSON-RPC errors, and an unknown tool: the same errors.
        fast, sdk = await r.both(call(10, _meta={"dev.cloister/denials": "error"}), research)
        assert fast.comparable() == sdk.comparable() and fast.message()["error"]["code"] == -32001
        fast, sdk = await r.both(call(11, name="refunds___nope"), headers)
        assert fast.comparable() == sdk.comparable()

    in_relay(tmp_path, scenario)


def test_a_2026_request_is_taken_and_answered_as_the_sdk_answers(tmp_path: Path) -> None:
    async def scenario(r: Relay) -> None:
        token = refund_bot(r.rig)
        before = r.fast.stats.calls
        fast, sdk = await r.both(modern_call(3), modern_headers(token))
        assert r.fast.stats.calls == before + 1
        assert fast.comparable() == sdk.comparable(), (fast, sdk)
        assert "mcp-session-id" not in fast.headers
        result = fast.message()["result"]
        assert result["resultType"] == "complete" and "io.modelcontextprotocol/serverInfo" in result["_meta"]
        # An unknown tool: an error with the SDK's HTTP status.
        fast, sdk = await r.both(modern_call(4, "refunds___nope"), modern_headers(token, "refunds___nope"))
        assert fast.comparable() == sdk.comparable(), (fast, sdk)

    in_relay(tmp_path, scenario)


# ---- malformed or unusual: the SDK's answer, from the SDK ----------------------------------------


def test_malformed_and_unusual_requests_get_the_sdk_s_answer(tmp_path: Path) -> None:
    async def scenario(r: Relay) -> None:
        token = refund_bot(r.rig)
        headers = await r.session(token)
        deep = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"refunds___customer_lookup","arguments":{"a":'
        cases: list[tuple[str, Any, dict[str, str]]] = [
            ("parse error", b'{"jsonrpc":"2.0",', headers),
            ("not an object", b"[1, 2]", headers),
            ("a batch", orjson.dumps([call(1), call(2)]), headers),
            ("jsonrpc 1.0", {**call(), "jsonrpc": "1.0"}, headers),
            ("id null", {**call(), "id": None}, headers),
            ("id true", {**call(), "id": True}, headers),
            ("id float", {**call(), "id": 1.5}, headers),
            ("params a list", {**call(), "params": [1]}, headers),
            ("arguments a list", call(arguments=[1, 2]), headers),
            ("arguments a string", call(arguments="x"), headers),
            ("name a number", {**call(), "params": {"name": 5}}, headers),
            ("an unknown params key", call(task={"ttl": 1}), headers),
            ("an extra envelope key", {**call(), "extra": 1}, headers),
            ("deep nesting", deep + b"[" * 220 + b"]" * 220 + b"}}}", headers),
            (
                "a 22-digit integer",
                orjson.dumps(call(arguments={"customer_id": 0})).replace(b":0}", b":1234567890123456789012}"),
                headers,
            ),
            ("a progress token", call(_meta={"progressToken": "p"}), headers),
            ("trace context", call(_meta={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}), headers),
            ("unknown session", call(), {**headers, "Mcp-Session-Id": "f" * 32}),
            ("no session", call(), {k: v for k, v in headers.items() if k != "Mcp-Session-Id"}),
            ("wrong content type", call(), {**headers, "Content-Type": "text/plain"}),
            ("json-ish content type", call(), {**headers, "Content-Type": "application/json-seq"}),
            ("accepts only JSON", call(), {**headers, "Accept": "application/json"}),
            ("accepts only SSE", call(), {**headers, "Accept": "text/event-stream"}),
            ("another version", call(), {**headers, "MCP-Protocol-Version": "2025-06-18"}),
            ("an unknown version", call(), {**headers, "MCP-Protocol-Version": "2099-01-01"}),
            ("a foreign host", call(), {**headers, "Host": "evil.example"}),
            ("a foreign origin", call(), {**headers, "Origin": "http://evil.example"}),
            ("Mcp-Param header", call(), {**headers, "Mcp-Param-Customer": "x"}),
            ("2026: no envelope", call(), modern_headers(token)),
            ("2026: name mismatch", modern_call(), modern_headers(token, "refunds___other")),
            (
                "2026: a notification",
                {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
                modern_headers(token),
            ),
            ("2026: a log opt-in", modern_call(**{"io.modelcontextprotocol/logLevel": "info"}), modern_headers(token)),
        ]
        for what, body, hdrs in cases:
            calls, fell = r.fast.stats.calls, r.fast.stats.fell_through
            fast, sdk = await r.both(body, hdrs)
            assert r.fast.stats.calls == calls and r.fast.stats.fell_through == fell + 1, what
            if what == "no session":  # each opens a session of its own: only the outcome must agree
                assert fast.status == sdk.status, what
                continue
            assert fast.comparable() == sdk.comparable(), (what, fast, sdk)

    in_relay(tmp_path, scenario)


def test_an_oversized_body_is_refused_by_the_sdk_before_it_is_parsed(tmp_path: Path) -> None:
    async def scenario(r: Relay) -> None:
        headers = await r.session(refund_bot(r.rig))
        huge = call(arguments={"customer_id": "x" * (r.manager.max_request_body_size + 1)})
        fast, sdk = await r.both(huge, headers)
        assert fast.status == sdk.status == 413 and fast.body == sdk.body
        assert r.fast.stats.calls == 0

    in_relay(tmp_path, scenario)


# ---- attacks --------------------------------------------------------------------------------------


def test_a_session_bound_to_a_credential_is_not_served_to_another(tmp_path: Path) -> None:
    """When the SDK binds a session to the credential that created it, a request with another
    credential is not taken (the SDK answers it 404, exactly as for an unknown session)."""

    def user(client: str) -> AuthenticatedUser:
        return AuthenticatedUser(AccessToken(token=f"t-{client}", client_id=client, scopes=[]))

    async def scenario(r: Relay) -> None:
        token = refund_bot(r.rig)
        headers = await r.session(token, user("alice"))
        fast, sdk = await r.both(call(1), headers, user("mallory"))
        assert fast.status == sdk.status == 404 and r.fast.stats.calls == 0
        fast, sdk = await r.both(call(2), headers, user("alice"))
        assert fast.status == 200 and r.fast.stats.calls == 1

    in_relay(tmp_path, scenario)


def test_another_agent_s_session_decides_as_the_token_sent(tmp_path: Path) -> None:
    async def scenario(r: Relay) -> None:
        victim = await r.session(refund_bot(r.rig))
        thief = {**victim, "Authorization": f"Bearer {research_bot(r.rig)}"}
        fast, sdk = await r.both(call(1), thief)
        assert fast.comparable() == sdk.comparable()
        denial = fast.message()["result"]["_meta"]["dev.cloister/denial"]
        assert denial["agent"] == "research-bot"
        assert not [f for f in r.rig.forwarded() if f.tool == "customer_lookup"]

    in_relay(tmp_path, scenario)


def test_a_cancel_of_a_fast_path_call_cancels_it_with_its_outcome(tmp_path: Path) -> None:
    async def scenario(r: Relay) -> None:
        headers = await r.session(refund_bot(r.rig))
        r.rig.stand_ins["refunds"].hang = True
        answers: list[Answer] = []
        async with anyio.create_task_group() as tg:

            async def slow() -> None:
                answers.append(await asgi(r.fast, orjson.dumps(call(77)), headers))

            tg.start_soon(slow)
            await r.rig.stand_ins["refunds"].reached.wait()
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "77"}}
            assert (await asgi(r.fast, orjson.dumps(cancel), headers)).status == 202
        assert answers[0].message()["error"] == {"code": -32800, "message": "Request cancelled"}
        assert r.fast.stats.cancelled == 1
        last = await r.rig.entry(r.rig.state.writer.persisted_size - 1)
        assert last.error == "cancelled by the client"

    in_relay(tmp_path, scenario)


def test_a_2026_call_whose_client_goes_away_is_cancelled_with_its_outcome(tmp_path: Path) -> None:
    async def scenario(r: Relay) -> None:
        r.rig.stand_ins["refunds"].hang = True
        gone = anyio.Event()
        sent: list[Message] = []
        first = True

        async def receive() -> Message:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": orjson.dumps(modern_call(5)), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        headers = [(k.lower().encode(), v.encode()) for k, v in modern_headers(refund_bot(r.rig)).items()]
        scope: Scope = {
            "type": "http",
            "method": "POST",
            "path": "/mcp",
            "headers": [(b"host", HOST.encode()), *headers],
        }
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.fast, scope, receive, send)
            await r.rig.stand_ins["refunds"].reached.wait()
            gone.set()
        assert sent == [] and r.fast.stats.cancelled == 1
        last = await r.rig.entry(r.rig.state.writer.persisted_size - 1)
        assert last.error == "cancelled by the client"

    in_relay(tmp_path, scenario)
