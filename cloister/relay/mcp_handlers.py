"""The relay's MCP server for agents: `tools/list` (only what the enclave lets the agent see), the
enclave's attestation as a resource, and `tools/call` handed to the call path (`CallPath`).

Beyond tools (decision 0018): the upstreams' resources, resource templates and prompts, listed
under server-prefixed names and filtered like tools, read and got under the enclave's decision
and logged like tool calls (`CallPath.governed`); completions for what the agent may see;
progress and cancellation of calls; upstream log messages, and `logging/setLevel`; upstream
sampling, elicitation and roots requests, decided as the agent's and logged, then sent to it
(roots: decision 0027; to a 2026-07-28 agent as an input round of its call: decision 0030),
and an agent's `notifications/roots/list_changed` to the upstreams it uses; and
`notifications/*/list_changed` to every agent session when what it may see may have changed
(an upstream's lists, its proven identity or its connection; the policy in force)."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import anyio
import grpc
import mcp_types as types
from mcp.server import NotificationOptions, Server
from mcp.server.context import ServerRequestContext
from mcp.server.models import InitializationOptions
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp_types.jsonrpc import INVALID_REQUEST, METHOD_NOT_FOUND
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from cloister import __version__
from cloister.relay.agent_sessions import (
    UPSTREAM_URI,
    AgentSession,
    AgentSessions,
    Flight,
    relay_template,
    relay_uri,
    session_key,
    split_uri,
)
from cloister.relay.agent_tasks import AgentTasks, Around, parse_params
from cloister.relay.call_path import CallPath, split_tool_name, stamped_meta
from cloister.relay.codes import DENIED, ENCLAVE_UNAVAILABLE, INVALID_PARAMS, UNAUTHENTICATED
from cloister.relay.enclave_client import EnclaveRefused, EnclaveUnavailable
from cloister.relay.input_rounds import (
    InputRounds,
    Waiter,
    asking_call,
    offers_input,
    pending_call,
    wire_responses,
)
from cloister.relay.listen import AgentListens
from cloister.relay.state import RelayState
from cloister.relay.tasks import TaskRelay
from cloister.relay.upstreams import Upstream, UpstreamError, Upstreams
from cloister.wire import enclave_pb2 as pb
from cloister.wire.contract import TOOL_SEPARATOR

log = logging.getLogger("cloister.relay.mcp")
ATTESTATION_URI = "cloister://attestation/"
LISTEN_KEY = "listen:"  # a listen stream's key among a resource's subscribers (session keys are mcp:/obj:)
LIST_CHANGED_DELAY_S = 0.2  # changes within this coalesce into one round of notifications
POLICY_POLL_S = 2.0  # how often the policy in force is checked for a push
# An agent's roots/list_changed reaches each upstream at most once per this (a flood coalesces).
ROOTS_CHANGED_INTERVAL_S = 1.0
_T = TypeVar("_T")
_C = TypeVar("_C")


class _RelayServer(Server[Any]):
    """The SDK's low-level server, announcing list_changed for tools, resources and prompts."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        every = NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True)
        options = super().create_initialization_options(
            notification_options or every, experimental_capabilities, extensions
        )
        # Tasks (2025-11-25; decision 0029): task-augmented tools/call, tasks/list and tasks/cancel.
        # A call to an upstream without tasks runs as a plain call, as the spec lets a receiver do.
        options.capabilities.tasks = types.ServerTasksCapability(
            list=types.TasksListCapability(),
            cancel=types.TasksCancelCapability(),
            requests=types.ServerTasksRequestsCapability(
                tools=types.TasksToolsCapability(call=types.TasksCallCapability())
            ),
        )
        return options


