"""The lean tools/call over streamable HTTP (decision 0024).

The MCP SDK opens and proves the session (initialize or discover, tool listing, identity); a
tools/call on the relay's hot path is then one JSON-RPC POST into that same session, sent with
the headers and `_meta` the SDK's own stamp computes and the session id the SDK sends, over a
pool of persistent connections that verify TLS with the SDK client's own SSLContext. The reply,
application/json or text/event-stream, is parsed with orjson into the JSON value on the wire,
which is what the upstream signs (decision 0017).

An upstream is hostile: its reply is bounded in bytes, SSE events and nesting, must answer this
request's id, and every violation is one `ReplyViolation` saying what was wrong. Messages an SSE
reply interleaves before the response (notifications, server-to-client requests) go to the
callbacks `Interleaved` names, which are the same handlers the SDK session uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httptools
import httpx2
import orjson

from cloister.verify.canonical import MAX_DEPTH

MCP_SESSION_ID = "mcp-session-id"
JSON_CONTENT = "application/json"
SSE_CONTENT = "text/event-stream"
# 19 digits in a row: maybe an integer past 64 bits, which orjson would read as a float.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
MAX_IDLE = 32  # idle connections kept per upstream


@dataclass(frozen=True)
class Limits:
    """How much of an upstream's reply the relay reads before it gives up on it."""

    max_bytes: int = 16 << 20  # the whole body (JSON) or stream (SSE)
    max_events: int = 1000  # SSE events before the response
    max_depth: int = MAX_DEPTH  # nesting of the result; canonical JSON (the hash) refuses deeper


class ReplyViolation(Exception):
    """The upstream's reply broke the protocol or the limits. `code` is a JSON-RPC code when the
    SDK would have reported one (PARSE_ERROR for malformed JSON), else None."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class StreamEnded(Exception):
    """The reply ended (or the connection closed) before the response arrived."""


class Redirected(Exception):
    """The upstream answered with a redirect: the request was not processed."""


class PeerError(Exception):
    """The upstream answered with a JSON-RPC error (or an HTTP status the SDK maps to one)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class Interleaved(Protocol):
    """Where the messages an SSE reply carries before its response go."""

    async def notification(self, message: dict[str, Any]) -> None: ...

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """The JSON-RPC response (result or error object) to send back for a server request."""
        ...


class HttpPool:
    """Persistent HTTP/1.1 connections to one upstream endpoint, on asyncio streams with the
    httptools parser: a tools/call costs one write and a few reads, where httpx2's layers cost
    several times the CPU (decision 0024). TLS uses the very SSLContext the SDK's httpx2 client
    verifies with (the CA, hostname check), so both sides of a session trust the same server.

    A connection goes back to the pool only after a complete response the server lets it keep;
    anything else (an error, a cancellation, an unread body) closes it, which is how a
    2026-07-28 upstream learns a request was cancelled. Idle connections are dropped after
    `keepalive_s` or as soon as the server has closed them, before they are reused."""

    def __init__(
        self,
        url: str,
        ssl_context: ssl.SSLContext | None,
        headers: dict[str, str],
        *,
        keepalive_s: float = 4.0,
        max_connections: int = 100,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = ssl_context if parts.scheme == "https" else None
        if parts.scheme == "https" and self.tls is None:
            raise ValueError("an https upstream needs the SSLContext its session verifies with")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        netloc = parts.netloc.rpartition("@")[2]
        self.base = {"host": netloc, **{k.lower(): v for k, v in headers.items()}}
        self.keepalive_s = keepalive_s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.slots = asyncio.Semaphore(max_connections)  # calls at once, as httpx2's default pool

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """An idle connection the server has not closed (reused: True), else a new one."""
        now = time.monotonic()
        while self.idle:
            reader, writer, since = self.idle.pop()
            if now - since < self.keepalive_s and not reader.at_eof() and not writer.is_closing():
                return reader, writer, True
            writer.transport.abort()
        reader, writer = await self._open()
        return reader, writer, False

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None, limit=1 << 16
        )

    @asynccontextmanager
    async def post(
        self, body: bytes, headers: dict[str, str], *, max_head: int = 1 << 16, bounded: bool = True
    ) -> AsyncIterator[Response]:
        """One POST and its response. `bounded`: within the `max_connections` calls at once
        (an answer to a server request the open call is waiting on is not, or it could wait on
        itself)."""
        fields = {**self.base, **headers, "content-length": str(len(body))}
        if any("\r" in v or "\n" in v for v in fields.values()):
            raise ValueError("a header value holds a line break")  # never from the SDK's stamp
        head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        request = f"POST {self.target} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body
        async with self.slots if bounded else contextlib.nullcontext():
            reader, writer, reused = await self._connection()
            response = Response(reader)
            try:
                try:
                    writer.write(request)
                    await response.read_head(max_head)
                except OSError:
                    # A kept connection the server closed as we reused it (its keep-alive ran
                    # out): nothing was answered, so it is sent once more on a new connection,
                    # as HTTP clients do for this race (decision 0024: when that could run twice).
                    if not reused or response.received:
                        raise
                    writer.transport.abort()
                    reader, writer = await self._open()
                    response = Response(reader)
                    writer.write(request)
                    await response.read_head(max_head)
                yield response
            finally:
                if response.reusable() and len(self.idle) < MAX_IDLE:
                    self.idle.append((reader, writer, time.monotonic()))
                else:
                    writer.transport.abort()  # unread, failed or cancelled: the connection goes

    def close(self) -> None:
        while self.idle:
            self.idle.pop()[1].transport.abort()


