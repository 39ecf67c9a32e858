"""MCP client connections from the relay to the upstream servers (official SDK).

One long-lived session per upstream, shared by all agents (the SDK multiplexes concurrent
requests). A session that breaks (process exit, network) is re-established with backoff;
while it is down, calls fail fast with `UpstreamUnavailable`. Every call has a deadline.
`call` goes through the SDK session; `call_json`, on an HTTP session, is one POST into it that
returns the result as sent (decision 0024, cloister/relay/upstream_http.py).

Identity: before launching or connecting, the relay asks the enclave what the server must prove
(`challenge`). A `checksum` server's artifact is reported before it is launched, and the server
is not launched if the enclave refuses it. After connecting, a `nitro` server's attestation
(read from its `cloister://attestation/{nonce}` resource, made with the enclave's nonce) or a
`tls` server's certificate is reported, with the tool list for pin checks. This repeats every
`reattest_s`, on reconnect, whenever `reattest_all` is called (after an enclave restart), and
after a `notifications/tools/list_changed`, at most once per `reproof_min_interval_s`: a burst
or a flood of notifications coalesces into one re-proof at the end of the interval. A session
that breaks soon after it was proven does not reset the reconnection backoff.
The relay only carries evidence: the enclave verifies it and hides what fails (and bounds, on
its own side, how much an upstream's re-proofs can log).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol, TypeVar, cast

import anyio
import anyio.abc
import httpx2
import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.client.extension import ClientExtension, NotificationBinding
from mcp.client.session import ClientRequestContext, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import CONNECTION_CLOSED, HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, ValidationError

from cloister.relay.config import UpstreamConfig
from cloister.relay.upstream_http import (
    Interleaved,
    LeanSession,
    Limits,
    PeerError,
    Redirected,
    ReplyViolation,
    StreamEnded,
)
from cloister.verify.errors import CloisterError

log = logging.getLogger("cloister.relay.upstreams")
MAX_TOOLS_PAGES = 50
MAX_ARTIFACT = 16 << 20
MAX_LISTED = 1000  # resources, templates, prompts offered per upstream (decision 0018)
MAX_NAME = 2048  # longer resource URIs, templates or prompt names are not offered
ATTESTATION_URI = "cloister://attestation/"
_tracer = trace.get_tracer("cloister.relay.upstreams")
COURTESY_CANCEL_S = 5.0  # the SDK's bound on a courtesy notifications/cancelled
_R = TypeVar("_R")


class UpstreamError(CloisterError):
    """An upstream call failed. `kind` is "unavailable", "timeout" or "error"."""

    def __init__(self, kind: str, message: str, *, code: int | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.data = data


class Refused(CloisterError):
    """The enclave refused a server's pre-launch evidence: do not launch it."""


class IdentityReporter(Protocol):
    """What the relay provides so upstreams can prove themselves to the enclave."""

    async def challenge(self, server: str, *, reconnect: bool) -> tuple[bytes, str] | None: ...

    async def report(
        self,
        server: str,
        *,
        evidence: bool,
        tools: list[types.Tool] | None,
        attestation: bytes = b"",
        artifact: bytes = b"",
        certificates: list[bytes] | None = None,
        failure: str = "",
    ) -> str: ...