def bearer(ctx: ServerRequestContext[Any, Any]) -> str:
    """The request's bearer token, unverified (only the enclave verifies it); "" when absent."""
    request = ctx.request
    if request is None:
        return ""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class McpHandlers:
    def __init__(self, state: RelayState, upstreams: Upstreams, calls: CallPath) -> None:
        self.state = state
        self.upstreams = upstreams
        self.calls = calls
        self.agents = AgentSessions()
        self.rounds = InputRounds(self.agents)  # 2026-07-28 agents' input rounds (decision 0030)
        self.listens = AgentListens(bearer, self.listen_resources)
        self._listen_ids = itertools.count(1)  # 2026-07-28 agents' subscriptions/listen streams
        calls.before_shutdown.append(self.listens.close)
        self._changed = anyio.Event()
        self._roots_changed: set[str] = set()  # upstreams an agent's roots/list_changed is due to
        self._roots_due = anyio.Event()
        upstreams.set_hooks(self)
        self.tasks = TaskRelay(self)  # MCP tasks (decision 0029)
        upstreams.background += [self._notify_changes, self._watch_policy, self._forward_roots_changed]
        upstreams.background.append(self.tasks.sweep)
        # An upstream's task-augmented sampling and elicitation (decision 0031).
        self.agent_tasks = AgentTasks(self)
        upstreams.background.append(self.agent_tasks.run)

    def server(self) -> Server[Any]:
        server = self._server()
        self.tasks.install(server)
        return server

    def _server(self) -> Server[Any]:
        return _RelayServer(
            "cloister-relay",
            version=__version__,
            instructions="Tools and prompts are named <server>___<name>; upstream resources are "
            f"{UPSTREAM_URI}<server>/<uri>. Every use is decided by an attested enclave and recorded "
            "in a verifiable log.",
            # Without this the SDK validates Mcp-Param-* headers on every tools/call by running the
            # whole tools/list handler, i.e. an enclave round trip per call.
            get_tool_input_schema=self.input_schema,
            on_list_tools=self.list_tools,
            # A result dict is the runner's as is (mcp.server.runner._dump_result): no model round trip.
            on_call_tool=cast(Any, self.call_tool),
            on_list_resources=self.list_resources,
            on_list_resource_templates=self.list_resource_templates,
            on_read_resource=self.read_resource,
            on_subscribe_resource=self.subscribe,
            on_unsubscribe_resource=self.unsubscribe,
            on_list_prompts=self.list_prompts,
            on_get_prompt=self.get_prompt,
            on_completion=self.complete,
            on_set_logging_level=self.set_logging_level,
            on_roots_list_changed=self.roots_list_changed,
            on_subscriptions_listen=self.listens,
        )

    def _session(self, ctx: ServerRequestContext[Any, Any]) -> AgentSession:
        return self.agents.seen(ctx, bearer(ctx))

    # ---- tools ----------------------------------------------------------------------------------

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> dict[str, Any]:
        session = self._session(ctx)
        progress = _progress_to(ctx, params.meta)
        if ctx.session.protocol_version in MODERN_PROTOCOL_VERSIONS:
            responses = wire_responses(params.input_responses)
            waiter = Waiter(ctx, ctx.request_id, progress)
            return await self.call_modern(
                session, params.name, params.arguments, params.meta, responses, params.request_state, waiter
            )
        with self.agents.flight(split_tool_name(params.name)[0], session, ctx):
            return await self.call_json(session.token, params.name, params.arguments, params.meta, progress)

    async def call_modern(
        self,
        session: AgentSession,
        name: str,
        arguments: dict[str, Any] | None,
        meta: Any,
        responses: Any,
        state: Any,
        waiter: Waiter,
    ) -> dict[str, Any]:
        """A 2026-07-28 agent's tools/call, for the SDK's handler and the fast path alike (decision
        0030): a retry continues its call's input rounds; a call whose agent declared sampling,
        elicitation or roots runs in rounds (`InputRounds`); any other runs inline."""
        token = session.token
        if state is not None or responses:
            if state is None:
                raise MCPError(
                    INVALID_PARAMS, "inputResponses without a requestState answer no input round of this relay"
                )
            return await self.rounds.resume(token, name, arguments, state, responses, waiter)
        server = split_tool_name(name)[0]
        if not offers_input(meta):
            with self.agents.flight(server, session, waiter.ctx):
                return await self.call_json(token, name, arguments, meta, waiter.progress)

        async def call(progress: ProgressFnT | None) -> dict[str, Any]:
            return await self.call_json(token, name, arguments, meta, progress)

        version = str(waiter.ctx.session.protocol_version)
        return await self.rounds.start(server, token, name, arguments, version, meta, call, waiter)

    async def call_json(
        self, token: str, name: str, arguments: dict[str, Any] | None, meta: Any, progress: ProgressFnT | None = None
    ) -> dict[str, Any]:
        """A tools/call's result object as the agent gets it, for the SDK's handler and the fast
        path alike (decision 0023): the call path's answer with upstream resource links renamed."""
        result = await self.calls.call_json(token, name, arguments, meta, progress)
        if "resultType" not in result:
            # What CallToolResult's default gave: the 2026-07-28 surface requires it, older ones drop it.
            result = {**result, "resultType": "complete"}
        content = result.get("content")
        if isinstance(content, list) and any(isinstance(c, dict) and c.get("type") in _LINKS for c in content):
            server, _ = split_tool_name(name)
            result = {**result, "content": [relay_links_json(server, c) for c in content]}
        return result

    def input_schema(self, name: str) -> dict[str, Any] | None:
        server, tool = split_tool_name(name)
        upstream = self.upstreams.by_name.get(server)
        for t in upstream.tools if upstream else ():
            if t.name == tool:
                return dict(t.input_schema)
        return None

    async def _shown(self, session: AgentSession, refs: list[pb.ToolRef]) -> list[pb.ToolRef]:
        """`_visible` for a listing, remembering which servers the session was shown something of."""
        visible = await self._visible(session.token, refs)
        session.servers.update(v.server for v in visible)
        return visible

    async def _visible(self, token: str, refs: list[pb.ToolRef]) -> list[pb.ToolRef]:
        """The items the agent may see (the enclave judges), or the agent's error. Asked even for
        no items: an empty list is no answer to a bad token."""
        try:
            resp = await self.state.enclave.filter_items(token, refs)
        except EnclaveRefused as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                raise MCPError(UNAUTHENTICATED, f"unauthenticated: {exc}") from exc
            raise MCPError(ENCLAVE_UNAVAILABLE, f"the enclave refused to list: {exc}") from exc
        except EnclaveUnavailable as exc:
            raise MCPError(ENCLAVE_UNAVAILABLE, f"nothing is listed while the enclave is unavailable: {exc}") from exc
        return list(resp.visible)

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        session = self._session(ctx)
        by_key = {(u.name, t.name): t for u in self.upstreams.by_name.values() for t in u.tools}
        refs = [pb.ToolRef(server=s, tool=t) for s, t in by_key]
        tools = []
        for ref in await self._shown(session, refs):
            t = by_key[(ref.server, ref.tool)]
            tools.append(
                t.model_copy(
                    update={
                        "name": f"{ref.server}{TOOL_SEPARATOR}{ref.tool}",
                        "description": f"[{ref.server}] {t.description or ''}".strip(),
                    }
                )
            )
        return types.ListToolsResult(tools=tools)

    # ---- resources ------------------------------------------------------------------------------

    async def list_resources(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        session = self._session(ctx)
        items = [(u, r) for u in self._up() for r in u.resources]
        refs = [pb.ToolRef(server=u.name, tool=str(r.uri), kind=pb.ACTION_KIND_RESOURCE) for u, r in items]
        shown = {(v.server, v.tool) for v in await self._shown(session, refs)}
        return types.ListResourcesResult(
            resources=[
                r.model_copy(update={"uri": relay_uri(u.name, str(r.uri)), "name": f"{u.name}{TOOL_SEPARATOR}{r.name}"})
                for u, r in items
                if (u.name, str(r.uri)) in shown
            ]
        )

    async def list_resource_templates(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        session = self._session(ctx)
        items = [(u, t) for u in self._up() for t in u.templates]
        refs = [pb.ToolRef(server=u.name, tool=t.uri_template, kind=pb.ACTION_KIND_RESOURCE) for u, t in items]
        shown = {(v.server, v.tool) for v in await self._shown(session, refs)}
        templates = [
            t.model_copy(
                update={
                    "uri_template": relay_template(u.name, t.uri_template),
                    "name": f"{u.name}{TOOL_SEPARATOR}{t.name}",
                }
            )
            for u, t in items
            if (u.name, t.uri_template) in shown
        ]
        return types.ListResourceTemplatesResult(resource_templates=[_attestation_template(), *templates])

    async def read_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        if uri.startswith(ATTESTATION_URI):
            return await self._attestation(uri)
        target = split_uri(uri)
        if target is None:
            raise MCPError(
                INVALID_PARAMS,
                f"unknown resource {uri[:200]!r}: upstream resources are {UPSTREAM_URI}<server>/<uri>, "
                f"the enclave's attestation {ATTESTATION_URI}<nonce hex>",
            )
        server, upstream_uri = target
        upstream = self._upstream(server)
        session = self._session(ctx)

        async def send(grant: bytes) -> types.ReadResourceResult:
            return await upstream.request(
                "resource read",
                lambda c: c.read_resource(
                    upstream_uri, meta=cast(types.RequestParamsMeta, self.calls.grant_meta(grant))
                ),
            )

        result, log_meta = await self.calls.governed(
            session.token, pb.ACTION_KIND_RESOURCE, server, upstream_uri, {"uri": upstream_uri}, send
        )
        contents = [c.model_copy(update={"uri": relay_uri(server, str(c.uri))}) for c in result.contents]
        return result.model_copy(update={"contents": contents, "meta": stamped_meta(result.meta, log_meta)})

    # ---- subscriptions: updates of a resource the agent may see ---------------------------------

    async def subscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        """Updates of a resource the agent may read (judged as its listing is); the upstream is
        subscribed once for every agent. Reading the update is a read, decided and logged."""
        session = self._session(ctx)
        server, uri = await self._subscribable(session.token, str(params.uri))
        if session.key not in self.agents.sessions:
            raise MCPError(INVALID_REQUEST, "subscriptions need a session (Mcp-Session-Id) to deliver updates on")
        try:
            await self._hold((server, uri), session.key)
        except UpstreamError as exc:
            raise MCPError(INVALID_REQUEST, str(exc)) from exc
        return types.EmptyResult()

    async def unsubscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        session = self._session(ctx)
        target = split_uri(str(params.uri))
        if target is not None:
            await self._drop(target, session.key)
        return types.EmptyResult()

    async def _hold(self, target: tuple[str, str], key: str) -> None:
        """Add `key` (a session, or a listen stream) to the resource's subscribers; the upstream
        session, shared by every agent, is subscribed for the first one. UpstreamError if that fails."""
        server, uri = target
        subscribers = self.agents.subscribers.setdefault(target, set())
        if not subscribers:
            try:
                await self._upstream(server).request("subscribe", lambda c: c.subscribe_resource(uri))
            except UpstreamError:
                if not subscribers:
                    self.agents.subscribers.pop(target, None)
                raise
        subscribers.add(key)

    async def _drop(self, target: tuple[str, str], key: str) -> None:
        """Remove `key` from the resource's subscribers; the upstream is unsubscribed after the last."""
        subscribers = self.agents.subscribers.get(target)
        if subscribers is None:
            return
        subscribers.discard(key)
        if not subscribers:
            del self.agents.subscribers[target]
            server, uri = target
            with contextlib.suppress(UpstreamError):
                await self._upstream(server).request("unsubscribe", lambda c: c.unsubscribe_resource(uri))

    async def _subscribable(self, token: str, uri: str) -> tuple[str, str]:
        target = split_uri(uri)
        if target is None:
            raise MCPError(INVALID_PARAMS, f"unknown resource {uri[:200]!r}: subscribe to {UPSTREAM_URI}<server>/<uri>")
        server, upstream_uri = target
        self._upstream(server)
        ref = pb.ToolRef(server=server, tool=upstream_uri, kind=pb.ACTION_KIND_RESOURCE)
        if not await self._visible(token, [ref]):
            raise MCPError(DENIED, f"resource {upstream_uri[:200]!r} of {server!r} is not one you may read")
        return target

    async def listen_resources(
        self, ctx: ServerRequestContext[Any, Any], uris: list[str]
    ) -> tuple[list[str], Callable[[], Awaitable[None]]]:
        """A 2026-07-28 agent's listen stream names resources (cloister/relay/listen.py): those it
        may read, judged as a resources/subscribe is, in the relay's own spelling, each subscribed
        upstream for it; the others are left out of what the stream honors. Returns them and the
        release to await when the stream ends."""
        token = bearer(ctx)
        key = f"{LISTEN_KEY}{next(self._listen_ids)}"
        allowed: list[str] = []
        held: list[tuple[str, str]] = []
        for uri in dict.fromkeys(uris):
            try:
                server, upstream_uri = await self._subscribable(token, uri)
            except MCPError:
                continue  # not one this agent may read, or not ours: not honored
            try:
                await self._hold((server, upstream_uri), key)
            except UpstreamError:
                continue
            held.append((server, upstream_uri))
            allowed.append(relay_uri(server, upstream_uri))

        async def release() -> None:
            for target in held:
                await self._drop(target, key)

        return allowed, release

    async def resource_updated(self, server: str, uri: str) -> None:
        """An upstream's resource changed: tell the sessions subscribed to it, and the listen
        streams (2026-07-28 agents) that honored it."""
        keys = list(self.agents.subscribers.get((server, uri), ()))
        if any(k.startswith(LISTEN_KEY) for k in keys):
            await self.listens.resource_updated(relay_uri(server, uri))
        for key in keys:
            if key.startswith(LISTEN_KEY):
                continue
            s = self.agents.sessions.get(key)
            try:
                if s is None:
                    raise LookupError("session forgotten")
                await s.ctx.session.send_resource_updated(relay_uri(server, uri))
            except Exception as exc:  # the agent is gone
                log.debug("resource update for session %s not delivered: %s", key, exc)
                self.agents.forget(key)

    async def _attestation(self, uri: str) -> types.ReadResourceResult:
        try:
            nonce = bytes.fromhex(uri.removeprefix(ATTESTATION_URI))
        except ValueError:
            nonce = b""
        if not 8 <= len(nonce) <= 64:
            raise MCPError(INVALID_PARAMS, "the nonce must be 8 to 64 bytes, hex-encoded")
        try:
            resp = await self.state.enclave.attest(nonce)
        except (EnclaveUnavailable, EnclaveRefused) as exc:
            raise MCPError(ENCLAVE_UNAVAILABLE, f"the enclave is unavailable: {exc}") from exc
        body = json.dumps({"document": base64.b64encode(resp.document).decode("ascii"), "nonce": nonce.hex()})
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, mime_type="application/json", text=body)]
        )

    # ---- prompts --------------------------------------------------------------------------------

    async def list_prompts(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        session = self._session(ctx)
        items = [(u, p) for u in self._up() for p in u.prompts]
        refs = [pb.ToolRef(server=u.name, tool=p.name, kind=pb.ACTION_KIND_PROMPT) for u, p in items]
        shown = {(v.server, v.tool) for v in await self._shown(session, refs)}
        return types.ListPromptsResult(
            prompts=[
                p.model_copy(
                    update={
                        "name": f"{u.name}{TOOL_SEPARATOR}{p.name}",
                        "description": f"[{u.name}] {p.description or ''}".strip(),
                    }
                )
                for u, p in items
                if (u.name, p.name) in shown
            ]
        )

    async def get_prompt(
        self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        server, name = split_tool_name(params.name)
        upstream = self._upstream(server)
        session = self._session(ctx)
        arguments = dict(params.arguments or {})

        async def send(grant: bytes) -> types.GetPromptResult:
            meta = cast(types.RequestParamsMeta, self.calls.grant_meta(grant))
            return await upstream.request("prompt", lambda c: c.get_prompt(name, arguments, meta=meta))

        result, log_meta = await self.calls.governed(
            session.token, pb.ACTION_KIND_PROMPT, server, name, {"name": name, "arguments": arguments}, send
        )
        messages = [m.model_copy(update={"content": _relay_links(server, m.content)}) for m in result.messages]
        return result.model_copy(update={"messages": messages, "meta": stamped_meta(result.meta, log_meta)})

    # ---- completions: for what the agent may see ------------------------------------------------

    async def complete(
        self, ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        token = self._session(ctx).token
        ref = params.ref
        if isinstance(ref, types.PromptReference):
            server, name = split_tool_name(ref.name)
            check = pb.ToolRef(server=server, tool=name, kind=pb.ACTION_KIND_PROMPT)
            upstream_ref: types.PromptReference | types.ResourceTemplateReference = ref.model_copy(
                update={"name": name}
            )
        else:
            target = split_uri(ref.uri)
            if target is None:
                raise MCPError(INVALID_PARAMS, f"unknown resource template {ref.uri[:200]!r}")
            server, name = target
            check = pb.ToolRef(server=server, tool=name, kind=pb.ACTION_KIND_RESOURCE)
            upstream_ref = ref.model_copy(update={"uri": name})
        upstream = self._upstream(server)
        known = {p.name for p in upstream.prompts} | {t.uri_template for t in upstream.templates}
        if name not in known or not await self._visible(token, [check]):
            raise MCPError(DENIED, f"no completions: {params.ref.type} {name!r} of {server!r} is not one you may see")
        argument = {"name": params.argument.name, "value": params.argument.value}
        context = dict(params.context.arguments or {}) if params.context is not None else None
        try:
            return await upstream.request("completion", lambda c: c.complete(upstream_ref, argument, context))
        except UpstreamError as exc:
            raise MCPError(INVALID_REQUEST, str(exc)) from exc

    # ---- logging --------------------------------------------------------------------------------

    async def set_logging_level(
        self, ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        """The agent's level; the upstreams are set to the most verbose level any agent asked for,
        and each agent gets messages at its own level and above."""
        self._session(ctx).log_level = params.level
        level = self.agents.most_verbose()
        for u in self._up():
            if u.logs and level is not None and u.log_level != level:
                with contextlib.suppress(UpstreamError):
                    await u.request("setLevel", lambda c, lv=level: c.set_logging_level(lv))  # type: ignore[misc]
                    u.log_level = level
        return types.EmptyResult()

    async def log_message(self, server: str, params: types.LoggingMessageNotificationParams) -> None:
        """An upstream's log message, to the agent(s) it may concern (agent_sessions)."""
        logger = f"{server}/{params.logger}" if params.logger else server
        for session, flight in self.agents.log_targets(server, params.level):
            target = flight.ctx if flight is not None else session.ctx
            rid = str(flight.ctx.request_id) if flight is not None and flight.ctx.request_id is not None else None
            try:
                await target.session.send_log_message(params.level, params.data, logger, related_request_id=rid)
            except Exception as exc:  # the agent is gone: forget its session
                log.debug("log message for session %s not delivered: %s", session.key, exc)
                self.agents.forget(session.key)

    # ---- sampling and elicitation: the upstream asks the agent ----------------------------------

    async def agent_request(
        self, server: str, method: str, params: dict[str, Any], around: Around
    ) -> Any | types.ErrorData:
        """The plain request of an upstream's task-augmented one (decision 0031), `around` its send."""
        try:
            parsed = parse_params(method, params)
        except MCPError as exc:
            return exc.error
        if isinstance(parsed, types.CreateMessageRequestParams):
            return await self.sampling(server, parsed, around)
        return await self.elicitation(server, parsed, around)

    async def sampling(
        self, server: str, params: types.CreateMessageRequestParams, around: Around | None = None
    ) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData:
        capability = types.ClientCapabilities(sampling=types.SamplingCapability())
        params = params.model_copy(
            update={"meta": self.tasks.relate(server, params.meta, self.agents.attributed(server)[0])}
        )

        async def send(flight: Flight) -> types.CreateMessageResult:
            return await flight.ctx.session.send_request(
                types.CreateMessageRequest(params=params),
                types.CreateMessageResult,
                metadata=ServerMessageMetadata(related_request_id=flight.ctx.request_id),
            )

        return await self._to_agent(
            server, pb.ACTION_KIND_SAMPLING, "sampling", capability, params, send, around=around
        )

    async def elicitation(
        self, server: str, params: types.ElicitRequestParams, around: Around | None = None
    ) -> types.ElicitResult | types.ErrorData:
        capability = types.ClientCapabilities(elicitation=types.ElicitationCapability())
        params = params.model_copy(
            update={"meta": self.tasks.relate(server, params.meta, self.agents.attributed(server)[0])}
        )

        async def send(flight: Flight) -> types.ElicitResult:
            return await flight.ctx.session.send_request(
                types.ElicitRequest(params=params),
                types.ElicitResult,
                metadata=ServerMessageMetadata(related_request_id=flight.ctx.request_id),
            )

        return await self._to_agent(
            server, pb.ACTION_KIND_ELICITATION, "elicitation", capability, params, send, around=around
        )

    async def roots(self, server: str) -> types.ListRootsResult | types.ErrorData:
        """An upstream's roots/list (decision 0027): the roots of the one agent whose call it
        serves, decided (`ListRoots`) and logged like sampling; never another agent's, and an
        error, not an empty list, when there is no such agent (an upstream may cache an answer)."""
        capability = types.ClientCapabilities(roots=types.RootsCapability())

        async def send(flight: Flight) -> types.ListRootsResult:
            return await flight.ctx.session.send_request(
                types.ListRootsRequest(),
                types.ListRootsResult,
                metadata=ServerMessageMetadata(related_request_id=flight.ctx.request_id),
            )

        # The spec's answer from a client without roots is "method not found".
        return await self._to_agent(
            server, pb.ACTION_KIND_ROOTS, "roots", capability, None, send, missing=METHOD_NOT_FOUND
        )

    async def roots_list_changed(
        self, ctx: ServerRequestContext[Any, Any], params: types.NotificationParams | None
    ) -> None:
        """An agent's roots changed: tell the upstreams its session uses (those its listings showed
        it something of, and those its calls are in flight on), coalesced per upstream."""
        # Looked up, not `seen`: a notification is no request whose stream could reach the agent.
        session = self.agents.sessions.get(session_key(ctx))
        if session is None:
            return  # it was never shown anything, nor has a call in flight: no upstream it uses
        key = session.key
        used = set(session.servers) | {
            s for s, fs in self.agents.flights.items() if any(f.session.key == key for f in fs)
        }
        for server in used:
            upstream = self.upstreams.by_name.get(server)
            if upstream is not None and upstream.state == "up":
                self._roots_changed.add(server)
        if self._roots_changed:
            self._roots_due.set()

    async def _forward_roots_changed(self) -> None:
        """Send the due roots/list_changed, at most one per upstream per interval. It carries no
        roots: the upstream's roots/list that follows is decided like any other."""
        while True:
            await self._roots_due.wait()
            self._roots_due = anyio.Event()
            due, self._roots_changed = self._roots_changed, set()
            for server in sorted(due):
                upstream = self.upstreams.by_name.get(server)
                if upstream is None:
                    continue
                with contextlib.suppress(UpstreamError):
                    await upstream.request("roots/list_changed", lambda c: c.send_roots_list_changed())
            await anyio.sleep(ROOTS_CHANGED_INTERVAL_S)

    async def _to_agent(
        self,
        server: str,
        kind: int,
        what: str,
        capability: types.ClientCapabilities,
        params: Any,
        send: Callable[[Flight], Awaitable[_T]],
        missing: int = INVALID_REQUEST,
        around: Around | None = None,
    ) -> _T | types.ErrorData:
        """An upstream's request to the agent whose call it serves: decided by the enclave as that
        agent's (the policy may forbid it), logged, then sent, and the answer logged. To a
        2026-07-28 agent it goes as an input round of its call (decision 0030). `around`: an
        upstream task's run of the send, reached only when allowed (decision 0031)."""
        exact = asking_call(server)
        flight, sessions = (exact.flight, 1) if exact is not None else self.agents.attributed(server)
        if flight is None:
            why = "no agent call is in flight on it" if not sessions else f"calls of {sessions} agents are in flight"
            return types.ErrorData(code=INVALID_REQUEST, message=f"{what} refused: {why}, so it reaches no agent")
        rounds = pending_call(flight.ctx)
        if rounds is None and not flight.ctx.session.can_send_request:
            # A handshake-era session in JSON-response mode, or a 2026-07-28 request whose agent
            # declared no sampling, elicitation or roots: no way to ask it.
            version = flight.ctx.session.protocol_version
            return types.ErrorData(
                code=missing if version in MODERN_PROTOCOL_VERSIONS else INVALID_REQUEST,
                message=f"{what} refused: the agent's session ({version}) cannot take it"
                + (
                    ": its request declared no sampling, elicitation or roots"
                    if version in MODERN_PROTOCOL_VERSIONS
                    else ""
                ),
            )
        if not flight.ctx.session.check_client_capability(capability):
            return types.ErrorData(code=missing, message=f"{what} refused: the agent's client does not offer it")
        request = {} if params is None else params.model_dump(mode="json", by_alias=True, exclude_none=True)
        if rounds is not None:
            refusal = rounds.refusal()
            if refusal:  # before any decision: a flood of rounds costs no log entries
                return types.ErrorData(code=INVALID_REQUEST, message=f"{what} refused: {refusal}")
            method = _METHODS[kind]
            body = None if params is None else request

            async def ask(_: Flight) -> Any:
                return await rounds.ask(method, body)

            send = ask

        async def forward(grant: bytes) -> Any:
            try:
                if around is not None:
                    return await around(lambda: send(flight))
                return await send(flight)
            except UpstreamError:
                raise
            except MCPError as exc:
                raise UpstreamError(
                    "error", f"the agent refused the {what} request: {exc.message}", code=exc.code
                ) from exc
            except Exception as exc:  # the agent's stream is gone, or its answer malformed
                raise UpstreamError(
                    "unavailable", f"the {what} request did not reach the agent: {exc!r}"[:500]
                ) from exc

        # In a round, the upstream may withdraw its request, or its call may end under it (the
        # upstream's deadline, the agent gone): either way the round is not answered.
        cancelled = "cancelled by the upstream" if rounds is None else "cancelled by the upstream or with its call"
        try:
            result, _ = await self.calls.governed(flight.token, kind, server, "", request, forward, cancelled=cancelled)
        except MCPError as exc:  # denied, or failed: the upstream gets the reason (and the log index)
            return types.ErrorData(code=exc.code, message=exc.message, data=exc.data)
        return result  # type: ignore[no-any-return]

    async def task_status(self, server: str, params: types.TaskStatusNotificationParams) -> None:
        """An upstream's notifications/tasks/status, to the agent session that made the task (decision 0029)."""
        await self.tasks.status(server, params)

    # ---- list_changed -----------------------------------------------------------------------------

    def changed(self, server: str) -> None:
        """What an agent may see may have changed (an upstream's lists, identity or connection)."""
        self._changed.set()

    async def _notify_changes(self) -> None:
        """Tell every agent session, once per burst of changes."""
        while True:
            await self._changed.wait()
            await anyio.sleep(LIST_CHANGED_DELAY_S)
            self._changed = anyio.Event()
            await self.listens.lists_changed()  # 2026-07-28 agents, on their listen streams
            for s in list(self.agents.sessions.values()):
                try:
                    await s.ctx.session.send_tool_list_changed()
                    await s.ctx.session.send_resource_list_changed()
                    await s.ctx.session.send_prompt_list_changed()
                except Exception as exc:  # the agent is gone
                    log.debug("list_changed for session %s not delivered: %s", s.key, exc)
                    self.agents.forget(s.key)

    async def _watch_policy(self) -> None:
        """A policy push (through the admin API or a restart) changes what agents may see."""
        seen: tuple[int, bytes] | None = None
        while True:
            await anyio.sleep(POLICY_POLL_S)
            try:
                health = await self.state.enclave.health()
            except (EnclaveUnavailable, EnclaveRefused):
                continue
            now = (health.policy_version, health.policy_sha256)
            if seen is not None and now != seen:
                self._changed.set()
            seen = now

    # ---- helpers --------------------------------------------------------------------------------

    def _up(self) -> list[Upstream]:
        return [u for u in self.upstreams.by_name.values() if u.state == "up"]

    def _upstream(self, server: str) -> Upstream:
        upstream = self.upstreams.by_name.get(server)
        if upstream is None:
            raise MCPError(INVALID_PARAMS, f"no upstream named {server[:64]!r} is configured on this relay")
        return upstream


def _relay_links(server: str, content: _C) -> _C:
    """A resource link or embedded resource in an upstream's answer, named as agents read it
    through the relay (the logged body keeps the upstream's own URI)."""
    if isinstance(content, types.ResourceLink):
        return content.model_copy(update={"uri": relay_uri(server, str(content.uri))})
    if isinstance(content, types.EmbeddedResource):
        inner = content.resource.model_copy(update={"uri": relay_uri(server, str(content.resource.uri))})
        return content.model_copy(update={"resource": inner})
    return content


_LINKS = frozenset({"resource_link", "resource"})
# The MCP method of each server-to-agent kind, as an input round names it (decision 0030).
_METHODS: dict[int, str] = {
    pb.ACTION_KIND_SAMPLING: "sampling/createMessage",
    pb.ACTION_KIND_ELICITATION: "elicitation/create",
    pb.ACTION_KIND_ROOTS: "roots/list",
}


def relay_links_json(server: str, content: Any) -> Any:
    """`_relay_links` for a content item held as JSON."""
    if not isinstance(content, dict) or content.get("type") not in _LINKS:
        return content
    if content["type"] == "resource_link" and isinstance(content.get("uri"), str):
        return {**content, "uri": relay_uri(server, content["uri"])}
    inner = content.get("resource")
    if content["type"] == "resource" and isinstance(inner, dict) and isinstance(inner.get("uri"), str):
        return {**content, "resource": {**inner, "uri": relay_uri(server, inner["uri"])}}
    return content


def _progress_to(ctx: ServerRequestContext[Any, Any], meta: Any) -> ProgressFnT | None:
    """Where an upstream's progress for a call goes: to the agent, under the agent's own progress
    token, on the call's stream; None when the agent asked for none."""
    meta = meta or {}
    token = meta.get("progress_token", meta.get("progressToken"))  # the SDK's TypedDict key, or the wire's
    if not isinstance(token, str | int) or isinstance(token, bool) or ctx.request_id is None:
        return None
    rid = str(ctx.request_id)

    async def forward(progress: float, total: float | None, message: str | None) -> None:
        await ctx.session.send_progress_notification(token, progress, total, message, related_request_id=rid)

    return forward


def _attestation_template() -> types.ResourceTemplate:
    return types.ResourceTemplate(
        name="enclave-attestation",
        uri_template=ATTESTATION_URI + "{nonce}",
        mime_type="application/json",
        description="The Cloister enclave's NSM attestation document (base64) with your nonce (hex, 8-64 "
        "bytes); its user_data binds the enclave's grant and log keys. Verify it with "
        "cloister.verify.enclave_identity.verify_enclave or `cloister attest verify`.",
    )
