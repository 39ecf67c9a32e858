"""The lean upstream client's parsing (decision 0024): SSE framing however the bytes are split,
and the bounds on what an upstream's reply may be. End to end: tests/e2e/test_upstream_json.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest

from cloister.relay import upstream_http
from cloister.relay.upstream_http import HttpPool, Limits, PeerError, ReplyViolation, sse_data

STREAM = (
    b": comment\r\n\r\n"
    b'event: message\r\nid: 7\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
    b"event: other\r\ndata: ignored\r\n\r\n"
    b"id: prime\ndata:\n\n"  # a priming event (empty data), as the TypeScript SDK sends first
    b"data: two\n\n"
    b"data:three\r\r"
    b"retry: 10\n\n"
)
EXPECTED = [b'{"a":\n1}', b"two", b"three"]


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _events(data: bytes, size: int, max_bytes: int = 1 << 20) -> list[bytes]:
    async def collect() -> list[bytes]:
        return [e async for e in sse_data(_chunks(data, size), max_bytes)]

    return anyio.run(collect)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 4096])
def test_sse_events_whatever_the_chunking(size: int) -> None:
    """CRLF, LF and CR line ends, a CRLF split between chunks, multi-line data, comments, ids,
    retry fields and other event types: the same events however the stream is cut."""
    assert _events(STREAM, size) == EXPECTED


def test_sse_stream_is_bounded_even_without_line_ends() -> None:
    with pytest.raises(ReplyViolation, match="more than the 1000 bytes"):
        _events(b"data: " + b"x" * 5000, 100, max_bytes=1000)
    with pytest.raises(ReplyViolation, match="more than the 1000 bytes"):
        _events(b": keepalive\n\n" * 200, 50, max_bytes=1000)


def _parse(text: bytes, limits: Limits | None = None) -> object:
    return upstream_http._parse(text, limits or Limits())


def test_reply_bounds_and_exact_values() -> None:
    assert _parse(b'{"n": 1180591620717411303424, "f": 1e300}') == {"n": 2**70, "f": 1e300}
    deep = b'{"r":' + b"[" * 66 + b"]" * 66 + b"}"  # the message's "r" is the result: 66 levels
    with pytest.raises(ReplyViolation, match="nests deeper than 64"):
        _parse(deep)
    _parse(b'{"r":' + b"[" * 65 + b"]" * 65 + b"}")  # as deep as canonical JSON hashes
    with pytest.raises(ReplyViolation, match="nests deeper than 64"):
        _parse(b'{"r":' + b"[" * 65 + b"1" + b"]" * 65 + b"}")  # the 1 is one level too deep
    with pytest.raises(ReplyViolation, match="nests deeper than 64"):
        _parse(b'{"r":' + b'{"a":' * 65 + b"{}" + b"}" * 65 + b"}")
    with pytest.raises(ReplyViolation, match="not valid JSON") as bad:
        _parse(b'{"a": NaN}')
    assert bad.value.code == -32700
    with pytest.raises(ReplyViolation, match="not valid JSON"):
        _parse(b'{"a": "\\ud800"}')  # a lone surrogate has no UTF-8 form: canonical JSON refuses it too
    with pytest.raises(ReplyViolation, match="JSON list"):
        _parse(b"[1]")


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"jsonrpc": "2.0", "id": 1, "result": {}}, "answers request id '1'"),  # an int is not the string id
        ({"jsonrpc": "2.0", "id": "r", "result": {}, "error": {}}, "neither a result nor an error"),
        ({"jsonrpc": "1.0", "id": "r", "result": {}}, "not a JSON-RPC 2.0"),
        ({"jsonrpc": "2.0", "id": "r", "error": {"code": "x", "message": "m"}}, "no integer code"),
        ({"jsonrpc": "2.0", "id": "r", "result": "text"}, "not an object"),
    ],
)
def test_replies_that_are_not_the_answer(message: dict[str, object], error: str) -> None:
    with pytest.raises(ReplyViolation, match=error):
        upstream_http._response_of(message, "1" if message.get("id") == 1 else "r", Limits())


def test_an_error_reply_is_the_peers_error() -> None:
    with pytest.raises(PeerError) as err:
        upstream_http._response_of(
            {"jsonrpc": "2.0", "id": "r", "error": {"code": -32042, "message": "no", "data": [1]}}, "r", Limits()
        )
    assert (err.value.code, err.value.message, err.value.data) == (-32042, "no", [1])


def test_pool_reuses_a_kept_connection_and_drops_others() -> None:
    """A complete response the server keeps alive leaves its connection for the next request;
    one the server closes, or an unread one, does not."""
    connections: list[int] = []
    replies = [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n",  # read until close: not reused
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    ]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")).split(b":")[1]
                )
                await reader.readexactly(length)
                reply = replies.pop(0)
                writer.write(reply)
                await writer.drain()
                if b"connection: close" in reply or b"event-stream" in reply:
                    break
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = HttpPool(f"http://127.0.0.1:{port}/mcp", None, {"user-agent": "t"})
        bodies = []
        for _ in range(5):
            async with pool.post(b"{}", {"content-type": "application/json"}) as response:
                bodies.append(b"".join([c async for c in response.aiter_bytes()]))
            await asyncio.sleep(0.05)
        assert bodies == [b"{}", b"{}", b"{}", b"data: 1\n\n", b"{}"]
        assert len(connections) == 3  # requests 1-3 on one, 4 on a second, 5 on a third
        pool.close()
        server.close()

    asyncio.run(main())


def test_pool_resends_once_when_a_kept_connection_was_closed_under_it() -> None:
    """The server drops a kept connection just as it is reused (its keep-alive ran out): the
    request goes once more, on a new connection. A new connection that fails is not retried."""
    seen: list[str] = []
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = len(seen)
        seen.append("connection")
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(reply)
        await writer.drain()
        if n == 0:
            await reader.readuntil(b"\r\n\r\n")  # the reuse: hang up without a word
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = HttpPool(f"http://127.0.0.1:{port}/mcp", None, {})
        for _ in range(2):
            async with pool.post(b"{}", {}) as response:
                assert b"".join([c async for c in response.aiter_bytes()]) == b"{}"
        assert seen == ["connection", "connection"]
        server.close()
        await server.wait_closed()
        with pytest.raises(OSError):  # nothing listens: a new connection's failure is the caller's
            async with pool.post(b"{}", {}):
                pass

    asyncio.run(main())


def test_pool_holds_at_most_max_connections_calls_at_once() -> None:
    open_now: list[int] = [0, 0]  # connections open, the most at once
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_now[0] += 1
        open_now[1] = max(open_now)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                await asyncio.sleep(0.1)
                writer.write(reply)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            open_now[0] -= 1
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = HttpPool(f"http://127.0.0.1:{port}/mcp", None, {}, max_connections=2)

        async def one() -> None:
            async with pool.post(b"{}", {}) as response:
                assert b"".join([c async for c in response.aiter_bytes()]) == b"{}"

        await asyncio.gather(*(one() for _ in range(6)))
        assert open_now[1] == 2
        with pytest.raises(ValueError, match="line break"):
            async with pool.post(b"{}", {"mcp-name": "x\r\ninjected: 1"}):
                pass
        pool.close()
        server.close()

    asyncio.run(main())