class ProtocolHooks(Protocol):
    """What the relay's MCP side does with what an upstream sends unasked (decision 0018): its
    sampling, elicitation and roots requests (decided, then sent to the agent; roots: decision
    0027), its log messages, and any change in what it offers (agents are told their lists changed)."""

    async def sampling(
        self, server: str, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData: ...

    async def elicitation(
        self, server: str, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData: ...

    async def roots(self, server: str) -> types.ListRootsResult | types.ErrorData: ...

    async def log_message(self, server: str, params: types.LoggingMessageNotificationParams) -> None: ...

    def changed(self, server: str) -> None: ...

    async def resource_updated(self, server: str, uri: str) -> None: ...


class UpstreamTasks(Protocol):
    """The relay's tasks for an upstream's task-augmented requests (decision 0031,
    cloister/relay/agent_tasks.py): `request` answers a task-augmented sampling or elicitation and
    the upstream's tasks/*, or returns None for any other request."""

    async def request(self, server: str, method: str, params: dict[str, Any] | None) -> dict[str, Any] | None: ...


class Upstream:
    def __init__(self, config: UpstreamConfig, reporter: IdentityReporter | None = None) -> None:
        self.config = config
        self.name = config.name
        self.reporter = reporter
        self.hooks: ProtocolHooks | None = None
        self.tools: list[types.Tool] = []
        # What else it offers (decision 0018), listed at connect and again after its list_changed.
        self.resources: list[types.Resource] = []
        self.templates: list[types.ResourceTemplate] = []
        self.prompts: list[types.Prompt] = []
        self.log_level: str | None = None  # the level last set on the session (logging/setLevel)
        self.state = "connecting"
        self.identity = "unknown"
        self.last_error = ""
        self._client: Client | None = None
        self._lean: LeanSession | None = None  # call_json's side of an HTTP session
        self._connecting: LeanSession | None = None
        self._ids = itertools.count(1)
        self._broken = anyio.Event()
        self._stop = anyio.Event()
        self._ready = anyio.Event()
        self._reattest = anyio.Event()
        self._tools_changed = anyio.Event()
        self._others_changed = anyio.Event()
        self.limits = Limits()  # what call_json reads of a reply
        self.reproofs = 0  # re-proofs of a connected session (after the first proof)
        self.logs = False  # whether the session offers logging (its capabilities)
        self.completions = False

    def _target(self, stack: contextlib.AsyncExitStack) -> Any:
        """What the SDK connects to. For an HTTP upstream also the same connection's lean side
        (`call_json`), left in `_connecting`: one httpx2 client (whose requests tell it the
        session id) and one TLS context for both."""
        if self.config.url:
            # The SDK's defaults for a bare URL (30 s, 300 s reads). A private CA verifies the
            # upstream's certificate on the MCP connection itself; the enclave separately checks a
            # `tls` identity's pinned key. call_json's pool verifies with the same context.
            ctx: ssl.SSLContext | None = None
            if self.config.ca_file is not None:
                ctx = ssl.create_default_context(cafile=str(self.config.ca_file))
            elif self.config.url.lower().startswith("https:"):
                ctx = httpx2.create_ssl_context()  # what httpx2 makes for verify=True
            http = httpx2.AsyncClient(verify=ctx or True, timeout=httpx2.Timeout(30, read=300))
            stack.push_async_callback(http.aclose)
            self._connecting = LeanSession(self.config.url, http, ctx)
            stack.callback(self._connecting.pool.close)
            return streamable_http_client(self.config.url, http_client=http)
        env = {**os.environ, **self.config.env}
        return StdioServerParameters(
            command=self.config.command[0],
            args=list(self.config.command[1:]),
            env=env,
            cwd=str(self.config.cwd) if self.config.cwd else None,
        )

    async def on_message(self, message: Any) -> None:
        """The session's incoming notifications: a changed tool list is re-read and re-checked
        against the pins (rate-limited by `_keep_proving`)."""
        inner = getattr(message, "root", message)
        method = getattr(inner, "method", None)
        if method == "notifications/tools/list_changed":
            self._tools_changed.set()
        elif method == "notifications/resources/updated" and self.hooks is not None:
            uri = getattr(getattr(inner, "params", None), "uri", None)
            if uri is not None:
                await self.hooks.resource_updated(self.name, str(uri))
        elif method in ("notifications/resources/list_changed", "notifications/prompts/list_changed"):
            self._others_changed.set()  # re-listed by _keep_listing, off the session's receive loop

    def _changed(self) -> None:
        if self.hooks is not None:
            self.hooks.changed(self.name)

    async def _on_sampling(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData:
        if self.hooks is None:
            return types.ErrorData(code=INVALID_REQUEST, message="sampling is not supported by this relay")
        return await self.hooks.sampling(self.name, params)

    async def _on_elicitation(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        if self.hooks is None:
            return types.ErrorData(code=INVALID_REQUEST, message="elicitation is not supported by this relay")
        return await self.hooks.elicitation(self.name, params)

    async def _on_roots(self, context: ClientRequestContext) -> types.ListRootsResult | types.ErrorData:
        if self.hooks is None:
            return types.ErrorData(code=METHOD_NOT_FOUND, message="roots are not supported by this relay")
        return await self.hooks.roots(self.name)

    async def _on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        if self.hooks is not None:
            await self.hooks.log_message(self.name, params)

    def _tasks(self) -> UpstreamTasks | None:
        # Optional in the hooks (McpHandlers.agent_tasks, decision 0031): older hook sets lack it.
        return cast("UpstreamTasks | None", getattr(self.hooks, "agent_tasks", None))

    async def _on_request(
        self, sdk: _OnRequest, dctx: Any, method: str, params: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """The upstream's requests to the relay: task-augmented sampling and elicitation and
        tasks/* to the relay's tasks for this upstream (decision 0031), the rest to the SDK."""
        tasks = self._tasks()
        client = self._client
        # 2026-07-28 has no tasks and the relay declared none there: the SDK answers as for any request.
        modern = client is not None and client.protocol_version in MODERN_PROTOCOL_VERSIONS
        if tasks is not None and not modern:
            answer = await tasks.request(self.name, method, dict(params) if params is not None else None)
            if answer is not None:
                return answer
        return await sdk(dctx, method, params)

    async def _on_task_status(self, params: types.TaskStatusNotificationParams) -> None:
        # Optional in the hooks (McpHandlers.task_status, decision 0029): older hook sets lack it.
        hook = getattr(self.hooks, "task_status", None)
        if hook is not None:
            await hook(self.name, params)

    async def run(self) -> None:
        """Keep a session open until stopped, reconnecting with backoff."""
        backoff = 0.2
        while not self._stop.is_set():
            connected_at: float | None = None
            try:
                challenge = await self._prelaunch()
                async with contextlib.AsyncExitStack() as stack:
                    self._connecting = None
                    target = self._target(stack)
                    lean = self._connecting
                    client = await stack.enter_async_context(
                        _RelayClient(
                            self._on_request,
                            self._tasks() is not None,
                            target,
                            cache=None,
                            read_timeout_seconds=self.config.timeout_s,
                            message_handler=self.on_message,
                            sampling_callback=self._on_sampling,
                            elicitation_callback=self._on_elicitation,
                            # Declares roots (listChanged) to every upstream; answered per request
                            # for the one agent it serves, or refused (decision 0027).
                            list_roots_callback=self._on_roots,
                            logging_callback=self._on_log,
                            # notifications/tasks/status, which the SDK's 2025-11-25 tables drop (decision 0029).
                            extensions=[_TaskStatus(self._on_task_status)],
                        )
                    )
                    tools = await self._list_tools(client)
                    self._client, self.tools, self.state, self.last_error = client, tools, "up", ""
                    self._lean = lean
                    await self._list_others(client)
                    await self._prove(client, challenge, tools)
                    self._changed()
                    self._broken = anyio.Event()
                    self._ready.set()
                    connected_at = anyio.current_time()
                    log.info("upstream %s connected: %d tools, identity %s", self.name, len(tools), self.identity)
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._wait_then_cancel, tg)
                        tg.start_soon(self._keep_proving, client)
                        tg.start_soon(self._keep_listing, client)
            except Refused as exc:
                self.state, self.last_error = "quarantined", str(exc)
                log.warning("upstream %s not launched: %s", self.name, exc)
                backoff = max(backoff, 5.0)
            except Exception as exc:  # any transport failure: mark down and retry
                self.last_error = _describe(exc)
                log.warning("upstream %s unavailable: %s", self.name, self.last_error)
            finally:
                self._client, self._lean = None, None
                if self.state == "up":
                    log.warning("upstream %s disconnected", self.name)
                    self._changed()
                if self.state != "quarantined":
                    self.state = "down" if not self._stop.is_set() else "stopped"
                self._ready.set()
            if self._stop.is_set():
                break
            if connected_at is not None and anyio.current_time() - connected_at >= self.config.reproof_min_interval_s:
                backoff = 0.2  # a session that lasted: reconnect quickly; one that flaps backs off
            with anyio.move_on_after(backoff):
                await self._stop.wait()
            backoff = min(backoff * 2, 5.0)

    # ---- identity -------------------------------------------------------------------------------

    async def _prelaunch(self) -> tuple[bytes, str] | None:
        """Ask what to prove; a checksum server's artifact is proven before it is launched."""
        if self.reporter is None:
            return None
        self.identity = "proving"
        challenge = await self.reporter.challenge(self.name, reconnect=True)
        if challenge is None or challenge[1] != "checksum":
            return challenge
        artifact, failure = b"", ""
        path = self.config.artifact
        if path is None:
            failure = "no `artifact` is configured for this upstream"
        else:
            try:
                with path.open("rb") as f:
                    artifact = f.read(MAX_ARTIFACT + 1)
            except OSError as exc:
                failure = f"cannot read artifact {path}: {exc.strerror}"
        status = await self.reporter.report(self.name, evidence=True, tools=None, artifact=artifact, failure=failure)
        self.identity = f"checksum {status}"
        if status != "verified":
            raise Refused(f"the enclave refused the artifact of {self.name!r}: {failure or 'checksum mismatch'}")
        return challenge

    async def _prove(self, client: Client, challenge: tuple[bytes, str] | None, tools: list[types.Tool]) -> None:
        if self.reporter is None:
            return
        if challenge is None:
            challenge = await self.reporter.challenge(self.name, reconnect=False)
        kind = challenge[1] if challenge else "none"
        evidence: dict[str, Any] = {}
        if kind == "nitro" and challenge is not None:
            evidence = await self._nitro_evidence(client, challenge[0])
        elif kind == "tls":
            evidence = await self._tls_evidence()
        has_evidence = kind in ("nitro", "tls")
        status = await self.reporter.report(self.name, evidence=has_evidence, tools=tools, **evidence)
        before = self.identity
        if has_evidence:
            self.identity = f"{kind} {status}"
        elif kind != "checksum":
            self.identity = kind
        if self.identity != before:  # verified or quarantined since: what agents may see changed
            self._changed()

    async def _nitro_evidence(self, client: Client, nonce: bytes) -> dict[str, Any]:
        try:
            result = await client.read_resource(f"{ATTESTATION_URI}{nonce.hex()}")
            text = getattr(result.contents[0], "text", "")
            return {"attestation": base64.b64decode(json.loads(text)["document"], validate=True)}
        except Exception as exc:  # the server could not or would not attest: report why
            return {"failure": f"reading {ATTESTATION_URI}<nonce> failed: {type(exc).__name__}: {exc}"[:500]}

    async def _tls_evidence(self) -> dict[str, Any]:
        url = urllib.parse.urlsplit(self.config.url or "")
        if url.scheme != "https" or not url.hostname:
            return {"failure": "a tls identity needs an https:// upstream URL"}
        host, port = url.hostname, url.port or 443
        try:
            der = await anyio.to_thread.run_sync(_peer_certificate, host, port)
        except OSError as exc:
            return {"failure": f"TLS handshake with {host}:{port} failed: {exc}"}
        return {"certificates": [der]}

    async def _keep_proving(self, client: Client) -> None:
        """Re-prove every `reattest_s`; at once on `reattest()`; after a tools/list_changed, not
        sooner than `reproof_min_interval_s` after the previous proof. Notifications that arrive
        meanwhile only set the same event again, so any number of them costs one re-proof."""
        last = anyio.current_time()
        while True:
            with anyio.move_on_after(self.config.reattest_s):
                await _first_of(self._reattest, self._tools_changed)
            if not self._reattest.is_set():
                with anyio.move_on_after(last + self.config.reproof_min_interval_s - anyio.current_time()):
                    await self._reattest.wait()  # an explicit reattest (enclave restart) cuts the wait
            self._reattest = anyio.Event()
            self._tools_changed = anyio.Event()
            self.reproofs += 1
            try:
                tools = await self._list_tools(client)
                changed = [t.model_dump(mode="json") for t in tools] != [t.model_dump(mode="json") for t in self.tools]
                self.tools = tools
                await self._prove(client, None, tools)
                if changed:  # a drift the enclave now hides, or a new tool: agents re-list
                    self._changed()
            except Exception as exc:
                log.warning("re-attesting upstream %s failed: %s", self.name, exc)
            last = anyio.current_time()

    async def _keep_listing(self, client: Client) -> None:
        """Re-list resources, templates and prompts after the upstream says they changed, at most
        once per `reproof_min_interval_s`: a flood of notifications costs one re-list."""
        while True:
            await self._others_changed.wait()
            self._others_changed = anyio.Event()
            try:
                await self._list_others(client)
            except Exception as exc:  # a failed re-list keeps the previous lists
                log.warning("re-listing upstream %s failed: %s", self.name, exc)
            self._changed()
            await anyio.sleep(self.config.reproof_min_interval_s)

    def reattest(self) -> None:
        self._reattest.set()

    # ---- session --------------------------------------------------------------------------------

    async def _wait_then_cancel(self, tg: anyio.abc.TaskGroup) -> None:
        async with anyio.create_task_group() as inner:

            async def stop_on(event: anyio.Event) -> None:
                await event.wait()
                inner.cancel_scope.cancel()

            inner.start_soon(stop_on, self._stop)
            inner.start_soon(stop_on, self._broken)
        tg.cancel_scope.cancel()

    async def _list_tools(self, client: Client) -> list[types.Tool]:
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_TOOLS_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    async def _list_others(self, client: Client) -> None:
        """Its resources, resource templates and prompts, as far as its capabilities offer them
        (decision 0018); a server without one has an empty list."""
        caps = client.server_capabilities
        resources: list[types.Resource] = []
        templates: list[types.ResourceTemplate] = []
        prompts: list[types.Prompt] = []
        if caps.resources is not None:
            cursor: str | None = None
            for _ in range(MAX_TOOLS_PAGES):
                page = await client.list_resources(cursor=cursor)
                resources.extend(page.resources)
                if not (cursor := page.next_cursor):
                    break
            for _ in range(MAX_TOOLS_PAGES):
                tpage = await client.list_resource_templates(cursor=cursor)
                templates.extend(tpage.resource_templates)
                if not (cursor := tpage.next_cursor):
                    break
        if caps.prompts is not None:
            cursor = None
            for _ in range(MAX_TOOLS_PAGES):
                ppage = await client.list_prompts(cursor=cursor)
                prompts.extend(ppage.prompts)
                if not (cursor := ppage.next_cursor):
                    break
        self.resources = bounded_listing(self.name, "resources", [r for r in resources if len(str(r.uri)) <= MAX_NAME])
        self.templates = bounded_listing(
            self.name, "templates", [t for t in templates if len(t.uri_template) <= MAX_NAME]
        )
        self.prompts = bounded_listing(self.name, "prompts", [p for p in prompts if len(p.name) <= MAX_NAME])
        self.logs = caps.logging is not None
        self.completions = caps.completions is not None

    async def wait_ready(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self._ready.wait()

    async def call(
        self, tool: str, arguments: dict[str, Any], meta: dict[str, Any], progress: ProgressFnT | None = None
    ) -> types.CallToolResult:
        """`progress`: where the upstream's progress notifications for this call go (the SDK
        gives the upstream a progress token of its own, never the agent's)."""
        typed_meta = cast(types.RequestParamsMeta, meta)
        if progress is None:
            return await self.request("call", lambda c: c.call_tool(tool, arguments, meta=typed_meta))
        return await self.request(
            "call", lambda c: c.call_tool(tool, arguments, meta=typed_meta, progress_callback=progress)
        )

    async def call_json(self, tool: str, arguments: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """The upstream's result object for a tools/call exactly as it came over the wire: the
        value the upstream signs (decision 0017), which the relay hashes. Fails as `call` does.

        HTTP upstreams: one POST into the session the SDK opened (decision 0024); what the reply
        interleaves goes to the SDK session's own handlers. Other upstreams: `call`, dumped. No
        progress: a caller that wants the upstream's progress uses `call`."""
        client, lean = self._client, self._lean
        if client is None or lean is None:
            return wire_value(await self.call(tool, arguments, meta))
        modern = client.protocol_version in MODERN_PROTOCOL_VERSIONS
        try:
            with anyio.fail_after(self.config.timeout_s):
                return await self._lean_call(client, lean, modern, tool, arguments, meta)
        except TimeoutError as exc:
            raise UpstreamError(
                "timeout", f"upstream {self.name!r} did not answer within {self.config.timeout_s:g}s"
            ) from exc
        except (PeerError, MCPError) as exc:
            code, message, data = (exc.code, exc.message, exc.data) if isinstance(exc, PeerError) else _mcp(exc)
            if not (code == HEADER_MISMATCH and modern):
                raise UpstreamError(
                    "error", f"upstream {self.name!r} refused the call: {message}", code=code, data=data
                ) from exc
        except ReplyViolation as exc:
            raise UpstreamError(
                "error", f"upstream {self.name!r} sent an invalid reply to the call: {exc}"[:1000], code=exc.code
            ) from exc
        except Redirected:
            pass  # not processed: the SDK's call follows a redirect within the endpoint's origin
        except StreamEnded as exc:  # as the SDK: the stream closed under the call; reconnect
            self._broken.set()
            raise UpstreamError("unavailable", f"upstream {self.name!r} closed the connection during the call") from exc
        except Exception as exc:  # transport failures come in many types (httpx, anyio, OSError)
            self._broken.set()
            raise UpstreamError("unavailable", f"upstream {self.name!r} connection failed: {exc!r}"[:500]) from exc
        # A redirect, or HEADER_MISMATCH (2026-07-28: the tool's listed schema is stale; the SDK's
        # call re-lists it and resends once, as the spec says).
        return wire_value(await self.call(tool, arguments, meta))

    async def _lean_call(
        self,
        client: Client,
        lean: LeanSession,
        modern: bool,
        tool: str,
        arguments: dict[str, Any],
        meta: dict[str, Any],
    ) -> dict[str, Any]:
        first = await self._post_call(client, lean, modern, {"name": tool, "arguments": arguments}, meta)
        if not modern or first.get("resultType") != "input_required":
            return first

        # 2026-07-28 input rounds (sampling, elicitation): the SDK's own driver dispatches them to
        # the same callbacks `call` uses; each retry is again one lean POST.
        async def retry(responses: types.InputResponses | None, state: str | None) -> Any:
            params = types.CallToolRequestParams(
                name=tool, arguments=arguments, input_responses=responses, request_state=state
            ).model_dump(by_alias=True, mode="json", exclude_none=True)
            return _input_round(await self._post_call(client, lean, modern, params, meta))

        final: _Wire = await client._drive_input_required(_input_round(first), retry)
        return final.value

    async def _post_call(
        self, client: Client, lean: LeanSession, modern: bool, params: dict[str, Any], meta: dict[str, Any]
    ) -> dict[str, Any]:
        rid = f"cloister-{next(self._ids)}"  # a string: never one of the SDK's integer ids
        data: dict[str, Any] = {"method": "tools/call", "params": {**params, "_meta": dict(meta)}}
        opts: dict[str, Any] = {}
        # The SDK session's own stamp: MCP-Protocol-Version and, on 2026-07-28, the method, name
        # and Mcp-Param-* headers and the per-request `_meta` envelope.
        client.session._stamp(data, cast(Any, opts))
        headers: dict[str, str] = opts.get("headers", {})
        # With tracing off (no tracer provider installed) there is no span to open and no context
        # to inject: skip both, so tracing adds nothing to the hot path when off (issue 13).
        traced = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        with (
            _tracer.start_as_current_span(
                f"MCP send tools/call {params['name']}",
                kind=SpanKind.CLIENT,
                attributes={"mcp.method.name": "tools/call", "jsonrpc.request.id": rid},
            )
            if traced
            else contextlib.nullcontext()
        ):
            out_meta = data["params"]["_meta"]
            if traced:
                inject(out_meta)  # W3C trace context, as the SDK's dispatcher does
            if not out_meta:
                del data["params"]["_meta"]
            try:
                return await lean.call(
                    {"jsonrpc": "2.0", "id": rid, **data}, headers, _SessionHandlers(client), self.limits
                )
            except anyio.get_cancelled_exc_class():
                if not modern:  # 2026-07-28: closing the stream (above) is the cancellation
                    await _courtesy_cancel(lean, rid, headers)
                raise

    async def request(self, what: str, send: Callable[[Client], Awaitable[_R]]) -> _R:
        """One request on the session, within its deadline; failures as UpstreamError."""
        client = self._client
        if client is None:
            why = self.last_error or "connecting"
            raise UpstreamError("unavailable", f"upstream {self.name!r} is unavailable: {why}")
        try:
            with anyio.fail_after(self.config.timeout_s):
                return await send(client)
        except TimeoutError as exc:
            raise UpstreamError(
                "timeout", f"upstream {self.name!r} did not answer within {self.config.timeout_s:g}s"
            ) from exc
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                # The transport died under the call (process exit, dropped stream): reconnect.
                self._broken.set()
                raise UpstreamError(
                    "unavailable", f"upstream {self.name!r} closed the connection during the {what}"
                ) from exc
            raise UpstreamError(
                "error", f"upstream {self.name!r} refused the {what}: {exc.message}", code=exc.code, data=exc.data
            ) from exc
        except Exception as exc:  # transport failures come in many types (httpx, anyio, OSError)
            self._broken.set()
            raise UpstreamError("unavailable", f"upstream {self.name!r} connection failed: {exc!r}"[:500]) from exc

    # ---- MCP tasks (decision 0029): raw requests, so a CreateTaskResult or a task's payload is
    # the upstream's JSON as sent (the SDK validates a tools/call answer as a CallToolResult and
    # does not know tasks/*).

    def task_support(self) -> types.ServerTasksCapability | None:
        """The upstream's declared tasks capability (2025-11-25), or None."""
        client = self._client
        caps = client.server_capabilities if client is not None else None
        return caps.tasks if caps is not None else None

    async def task_request(self, what: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One request (`tools/call` with `task`, `tasks/get`, `tasks/result`, `tasks/cancel`) on
        the session, its result object as sent; failures as UpstreamError (`request`)."""

        async def send(client: Client) -> dict[str, Any]:
            data: dict[str, Any] = {"method": method, "params": params}
            opts: dict[str, Any] = {}
            client.session._stamp(data, cast(Any, opts))
            return await client.session._dispatcher.send_raw_request(method, data.get("params"), cast(Any, opts))

        return await self.request(what, send)

    def restart(self) -> None:
        """Drop the session; `run` reconnects (and re-proves identity)."""
        self._broken.set()

    def stop(self) -> None:
        self._stop.set()


_OnRequest = Callable[[Any, str, Mapping[str, Any] | None], Awaitable[dict[str, Any]]]
# Declared on handshake-era sessions (decision 0031); 2026-07-28 has no tasks.
CLIENT_TASKS = types.ClientTasksCapability(
    list=types.TasksListCapability(),
    cancel=types.TasksCancelCapability(),
    requests=types.ClientTasksRequestsCapability(
        sampling=types.TasksSamplingCapability(create_message=types.TasksCreateMessageCapability()),
        elicitation=types.TasksElicitationCapability(create=types.TasksCreateElicitationCapability()),
    ),
)


class _RelayClient(Client):
    """The SDK's client with the relay's hold on the session's inbound requests and, when the
    relay runs upstream tasks, client `tasks` in its capabilities (decision 0031): the SDK knows
    no task-augmented request from a server, nor tasks/* to a client."""

    def __init__(
        self, on_request: Callable[..., Awaitable[dict[str, Any]]], tasks: bool, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._relay_on_request = on_request
        self._relay_tasks = tasks

    async def _build_session(self, exit_stack: contextlib.AsyncExitStack) -> ClientSession:
        session = await super()._build_session(exit_stack)
        sdk_on_request = session._on_request
        sdk_capabilities = session._build_capabilities

        async def on_request(dctx: Any, method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
            return await self._relay_on_request(sdk_on_request, dctx, method, params)

        def capabilities(version: str) -> types.ClientCapabilities:
            caps = sdk_capabilities(version)
            if self._relay_tasks and version not in MODERN_PROTOCOL_VERSIONS:
                caps = caps.model_copy(update={"tasks": CLIENT_TASKS})
            return caps

        # Instance attributes, read when the session is entered (its dispatcher's handler), by
        # `initialize`, and by call_json's SSE side (`_SessionHandlers`).
        session._on_request = on_request  # type: ignore[method-assign]
        session._build_capabilities = capabilities  # type: ignore[method-assign]
        return session


class _TaskStatus(ClientExtension):
    """Observes an upstream's `notifications/tasks/status` (decision 0029): the SDK delivers a
    method its tables leave out only to an extension's binding. The identifier is advertised in
    the relay's `initialize` (`capabilities.extensions`), in Cloister's own namespace."""

    identifier = "dev.cloister/task-status"

    def __init__(self, handler: Callable[[types.TaskStatusNotificationParams], Awaitable[None]]) -> None:
        self._handler = handler

    def notifications(self) -> tuple[NotificationBinding[Any], ...]:
        return (
            NotificationBinding(
                method="notifications/tasks/status",
                params_type=types.TaskStatusNotificationParams,
                handler=self._handler,
            ),
        )


class _Wire:
    """A terminal tools/call result as sent, through the SDK's input-rounds driver unparsed."""

    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value


def _input_round(raw: dict[str, Any]) -> types.InputRequiredResult | _Wire:
    if raw.get("resultType") != "input_required":
        return _Wire(raw)
    try:
        return types.InputRequiredResult.model_validate(raw)
    except ValidationError as exc:
        raise ReplyViolation(f"malformed input_required result ({exc.error_count()} errors)") from exc


class _SessionHandlers(Interleaved):
    """What an SSE reply interleaves, handed to the SDK session's own handlers: notifications to
    `_on_notify` (logging callback, then the message handler), server requests (sampling,
    elicitation, roots, ping) to `_on_request`. Progress and cancellation for this request are
    the dispatcher's business and call_json asks for neither, so they are dropped as it would."""

    def __init__(self, client: Client) -> None:
        self.session = client.session

    async def notification(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        if method in ("notifications/progress", "notifications/cancelled") or not isinstance(method, str):
            return
        params = message.get("params")
        await self.session._on_notify(cast(Any, None), method, params if isinstance(params, dict) else None)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        method, params = message.get("method"), message.get("params")
        if not isinstance(method, str):
            return {"error": {"code": INVALID_REQUEST, "message": "Invalid request"}}
        context = _RequestId(message.get("id"))
        try:
            result = await self.session._on_request(
                cast(Any, context), method, params if isinstance(params, dict) else None
            )
        except MCPError as exc:
            return {"error": exc.error.model_dump(by_alias=True, mode="json", exclude_none=True)}
        except ValidationError:
            return {"error": {"code": INVALID_PARAMS, "message": "Invalid request parameters", "data": ""}}
        except Exception as exc:  # as the SDK's dispatcher answers a failed handler
            return {"error": {"code": 0, "message": str(exc)[:500]}}
        return {"result": result}


class _RequestId:
    def __init__(self, request_id: Any) -> None:
        self.request_id = request_id


async def _courtesy_cancel(lean: LeanSession, rid: str, headers: dict[str, str]) -> None:
    """notifications/cancelled for an abandoned request, as the SDK sends it on a handshake-era
    session: shielded from the cancellation that caused it, and bounded."""
    message = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": rid, "reason": "caller cancelled"},
    }
    plain = {k: v for k, v in headers.items() if k.lower() == "mcp-protocol-version"}
    with anyio.CancelScope(shield=True), anyio.move_on_after(COURTESY_CANCEL_S):
        try:
            await lean.post_oneway(message, plain)
        except Exception as exc:  # best effort: the upstream may be gone
            log.debug("courtesy cancel for %s failed: %s", rid, exc)


def _mcp(exc: MCPError) -> tuple[int, str, Any]:
    return exc.code, exc.message, exc.data


def wire_value(model: BaseModel) -> dict[str, Any]:
    """A typed MCP result as the JSON it is sent as (aliases, no nulls)."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def bounded_listing(server: str, what: str, items: list[_R]) -> list[_R]:
    """At most MAX_LISTED of an upstream's resources, templates or prompts: one upstream's listing
    must not make the enclave refuse every agent's (its FilterTools takes 10,000 candidates)."""
    if len(items) > MAX_LISTED:
        log.warning("upstream %s lists %d %s; only the first %d are offered", server, len(items), what, MAX_LISTED)
    return items[:MAX_LISTED]


async def _first_of(*events: anyio.Event) -> None:
    """Return as soon as one of the events is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


def _describe(exc: BaseException) -> str:
    """The innermost error of an exception group (the SDK wraps transport errors in task groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:500]


def _peer_certificate(host: str, port: int) -> bytes:
    """The server's certificate (DER). Not verified here: the enclave checks it against the pin."""
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise OSError("the server presented no certificate")
    return der


class Upstreams:
    def __init__(self, configs: tuple[UpstreamConfig, ...], reporter: IdentityReporter | None = None) -> None:
        self.by_name = {c.name: Upstream(c, reporter) for c in configs}
        # Tasks of the relay's MCP side that live as long as the upstreams (McpHandlers' watchers).
        self.background: list[Callable[[], Coroutine[Any, Any, None]]] = []

    def set_hooks(self, hooks: ProtocolHooks) -> None:
        for u in self.by_name.values():
            u.hooks = hooks

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        for u in self.by_name.values():
            tg.start_soon(u.run)
        for task in self.background:
            tg.start_soon(task)

    async def wait_ready(self, timeout: float) -> None:
        with contextlib.suppress(Exception):
            async with anyio.create_task_group() as tg:
                for u in self.by_name.values():
                    tg.start_soon(u.wait_ready, timeout)

    def reattest_all(self) -> None:
        for u in self.by_name.values():
            if u.state == "quarantined":
                u.restart()
            u.reattest()

    def stop(self) -> None:
        for u in self.by_name.values():
            u.stop()

    def candidates(self) -> list[tuple[str, str]]:
        return [(u.name, t.name) for u in self.by_name.values() for t in u.tools]

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            u.name: {"state": u.state, "tools": len(u.tools), "identity": u.identity, "error": u.last_error}
            for u in self.by_name.values()
        }
