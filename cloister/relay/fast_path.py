"""The agent-facing fast path (decision 0023): one JSON-RPC `tools/call` POSTed to `/mcp` on a
session the MCP SDK established is parsed (orjson), checked and answered here, without the SDK's
server stack (its session manager's streams, dispatcher, runner, middleware), and decided by the
same function the SDK's handler calls (`McpHandlers.call_json` -> `CallPath.call_json`).

What the fast path takes, and nothing else (everything else goes to the SDK unchanged, body
replayed): a POST to exactly `/mcp` whose headers pass the checks the SDK's transport makes
(Content-Type, Accept, DNS-rebinding Host/Origin when enabled, the session id of a live session
the SDK created, with the credential it was created with, and a handshake-era protocol version
equal to the one the session negotiated), whose body is at most the SDK's limit, parses (orjson,
and nothing orjson would read differently from the SDK's parser: no integer of 19+ digits, no
nesting the SDK's parser would refuse) into one JSON-RPC 2.0 request `tools/call` with an int or
string id that the SDK's own validator (`mcp_types.methods.validate_client_request`) accepts at
the session's version, without a progress token or trace context in `_meta`. Also taken: the
`notifications/cancelled` of a call in flight here, and the agent's answers to sampling or
elicitation requests sent on a fast-path call's stream.

The answer is what the SDK would send: the result sieved by `serialize_server_result` at the
session's version, as one SSE event (or a JSON body when the SDK is in JSON-response mode); an
`MCPError` as a JSON-RPC error; a cancelled call as the SDK's -32800 "Request cancelled".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

import anyio
import orjson
from anyio.streams.memory import MemoryObjectSendStream
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.runner import modern_error_data
from mcp.server.streamable_http import REQUEST_CANCELLED, StreamableHTTPServerTransport
from mcp.server.transport_security import TransportSecurityMiddleware
from mcp.shared.dispatcher import as_request_id, coerce_request_id
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    InboundLadderRejection,
    classify_inbound_request,
    validate_mcp_param_headers,
)
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, LOG_LEVEL_META_KEY, SERVER_INFO_META_KEY, ErrorData
from mcp_types import methods as _methods
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloister.relay.agent_sessions import AgentSession
from cloister.relay.call_path import split_tool_name
from cloister.relay.input_rounds import Waiter

if TYPE_CHECKING:
    from mcp.server import Server
    from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from cloister.relay.mcp_handlers import McpHandlers

log = logging.getLogger("cloister.relay.fast")

MCP_PATH: Final = "/mcp"
MAX_BRACKETS: Final = 200  # the SDK's JSON parser refuses nesting deeper than ~254: beyond this, it judges
_LONG_DIGITS: Final = re.compile(rb"[0-9]{19}")  # orjson reads integers beyond 64 bits as floats
# _meta keys whose requests the SDK serves: its progress plumbing, its OTel span's trace context,
# a 2026-07-28 log opt-in.
_SDK_META: Final = frozenset({"progressToken", "traceparent", "tracestate", "baggage", LOG_LEVEL_META_KEY})
_ROUTING: Final = frozenset({b"mcp-protocol-version", b"mcp-method", b"mcp-name"})
_MEMO_SIZE: Final = 256
_MEDIA: dict[tuple[bytes, bytes, bool], bool] = {}
KEEP_ALIVE_S: Final = 15.0  # the SDK's SSE keep-alive interval
_REQUEST_KEYS: Final = frozenset({"jsonrpc", "id", "method", "params"})
_CALL_KEYS: Final = frozenset({"name", "arguments", "_meta"})
_ANSWER_ID_PREFIX: Final = "cloister-fast-"
MAX_SESSIONS: Final = 10_000
NOTE_WAIT_S: Final = 0.1
_SSE_HEADERS: Final = (
    (b"cache-control", b"no-cache, no-transform"),
    (b"connection", b"keep-alive"),
    (b"content-type", b"text/event-stream"),
    (b"x-accel-buffering", b"no"),
)
_WANTED: Final = frozenset(
    {
        b"mcp-session-id",
        b"mcp-protocol-version",
        b"content-type",
        b"content-length",
        b"accept",
        b"authorization",
        b"host",
        b"origin",
        b"last-event-id",
        b"transfer-encoding",
        b"mcp-method",
        b"mcp-name",
    }
)


def live_sdk_session(
    manager: StreamableHTTPSessionManager, session_id: str, scope: Scope
) -> StreamableHTTPServerTransport | None:
    """The SDK's transport of a live session `session_id` that this request may use, or None.

    The one place that reads the MCP SDK's internals (mcp 2.3, mcp/server/streamable_http_manager.py):
    the manager keeps its live sessions in `_server_instances` and the credential each was created
    with in `_session_owners`, and answers 404 to a request for a session that is not there or
    whose credential differs (`_handle_stateful_request`). No public API exposes either.
    tests/relay/test_fast_path.py::test_the_sdk_internals_the_fast_path_reads fails if they change.
    """
    transports = getattr(manager, "_server_instances", None)
    owners = getattr(manager, "_session_owners", None)
    if not isinstance(transports, dict) or not isinstance(owners, dict):
        return None  # the SDK changed: everything goes to it
    transport = transports.get(session_id)
    if not isinstance(transport, StreamableHTTPServerTransport) or transport.is_terminated:
        return None
    user = scope.get("user")
    requestor = authorization_context(user) if isinstance(user, AuthenticatedUser) else None
    if requestor != owners.get(session_id):
        return None
    idle = transport.idle_scope
    if idle is not None and idle.cancel_called:  # expiring: the SDK answers it as terminated
        return None
    return transport


def _keep_alive(transport: StreamableHTTPServerTransport | None, idle_timeout_s: float | None) -> None:
    """A request on a session holds it open, as the SDK's transport does for its own requests:
    the idle countdown restarts (a deadline of inf, a request of the SDK's in flight, stays)."""
    idle = transport.idle_scope if transport is not None else None
    if idle is not None and idle_timeout_s is not None:
        idle.deadline = max(idle.deadline, anyio.current_time() + idle_timeout_s)


def accepts(accept: str) -> tuple[bool, bool]:
    """(application/json, text/event-stream) acceptable: mcp.server.streamable_http.check_accept_headers."""
    types = [t.strip().split(";")[0].strip().lower() for t in accept.split(",")]
    wild = "*/*" in types
    return (
        wild or any(t in ("application/json", "application/*") for t in types),
        wild or any(t in ("text/event-stream", "text/*") for t in types),
    )


def json_content_type(content_type: str) -> bool:
    """Both of the SDK's Content-Type checks (transport security's prefix test and the transport's)."""
    if not content_type.lower().startswith("application/json"):
        return False
    return any(part.strip() == "application/json" for part in content_type.split(";")[0].split(","))


def _scan(scope: Scope) -> dict[bytes, bytes] | None:
    """The headers the fast path reads; None when one repeats (the SDK reads those its way) or an
    Mcp-Param-* header is present (the SDK checks them against the tool's schema)."""
    head: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in _WANTED:
            if name in head:
                return None
            head[name] = value
        elif name.startswith(b"mcp-param-"):
            return None
    return head


def _media_ok(content_type: bytes, accept: bytes, json_mode: bool) -> bool:
    """Content-Type and Accept as the SDK's transports judge them (memoized: clients send the same
    few values on every request; the table is bounded)."""
    key = (content_type, accept, json_mode)
    ok = _MEDIA.get(key)
    if ok is None:
        has_json, has_sse = accepts(accept.decode("latin-1"))
        ok = json_content_type(content_type.decode("latin-1")) and has_json and (has_sse or json_mode)
        if len(_MEDIA) >= _MEMO_SIZE:
            _MEDIA.clear()
        _MEDIA[key] = ok
    return ok


def _transport_accepts(head: dict[bytes, bytes], manager: StreamableHTTPSessionManager) -> bool:
    """The SDK transport's header checks, passed (Content-Type, Accept, body size), in a mode the
    fast path serves (stateful, no event store: no resumable streams to keep)."""
    if b"transfer-encoding" in head or b"last-event-id" in head:
        return False
    if not _media_ok(head.get(b"content-type", b""), head.get(b"accept", b""), manager.json_response):
        return False
    if manager.stateless or manager.event_store is not None:
        return False
    length = head.get(b"content-length")
    return length is None or (length.isdigit() and int(length) <= manager.max_request_body_size)


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, in an upstream's result
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


@dataclass
class Stats:
    """How many requests the fast path answered, and how many POSTs to /mcp it left to the SDK
    (a debug stat, served to the admin; never in an agent's answer)."""

    calls: int = 0
    cancelled: int = 0
    answers: int = 0
    fell_through: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "cancelled": self.cancelled,
            "answers": self.answers,
            "fell_through": self.fell_through,
        }


