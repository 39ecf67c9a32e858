"""Upstreams for tests/e2e/test_upstream_json.py, run as their own processes (no tests here).

    python -m tests.e2e.test_upstream_json_peers hostile PORT RECORD_FILE
    python -m tests.e2e.test_upstream_json_peers sdk PORT

`hostile` is a hand-written streamable-HTTP MCP server on raw asyncio sockets. It speaks the
2025-11-25 handshake (it refuses server/discover, so the SDK falls back to initialize and gets a
Mcp-Session-Id) and answers each tool by misbehaving as named: oversized, endless or malformed
replies, the wrong id, SSE streams that never answer. It appends what it received (requests,
cancellations, answers to its own requests, closed connections) to RECORD_FILE as JSON lines.

`sdk` is the SDK's MCPServer over streamable HTTP (2026-07-28): reference tools whose results
exercise what pydantic normalises (nulls, extra fields, defaults).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated, Any

from mcp.server.mcpserver import Elicit, Resolve
from pydantic import BaseModel

SESSION = "hostile-session-1"
TOOLS = [
    "ok",
    "ok_sse",
    "big",
    "endless",
    "endless_events",
    "malformed",
    "wrong_id",
    "never_answers",
    "ends_early",
    "deep",
    "long_int",
    "not_object",
    "http_error",
    "status_500",
    "status_404",
    "asks_ping",
    "logs",
    "slow",
    "raw_fields",
]


class Hostile:
    def __init__(self, record: str) -> None:
        self.record = record
        self.answers: dict[Any, asyncio.Future[Any]] = {}

    def note(self, **what: Any) -> None:
        with open(self.record, "a") as f:
            f.write(json.dumps(what) + "\n")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method = lines[0].split(" ")[0]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self.handle(method, headers, body, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def handle(
        self,
        method: str,
        headers: dict[str, str],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one HTTP request; False closes the connection."""
        if method != "POST":
            return self.plain(writer, 405, b"")
        msg = json.loads(body)
        rpc = msg.get("method")
        rid = msg.get("id")
        if rpc is None:  # a response to one of our requests
            fut = self.answers.pop(msg.get("id"), None)
            if fut is not None:
                fut.set_result(msg)
            self.note(kind="answer", message=msg, session=headers.get("mcp-session-id"))
            return self.plain(writer, 202, b"")
        if rid is None:  # a notification
            self.note(kind="notification", message=msg, session=headers.get("mcp-session-id"))
            return self.plain(writer, 202, b"")
        if rpc == "server/discover":
            err = {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}}
            return self.json(writer, err)
        if rpc == "initialize":
            result = {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "hostile", "version": "1"},
            }
            return self.json(writer, {"jsonrpc": "2.0", "id": rid, "result": result}, session=True)
        if rpc == "tools/list":
            tools = [{"name": t, "inputSchema": {"type": "object"}} for t in TOOLS]
            return self.json(writer, {"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}})
        if rpc == "tools/call":
            self.note(kind="call", message=msg, headers=headers)
            return await self.tool(msg["params"]["name"], rid, msg["params"], reader, writer)
        err = {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}}
        return self.json(writer, err)

    async def tool(
        self,
        name: str,
        rid: Any,
        params: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        text = {"content": [{"type": "text", "text": name}], "isError": False}
        done = {"jsonrpc": "2.0", "id": rid, "result": text}
        if name == "ok":
            return self.json(writer, done)
        if name == "raw_fields":
            # What pydantic would change: a null, an unknown field, and no isError.
            raw = {"content": [{"type": "text", "text": "x", "annotations": None}], "vendor": {"k": None}}
            return self.json(writer, {"jsonrpc": "2.0", "id": rid, "result": raw})
        if name == "big":
            blob = "x" * (3 << 20)
            return self.json(
                writer, {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": blob}]}}
            )
        if name == "malformed":
            return self.raw(writer, 200, b'{"jsonrpc": "2.0", "id": ', "application/json")
        if name == "wrong_id":
            return self.json(writer, {**done, "id": "somebody-else"})
        if name == "deep":
            nested: Any = 1
            for _ in range(200):
                nested = [nested]
            return self.json(writer, {"jsonrpc": "2.0", "id": rid, "result": {"content": [], "n": nested}})
        if name == "long_int":
            body = b'{"jsonrpc":"2.0","id":%s,"result":{"content":[],"n":1180591620717411303424,"f":1.5}}' % (
                json.dumps(rid).encode()
            )
            return self.raw(writer, 200, body, "application/json")
        if name == "not_object":
            return self.json(writer, {"jsonrpc": "2.0", "id": rid, "result": [1, 2]})
        if name == "http_error":
            err = {"jsonrpc": "2.0", "id": rid, "error": {"code": -32042, "message": "no such luck", "data": {"a": 1}}}
            return self.raw(writer, 400, json.dumps(err).encode(), "application/json")
        if name == "status_500":
            return self.raw(writer, 500, b"oops", "text/plain")
        if name == "status_404":
            return self.raw(writer, 404, b"", "text/plain")
        if name == "slow":
            await self.sse_start(writer)
            try:
                await asyncio.wait_for(reader.read(1), timeout=30)  # returns b"" when the client hangs up
                self.note(kind="closed", tool=name)
            except TimeoutError:
                pass
            return False
        return await self.streamed(name, rid, done, writer)

    async def streamed(self, name: str, rid: Any, done: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        await self.sse_start(writer)
        if name == "ok_sse":
            self.event(
                writer,
                {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 9, "progress": 1}},
            )
            writer.write(b": a comment\r\n\r\nevent: message\r\nid: 1\r\n")
            self.event(writer, done)
        elif name == "logs":
            log = {"level": "warning", "logger": "hostile", "data": "careful"}
            self.event(writer, {"jsonrpc": "2.0", "method": "notifications/message", "params": log})
            self.event(writer, done)
        elif name == "asks_ping":
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.answers["ping-1"] = fut
            self.event(writer, {"jsonrpc": "2.0", "id": "ping-1", "method": "ping"})
            await writer.drain()
            answer = await asyncio.wait_for(fut, timeout=10)
            self.event(writer, {**done, "result": {"content": [{"type": "text", "text": json.dumps(answer)}]}})
        elif name == "endless":
            chunk = b": " + b"x" * 65536 + b"\n"
            while True:
                writer.write(chunk)
                await writer.drain()
        elif name == "endless_events":
            note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 9, "progress": 1}}
            while True:
                self.event(writer, note)
                await writer.drain()
        elif name == "never_answers":
            self.event(
                writer,
                {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "soon"}},
            )
            await writer.drain()
            await asyncio.sleep(3600)
        elif name == "ends_early":
            self.event(
                writer,
                {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "bye"}},
            )
        await writer.drain()
        return False  # an SSE reply ends with the connection

    async def sse_start(self, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"mcp-session-id: " + SESSION.encode() + b"\r\nconnection: close\r\n\r\n"
        )
        await writer.drain()

    @staticmethod
    def event(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(b"event: message\r\ndata: " + json.dumps(message).encode() + b"\r\n\r\n")

    def json(self, writer: asyncio.StreamWriter, message: dict[str, Any], *, session: bool = False) -> bool:
        return self.raw(writer, 200, json.dumps(message).encode(), "application/json", session=session)

    def plain(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> bool:
        return self.raw(writer, status, body, "application/json")

    @staticmethod
    def raw(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str, *, session: bool = False) -> bool:
        extra = b"mcp-session-id: " + SESSION.encode() + b"\r\n" if session else b""
        writer.write(
            b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
            % (status, ctype.encode(), len(body), extra)
            + body
        )
        return True


class Word(BaseModel):
    word: str


def ask_word() -> Elicit[Word]:
    return Elicit("Say a word", Word)


def sdk_server(port: int) -> None:
    from mcp.server.mcpserver import MCPServer

    mcp = MCPServer("reference")

    @mcp.tool(description="Echo the text back.")
    def echo(text: str) -> str:
        return text

    @mcp.tool(description="A structured answer.")
    def lookup(customer_id: str) -> dict[str, Any]:
        return {"customer_id": customer_id, "name": "Ada", "tags": ["a", None], "score": 1.5, "vip": None}

    @mcp.tool(description="Ask the client for a word (2026-07-28: an input_required round).")
    def confirm(thing: str, answer: Annotated[Word, Resolve(ask_word)]) -> str:
        return f"{thing}:{answer.word}"

    @mcp.tool(description="Fail.")
    def fail(why: str) -> str:
        raise ValueError(why)

    record = sys.argv[3] if len(sys.argv) > 3 else None

    def note(what: str) -> None:
        if record is not None:
            with open(record, "a") as f:
                f.write(what + "\n")

    @mcp.tool(description="Sleep, then answer.")
    async def sleep(seconds: float) -> str:
        import anyio

        note("start")
        try:
            await anyio.sleep(seconds)
        except BaseException:
            note("cancelled")
            raise
        return "awake"

    app = mcp.streamable_http_app()

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        """Every POST's headers and body, as the server got them, to RECORD (a JSON line each)."""
        if scope["type"] != "http" or scope["method"] != "POST" or record is None:
            await app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        note(json.dumps({"kind": "post", "headers": headers, "message": json.loads(body)}))
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await app(scope, replay, send)

    import uvicorn

    uvicorn.run(recording, host="127.0.0.1", port=port, log_level="warning")


async def hostile_main(port: int, record: str) -> None:
    server = await asyncio.start_server(Hostile(record).serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "hostile":
        asyncio.run(hostile_main(int(sys.argv[2]), sys.argv[3]))
    else:
        sdk_server(int(sys.argv[2]))