class Response:
    """One HTTP response read from a pooled connection (httptools callbacks)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self._head_done = False
        self._complete = False
        self._until_close = False
        self._keep = False
        self.received = 0
        self._chunks: list[bytes] = []

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._head_done = True
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep = self._parser.should_keep_alive()  # the parser resets once the message is done

    async def _feed(self) -> int:
        """Read and parse more: how many bytes, 0 at the end of the connection."""
        data = await self._reader.read(1 << 16)
        self.received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            raise ReplyViolation("the upstream tried to upgrade the connection") from exc
        except httptools.HttpParserError as exc:
            raise ReplyViolation(f"the upstream's HTTP response is malformed: {exc}") from exc
        return len(data)

    async def read_head(self, max_head: int) -> None:
        read = 0
        while not self._head_done:
            n = await self._feed()
            if not n:
                raise ConnectionResetError("the upstream closed the connection without a response")
            read += n
            if not self._head_done and read > max_head:
                raise ReplyViolation(f"the upstream's response headers exceed {max_head} bytes")
        framed = "content-length" in self.headers or "chunked" in self.headers.get("transfer-encoding", "").lower()
        self._until_close = not framed and not self._complete
        encoding = self.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise ReplyViolation(f"the upstream sent a {encoding[:40]!r}-encoded body the relay did not ask for")

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                for chunk in chunks:
                    yield chunk
            if self._complete:
                return
            if not await self._feed():
                if self._until_close:
                    self._complete = True  # a body delimited by the end of the connection
                    continue
                raise ConnectionResetError("the upstream closed the connection in the middle of a response")

    def reusable(self) -> bool:
        return self._complete and self._keep and not self._until_close


class LeanSession:
    """What one SDK connection knows that a hand-made POST must repeat: its URL, its httpx2 client
    and the Mcp-Session-Id the SDK sends (legacy sessions; none on 2026-07-28). The session id is
    read from the SDK's own outgoing requests, never from a server reply, so it is the one the
    SDK's transport adopted."""

    def __init__(self, url: str, http: httpx2.AsyncClient, ssl_context: ssl.SSLContext | None) -> None:
        self.url = url
        self.http = http
        self.session_id: str | None = None
        http.event_hooks["request"].append(self._observe)
        # The SDK client's default headers (user-agent...) but no accept-encoding: the relay
        # reads bodies as sent and refuses a compressed one.
        defaults = {k: v for k, v in http.headers.items() if k.lower() != "accept-encoding"}
        self.pool = HttpPool(url, ssl_context, defaults)

    async def _observe(self, request: httpx2.Request) -> None:
        sid = request.headers.get(MCP_SESSION_ID)
        if sid is not None:
            self.session_id = sid

    def headers(self, stamped: dict[str, str]) -> dict[str, str]:
        headers = {"accept": f"{JSON_CONTENT}, {SSE_CONTENT}", "content-type": JSON_CONTENT, **stamped}
        if self.session_id:
            headers[MCP_SESSION_ID] = self.session_id
        return headers

    def _post(
        self, body: bytes, stamped: dict[str, str], *, bounded: bool = True
    ) -> AbstractAsyncContextManager[Response]:
        # Redirects are not followed here: the caller hands a redirected call to the SDK, which
        # follows one that stays on the endpoint's origin.
        return self.pool.post(body, self.headers(stamped), bounded=bounded)

    async def post_oneway(self, message: dict[str, Any], stamped: dict[str, str]) -> None:
        """A notification or a response to the server: the server answers 202 with no body."""
        async with self._post(orjson.dumps(message), stamped, bounded=False) as response:
            async for _ in response.aiter_bytes():
                pass

    async def call(
        self,
        request: dict[str, Any],
        stamped: dict[str, str],
        interleaved: Interleaved,
        limits: Limits,
    ) -> dict[str, Any]:
        """POST one JSON-RPC request and return its `result` object as sent."""
        rid = request["id"]
        body = orjson.dumps(request)
        async with self._post(body, stamped) as response:
            status = response.status
            ctype = response.headers.get("content-type", "").lower()
            if status == 202:
                raise PeerError(-32600, "server answered a request with 202 Accepted")
            if 300 <= status < 400:
                raise Redirected(f"the upstream redirected the call (HTTP {status})")
            if status >= 400:
                await _raise_http_error(response, ctype, status, self.session_id is not None, limits)
            if ctype.startswith(JSON_CONTENT):
                message = _parse(await _read_capped(response, limits.max_bytes), limits)
                return _response_of(message, rid, limits)
            if ctype.startswith(SSE_CONTENT):
                return await self._from_sse(response, rid, stamped, interleaved, limits)
            raise PeerError(-32600, f"Unexpected content type: {ctype[:100]}")

    async def _from_sse(
        self,
        response: Response,
        rid: Any,
        stamped: dict[str, str],
        interleaved: Interleaved,
        limits: Limits,
    ) -> dict[str, Any]:
        events = 0
        async for data in sse_data(response.aiter_bytes(), limits.max_bytes):
            events += 1
            if events > limits.max_events:
                raise ReplyViolation(f"the SSE reply sent more than {limits.max_events} events before its response")
            message = _parse(data, limits)
            if "method" in message:
                if "id" in message:  # a server-to-client request (sampling, elicitation, ping)
                    answer = await interleaved.request(message)
                    await self.post_oneway({"jsonrpc": "2.0", "id": message["id"], **answer}, stamped)
                else:
                    await interleaved.notification(message)
                continue
            # The SDK takes the first response on a request's own stream as its answer whatever
            # its id; the relay insists on the id it sent.
            return _response_of(message, rid, limits)
        raise StreamEnded("the SSE reply ended without a response")