class _Reply:
    """One POST's answer, as the SDK's transports send it. 2025-era sessions: one SSE event (or a
    JSON body in JSON-response mode), the stream started early when the call sends the agent
    something first (a log message, a sampling or elicitation request). 2026-07-28: a JSON body
    with the error's HTTP status. Either way, a call still running after KEEP_ALIVE_S commits to
    an SSE stream that carries a comment every KEEP_ALIVE_S (a proxy's idle timeout)."""

    def __init__(self, send: Send, session_id: str, json_mode: bool, modern: bool) -> None:
        self.send = send
        self.session_id = session_id.encode("ascii")
        self.json_mode = json_mode
        self.modern = modern
        self.started = False
        self.lock = anyio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._pinger: asyncio.Task[None] | None = None

    @staticmethod
    def _event(message: dict[str, Any]) -> bytes:
        return b"event: message\r\ndata: " + _dumps(message) + b"\r\n\r\n"

    def _sse_headers(self) -> list[tuple[bytes, bytes]]:
        if self.modern:
            return list(_SSE_HEADERS)
        return [*_SSE_HEADERS, (b"mcp-session-id", self.session_id)]

    async def _start_sse(self) -> None:
        if not self.started:
            self.started = True
            await self.send({"type": "http.response.start", "status": 200, "headers": self._sse_headers()})

    async def event(self, message: dict[str, Any]) -> None:
        async with self.lock:
            await self._start_sse()
            await self.send({"type": "http.response.body", "body": self._event(message), "more_body": True})

    def keep_alive(self) -> None:
        if not self.json_mode:
            self._timer = asyncio.get_running_loop().call_later(KEEP_ALIVE_S, self._start_pinging)

    def _start_pinging(self) -> None:
        self._pinger = asyncio.ensure_future(self._ping())

    async def _ping(self) -> None:
        try:
            while True:
                async with self.lock:
                    await self._start_sse()
                    await self.send({"type": "http.response.body", "body": b": ping\r\n\r\n", "more_body": True})
                await anyio.sleep(KEEP_ALIVE_S)
        except OSError:  # the agent went away
            return

    def stop_keep_alive(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._pinger is not None:
            self._pinger.cancel()

    async def finish(self, message: dict[str, Any]) -> None:
        async with self.lock:
            if self.started:
                await self.send({"type": "http.response.body", "body": self._event(message), "more_body": False})
                return
            status = 200
            if self.json_mode or self.modern:
                body = _dumps(message)
                headers = [(b"content-type", b"application/json")]
                if self.modern and "error" in message:
                    status = ERROR_CODE_HTTP_STATUS.get(message["error"].get("code"), 200)
            else:
                body = self._event(message)
                headers = list(_SSE_HEADERS)
            if not self.modern:
                headers.append((b"mcp-session-id", self.session_id))
            headers.append((b"content-length", str(len(body)).encode()))
            self.started = True
            await self.send({"type": "http.response.start", "status": status, "headers": headers})
            await self.send({"type": "http.response.body", "body": body, "more_body": False})


class _ToAgent:
    """What a Flight's `ctx` (and `ctx.session`) offers the relay for a fast-path call: log
    messages and sampling/elicitation requests on the call's own stream (mcp_handlers uses
    `request_id`, `session.can_send_request`, `.protocol_version`, `.check_client_capability`,
    `.send_request`, `.send_log_message`). At 2026-07-28 the server sends the agent no request
    (an upstream's question becomes an input round of the call: decision 0030, input_rounds), and
    no log message unless the request opted in (such requests are the SDK's)."""

    def __init__(self, fast: FastPath, session_id: str, request_id: Any, version: str, reply: _Reply) -> None:
        self.fast = fast
        self.session_id = session_id
        self.request_id = request_id
        self.protocol_version = version
        self.agent: AgentSession | None = None
        self.reply = reply
        self.can_send_request = not reply.json_mode and not reply.modern
        self.session = self

    def check_client_capability(self, capability: Any) -> bool:
        if self.reply.modern or self.agent is None:
            return False
        return bool(self.agent.ctx.session.check_client_capability(capability))

    async def send_log_message(
        self, level: str, data: Any, logger: str | None = None, related_request_id: Any = None
    ) -> None:
        if self.reply.json_mode or self.reply.modern:  # the SDK drops these too
            return
        params: dict[str, Any] = {"level": level, "data": data}
        if logger is not None:
            params["logger"] = logger
        await self.reply.event({"jsonrpc": "2.0", "method": "notifications/message", "params": params})

    async def send_request(self, request: Any, result_type: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.can_send_request:
            raise NoBackChannelError(request.method)
        data = request.model_dump(by_alias=True, mode="json", exclude_none=True)
        self.fast.answer_ids += 1
        rid = f"{_ANSWER_ID_PREFIX}{self.fast.answer_ids}"
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](1)
        key = (self.session_id, rid)
        self.fast.waiting[key] = send
        try:
            message = {"jsonrpc": "2.0", "id": rid, "method": data["method"]}
            if data.get("params") is not None:
                message["params"] = data["params"]
            await self.reply.event(message)
            answer = await receive.receive()
        finally:
            self.fast.waiting.pop(key, None)
            send.close()
            receive.close()
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            code, text = error.get("code"), error.get("message")
            raise MCPError(
                code if isinstance(code, int) and not isinstance(code, bool) else INTERNAL_ERROR,
                text if isinstance(text, str) else "the agent answered with an error",
                error.get("data"),
            )
        result = answer.get("result")
        if not isinstance(result, dict):
            raise MCPError(INTERNAL_ERROR, "the agent's answer has no result object")
        with contextlib.suppress(KeyError):
            _methods.validate_client_result(request.method, self.protocol_version, result)
        return result_type.model_validate(result, by_name=False)


@dataclass
class _Post:
    """A POST to /mcp as the fast path judges it."""

    session_id: str  # "" at 2026-07-28
    version: str
    transport: StreamableHTTPServerTransport | None  # the SDK's session (2025-era)
    token: str
    json_mode: bool
    consumed: list[Message] = field(default_factory=list)
    routing: dict[str, str] | None = None  # 2026-07-28: the routing headers (else None)


class FastPath:
    """ASGI middleware in front of the SDK's Starlette app (behind TokenGate)."""

    def __init__(self, app: ASGIApp, server: Server[Any], handlers: McpHandlers) -> None:
        self.app = app
        self.server = server
        self.handlers = handlers
        self.stats = Stats()
        # Sessions the SDK established: id -> the protocol version it negotiated (noted by `watch`).
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self.in_flight: dict[tuple[str, Any], anyio.CancelScope] = {}
        self.waiting: dict[tuple[str, str], MemoryObjectSendStream[dict[str, Any]]] = {}
        self.answer_ids = 0
        self._security: TransportSecurityMiddleware | None = None
        self._hosts: dict[tuple[bytes | None, bytes | None, bytes | None], bool] = {}
        self._waited: OrderedDict[str, None] = OrderedDict()  # sessions a request waited for (once each)
        self._noting: dict[str, anyio.Event] = {}
        server.middleware.append(self.watch)

    # ---- what the SDK established ------------------------------------------------------------

    async def watch(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """A server middleware: a session that the SDK served a request or notification of after
        `initialize` was accepted is one the fast path may serve (at its negotiated version)."""
        try:
            return await call_next(ctx)
        finally:
            try:
                self._note(ctx)
            except Exception:  # noting is an optimisation: the SDK keeps serving the session
                log.exception("the fast path could not note a session")

    def _note(self, ctx: ServerRequestContext[Any, Any]) -> None:
        request = ctx.request
        sid = request.headers.get("mcp-session-id") if isinstance(request, Request) else None
        version = ctx.session.protocol_version
        if not sid or sid in self.sessions or ctx.session.client_params is None:
            return
        if version not in HANDSHAKE_PROTOCOL_VERSIONS:
            return
        self.sessions[sid] = version
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        noting = self._noting.get(sid)
        if noting is not None:
            noting.set()
        if f"mcp:{sid}" not in self.handlers.agents.sessions:
            # The relay's record of the agent session (list_changed, logs), with a context of the SDK's.
            self.handlers.agents.seen(ctx, _bearer(cast(Request, request).headers.get("authorization", "")))

    async def _host_allowed(
        self, scope: Scope, head: dict[bytes, bytes], manager: StreamableHTTPSessionManager
    ) -> bool:
        """The SDK's own DNS-rebinding check (Host, Origin), as its transports run it (memoized
        per Host, Origin and Content-Type: a pure function of them and the fixed settings)."""
        settings = manager.security_settings
        if settings is None or not settings.enable_dns_rebinding_protection:
            return True
        key = (head.get(b"host"), head.get(b"origin"), head.get(b"content-type"))
        ok = self._hosts.get(key)
        if ok is None:
            security = self._security or TransportSecurityMiddleware(settings)
            self._security = security
            ok = await security.validate_request(Request(scope), is_post=True) is None
            if len(self._hosts) >= _MEMO_SIZE:
                self._hosts.clear()
            self._hosts[key] = ok
        return ok

    async def _noted(self, session_id: str) -> str | None:
        """The version of a live session not noted yet, once it is: a client sends
        `notifications/initialized` (answered 202 before the SDK handles it) just before its first
        request, so that request waits for the SDK to note the session, at most NOTE_WAIT_S and
        once per session (a session that stays unnoted is the SDK's)."""
        if session_id in self._waited:
            return None
        self._waited[session_id] = None
        while len(self._waited) > MAX_SESSIONS:
            self._waited.popitem(last=False)
        event = self._noting.setdefault(session_id, anyio.Event())
        try:
            with anyio.move_on_after(NOTE_WAIT_S):
                await event.wait()
        finally:
            self._noting.pop(session_id, None)
        return self.sessions.get(session_id)

    # ---- the ASGI entry ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != MCP_PATH:
            await self.app(scope, receive, send)
            return
        post = await self._judge_headers(scope)
        if post is None:
            self.stats.fell_through += 1
            await self.app(scope, receive, send)
            return
        body = await self._body(post, receive)
        handled = body is not None and await self._handle(post, body, receive, send)
        if not handled:
            self.stats.fell_through += 1
            await self.app(scope, _replay(post.consumed, receive), send)

    async def _judge_headers(self, scope: Scope) -> _Post | None:
        if self.handlers.calls.observer.tracing is not None:
            # Tracing on (decision 0020): the call's spans hang under the SDK's own request span
            # (its OpenTelemetry middleware), which only its stack makes.
            return None
        head = _scan(scope)
        if head is None:
            return None
        try:
            authorization = head.get(b"authorization", b"").decode("latin-1")
            header_version = head[b"mcp-protocol-version"].decode("ascii") if b"mcp-protocol-version" in head else None
        except UnicodeDecodeError:
            return None
        manager = self.server.session_manager
        if not _transport_accepts(head, manager) or not await self._host_allowed(scope, head, manager):
            return None
        token = _bearer(authorization)
        if header_version in MODERN_PROTOCOL_VERSIONS:
            # 2026-07-28: one self-contained request, no session (mcp.server._streamable_http_modern).
            if b"mcp-session-id" in head:
                return None
            routing = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.items() if k in _ROUTING}
            return _Post("", header_version, None, token, manager.json_response, routing=routing)
        if header_version is not None and header_version not in HANDSHAKE_PROTOCOL_VERSIONS:
            return None
        try:
            sid = head[b"mcp-session-id"].decode("ascii")
        except (KeyError, UnicodeDecodeError):
            return None
        transport = live_sdk_session(manager, sid, scope)
        if transport is None:  # (its note stays: the registry is bounded, and the SDK judges)
            return None
        version = self.sessions.get(sid) or await self._noted(sid)
        if version is None or (header_version is not None and header_version != version):
            return None
        return _Post(sid, version, transport, token, manager.json_response)

    async def _body(self, post: _Post, receive: Receive) -> bytes | None:
        """The whole body, or None (then what was read is replayed to the SDK): too big, or the
        client went away."""
        limit = self.server.session_manager.max_request_body_size
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            post.consumed.append(message)
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _handle(self, post: _Post, body: bytes, receive: Receive, send: Send) -> bool:
        """Answer the POST, or say it is not the fast path's (False: nothing was sent)."""
        if body.count(b"[") + body.count(b"{") > MAX_BRACKETS or _LONG_DIGITS.search(body):
            return False
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return False
        method = message.get("method")
        if method == "tools/call" and message.keys() <= _REQUEST_KEYS:
            return await self._call(post, message, receive, send)
        if post.routing is not None:
            return False  # 2026-07-28 notifications (acknowledged and dropped) and the rest: the SDK's
        if method == "notifications/cancelled" and "id" not in message and message.keys() <= _REQUEST_KEYS:
            return await self._cancel(post, message, send)
        if method is None and message.keys() in ({"jsonrpc", "id", "result"}, {"jsonrpc", "id", "error"}):
            return await self._answer(post, message, send)
        return False

    # ---- tools/call -----------------------------------------------------------------------------

    def _call_params(self, post: _Post, message: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        rid = message.get("id")
        params = message.get("params")
        if rid is None or as_request_id(rid) is None or not isinstance(params, dict) or not params.keys() <= _CALL_KEYS:
            return None
        if not isinstance(params.get("name"), str):
            return None
        meta = params.get("_meta")
        if meta is not None and (not isinstance(meta, dict) or _SDK_META & meta.keys()):
            return None  # progress, trace context, a log opt-in: the SDK's (its plumbing, its OTel span)
        if post.routing is not None:
            # The SDK's modern ladder: envelope in _meta, Mcp-Method/Mcp-Name agreeing with the body.
            if isinstance(classify_inbound_request(message, headers=post.routing), InboundLadderRejection):
                return None
            schema = self.server.get_tool_input_schema(params["name"]) if self.server.get_tool_input_schema else None
            arguments = params.get("arguments")
            if (
                schema is not None
                and isinstance(arguments, dict)
                and arguments
                and validate_mcp_param_headers(schema, arguments, post.routing) is not None
            ):
                return None
        elif (post.session_id, coerce_request_id(rid)) in self.in_flight:
            return None
        try:
            _methods.validate_client_request("tools/call", post.version, params)
        except (ValidationError, KeyError, ValueError):
            return None  # the SDK answers with its own error
        return rid, params

    async def _call(self, post: _Post, message: dict[str, Any], receive: Receive, send: Send) -> bool:
        judged = self._call_params(post, message)
        if judged is None:
            return False
        rid, params = judged
        modern = post.routing is not None
        reply = _Reply(send, post.session_id, post.json_mode, modern)
        to_agent = _ToAgent(self, post.session_id, rid, post.version, reply)
        if modern:
            # As AgentSessions.seen for a request without a session: nothing outlives the request.
            agent = AgentSession(f"obj:{id(to_agent)}", cast(Any, to_agent), post.token)
        else:
            found = self.handlers.agents.sessions.get(f"mcp:{post.session_id}")
            if found is None:
                return False
            agent = found
            # What AgentSessions.seen does for a request of the SDK's: newest last, its latest token.
            self.handlers.agents.sessions.move_to_end(agent.key)
            agent.token = post.token
        to_agent.agent = agent
        self.stats.calls += 1
        key = (post.session_id, coerce_request_id(rid))
        idle_timeout = self.server.session_manager.session_idle_timeout
        answer: dict[str, Any] = {}
        with anyio.CancelScope() as cancel:
            if modern:
                # 2026-07-28 cancels by closing the response stream (the SDK watches for it in SSE mode).
                watcher = None if post.json_mode else _cancel_on_disconnect(receive, cancel)
            else:
                self.in_flight[key] = cancel  # notifications/cancelled (FastPath._cancel)
                _keep_alive(post.transport, idle_timeout)
            reply.keep_alive()
            try:
                answer = await self._run(post, agent, rid, params, to_agent)
            finally:
                reply.stop_keep_alive()
                if modern:
                    if watcher is not None:
                        watcher.cancel()
                else:
                    self.in_flight.pop(key, None)
                    _keep_alive(post.transport, idle_timeout)
        if cancel.cancelled_caught:
            self.stats.cancelled += 1
            if modern:
                return True  # the agent is gone: nothing to answer (nor does the SDK)
            # The SDK's answer to a request cancelled on this (2025-era) wire.
            answer = _error(rid, REQUEST_CANCELLED, "Request cancelled")
        try:
            await reply.finish(answer)
        except OSError:  # the agent went away; its call is decided and logged
            log.debug("the answer to a fast-path call was not delivered")
        return True

    async def _run(
        self, post: _Post, agent: AgentSession, rid: Any, params: dict[str, Any], to_agent: _ToAgent
    ) -> dict[str, Any]:
        name = params["name"]
        modern = post.routing is not None
        try:
            if modern:
                # Input rounds (decision 0030): the same entry as the SDK's handler. A retry
                # (inputResponses, requestState) is not taken here: the SDK serves it.
                waiter = Waiter(to_agent, rid)
                result = await self.handlers.call_modern(
                    agent, name, params.get("arguments"), params.get("_meta"), None, None, waiter
                )
            else:
                with self.handlers.agents.flight(split_tool_name(name)[0], agent, cast(Any, to_agent)):
                    result = await self.handlers.call_json(
                        post.token, name, params.get("arguments"), params.get("_meta")
                    )
            # The runner's wire shaping (ServerRunner._serialize): sieved by the protocol version's
            # surface; at 2026-07-28, resultType and this server's serverInfo stamp.
            try:
                shaped = _methods.serialize_server_result("tools/call", post.version, result)
            except ValidationError:
                log.exception("the tools/call result is invalid")
                raise MCPError(INTERNAL_ERROR, "Handler returned an invalid result") from None
            if modern:
                shaped.setdefault("resultType", "complete")
                meta = shaped.get("_meta")
                if meta is None or (isinstance(meta, dict) and meta.get(SERVER_INFO_META_KEY) is None):
                    shaped["_meta"] = {**(meta or {}), SERVER_INFO_META_KEY: self.server.server_info_stamp}
        except Exception as exc:
            if modern:
                return {"jsonrpc": "2.0", "id": rid, "error": _error_data(modern_error_data(exc))}
            if isinstance(exc, MCPError):
                return {"jsonrpc": "2.0", "id": rid, "error": _error_data(exc.error)}
            if isinstance(exc, ValidationError):
                return _error(rid, INVALID_PARAMS, "Invalid request parameters", "")
            # What the SDK's (2025-era) dispatcher answers for a handler's crash.
            log.exception("the fast path's tools/call failed")
            return _error(rid, 0, str(exc))
        return {"jsonrpc": "2.0", "id": rid, "result": shaped}

    # ---- the agent's other messages about fast-path calls ---------------------------------------

    async def _cancel(self, post: _Post, message: dict[str, Any], send: Send) -> bool:
        params = message.get("params")
        rid = as_request_id(params.get("requestId")) if isinstance(params, dict) else None
        if rid is None:
            return False
        scope = self.in_flight.get((post.session_id, coerce_request_id(rid)))
        if scope is None:
            return False
        scope.cancel()
        await _accepted(send, post.session_id)
        return True

    async def _answer(self, post: _Post, message: dict[str, Any], send: Send) -> bool:
        rid = message.get("id")
        waiting = self.waiting.get((post.session_id, rid)) if isinstance(rid, str) else None
        if waiting is None:
            return False
        self.stats.answers += 1
        # Answered twice, or too late: the first answer stands.
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            waiting.send_nowait(message)
        await _accepted(send, post.session_id)
        return True


def _error_data(error: ErrorData) -> dict[str, Any]:
    return error.model_dump(mode="json", by_alias=True, exclude_none=True)


def _cancel_on_disconnect(receive: Receive, cancel: anyio.CancelScope) -> asyncio.Task[None]:
    """Cancel `cancel` when the client closes the connection (a plain asyncio task: cheaper than a
    task group per call; the relay runs on asyncio)."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        cancel.cancel()

    return asyncio.ensure_future(watch())


def _error(rid: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": error}


async def _accepted(send: Send, session_id: str) -> None:
    """The SDK's answer to a notification or response: 202, no body."""
    headers = [(b"content-type", b"application/json"), (b"mcp-session-id", session_id.encode("ascii"))]
    await send({"type": "http.response.start", "status": 202, "headers": [*headers, (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _bearer(header: str) -> str:
    """As mcp_handlers.bearer: the bearer token, unverified (only the enclave verifies it)."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _replay(consumed: list[Message], receive: Receive) -> Callable[[], Awaitable[Message]]:
    """`receive` for the SDK: what the fast path read, then the rest."""
    pending = list(consumed)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