async def _raise_http_error(response: Response, ctype: str, status: int, has_session: bool, limits: Limits) -> None:
    """An HTTP error status, as the SDK reports it: the JSON-RPC error in the body if there is
    one, else 404 is a terminated session and anything else an internal error."""
    if ctype.startswith(JSON_CONTENT):
        try:
            message = _parse(await _read_capped(response, limits.max_bytes), limits)
        except ReplyViolation:
            message = {}
        error = message.get("error")
        if isinstance(error, dict):
            raise _peer_error(error)
    if status == 404:
        if has_session:
            raise PeerError(-32600, "Session terminated")
        raise PeerError(-32601, "Not Found")
    raise PeerError(-32603, "Server returned an error response")


async def _read_capped(response: Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ReplyViolation(f"the reply is {int(declared)} bytes, more than the {max_bytes} allowed")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise ReplyViolation(f"the reply is more than the {max_bytes} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)


async def sse_data(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    """The `data` of each SSE `message` event (text/event-stream framing: lines ending in LF, CRLF
    or CR; `data:` lines joined by LF; a blank line ends an event). At most `max_bytes` are read
    in all, so neither an endless stream nor an endless line can grow without bound."""
    pending: list[bytes] = []  # the current line's chunks, so a long line is joined once
    data: list[bytes] = []
    event = b"message"
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise ReplyViolation(f"the SSE reply is more than the {max_bytes} bytes allowed")
        if b"\n" not in chunk and b"\r" not in chunk:
            pending.append(chunk)
            continue
        text = b"".join(pending) + chunk
        held = b""
        if text.endswith(b"\r"):  # maybe the first half of a CRLF split across chunks
            text, held = text[:-1], b"\r"
        lines = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        tail = lines.pop() + held
        pending = [tail] if tail else []
        for line in lines:
            if not line:
                joined = b"\n".join(data)
                if joined and event == b"message":  # an empty one primes resumption: skipped, as the SDK does
                    yield joined
                data, event = [], b"message"
                continue
            field, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if field == b"data":
                data.append(value)
            elif field == b"event":
                event = value
            # id, retry and comments: the relay does not resume streams (decision 0024)


def _parse(data: bytes, limits: Limits) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ReplyViolation(f"the reply is not valid JSON: {exc}", code=-32700) from exc
    if not isinstance(value, dict):
        raise ReplyViolation(f"the reply is a JSON {type(value).__name__}, not a JSON-RPC message object")
    # Cheap byte scans decide whether the walks are needed at all (they rarely are).
    if data.count(b"[") + data.count(b"{") > limits.max_depth:
        _check_depth(value, limits.max_depth)
    if _LONG_DIGITS.search(data):
        # orjson reads an integer longer than 64 bits as a float, which would change the value
        # (and its hash); Python's parser keeps it exact (orjson has already refused NaN, lone
        # surrogates and the rest Python's would let through).
        exact: dict[str, Any] = json.loads(data)
        return exact
    return value


def _check_depth(value: Any, max_depth: int) -> None:
    """ReplyViolation if the result nests deeper than canonical JSON (its hash) allows; iterative,
    so no recursion depth an upstream controls."""
    stack: list[tuple[Any, int]] = [(value, -1)]  # the message; its result is at depth 0
    while stack:
        item, depth = stack.pop()
        if item and depth >= max_depth:  # its members would be deeper than canonical JSON allows
            raise ReplyViolation(f"the reply nests deeper than {max_depth} levels")
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))


def _response_of(message: dict[str, Any], rid: Any, limits: Limits) -> dict[str, Any]:
    if message.get("jsonrpc") != "2.0":
        raise ReplyViolation("the reply is not a JSON-RPC 2.0 message")
    if message.get("id") != rid or type(message.get("id")) is not type(rid):
        raise ReplyViolation(f"the reply answers request id {str(message.get('id'))[:80]!r}, not {rid!r}")
    has_result, has_error = "result" in message, "error" in message
    if has_error and not has_result:
        error = message["error"]
        if not isinstance(error, dict):
            raise ReplyViolation("the reply's error is not an object")
        raise _peer_error(error)
    if not has_result or has_error:
        raise ReplyViolation("the reply has neither a result nor an error (or both)")
    result = message["result"]
    if not isinstance(result, dict):
        raise ReplyViolation(f"the reply's result is a JSON {type(result).__name__}, not an object")
    return result


def _peer_error(error: dict[str, Any]) -> PeerError:
    code, text = error.get("code"), error.get("message")
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(text, str):
        raise ReplyViolation("the reply's error has no integer code and string message")
    return PeerError(code, text[:2000], error.get("data"))
