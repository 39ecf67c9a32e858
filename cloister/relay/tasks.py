"""MCP tasks (2025-11-25, `tasks/*`) through Cloister (decision 0029).

A task-augmented `tools/call` (`params.task`) is decided, logged and forwarded like any tool call
(`CallPath.call_task`: the same Cedar action, the same grant bound to the arguments); when the
upstream answers with a task, the agent gets a CreateTaskResult whose task id is the relay's: an
unguessable id mapped to (upstream, the upstream's task id, the agent the enclave verified). The
call's one outcome is deferred to the payload: `tasks/result` records the payload's hash (or the
upstream's error) as the outcome of the call's decision; `tasks/cancel` records "cancelled by the
client"; a task whose result nobody fetched is closed with an error before the enclave's outcome
window for the decision ends (`TaskRelay.sweep`), and at shutdown with "relay shutting down".

`tasks/get`, `tasks/result`, `tasks/list` and `tasks/cancel` are answered only for tasks of the
agent the enclave verifies the caller's token as (one FilterTools round trip, no log entry); any
other id, another agent's included, is "unknown task". What an upstream says of a task is parsed
and bounded before an agent sees it (`bounded_task`). An upstream's elicitation or sampling
request during a task (the `input_required` flow) is decided by the elicitation or sampling policy
(decision 0018) as the agent's whose `tasks/result` is in flight, and sent on that request's stream.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import anyio
import grpc
import mcp_types as types
from mcp.server import Server
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INVALID_REQUEST
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from cloister.relay.call_path import TaskStarted, split_tool_name, stamped_meta
from cloister.relay.codes import (
    ENCLAVE_UNAVAILABLE,
    FROM_CLOISTER,
    FROM_UPSTREAM,
    INVALID_PARAMS,
    SOURCE,
    UNAUTHENTICATED,
    UPSTREAM_FAILED,
    upstream_error_code,
)
from cloister.relay.enclave_client import EnclaveRefused, EnclaveUnavailable
from cloister.relay.upstreams import Upstream, UpstreamError
from cloister.verify.entries import OUTCOME_GRACE_MS
from cloister.verify.errors import CloisterError
from cloister.verify.grant import GrantError, read_grant
from cloister.verify.response_sig import result_sha256
from cloister.wire.contract import LOG_META_KEY

if TYPE_CHECKING:
    from cloister.relay.agent_sessions import Flight
    from cloister.relay.mcp_handlers import McpHandlers

log = logging.getLogger("cloister.relay.tasks")

RELAY_TASK_PREFIX = "cloister-task-"
MAX_TASKS_PER_AGENT = 64  # tasks (open or recently closed) the relay keeps per agent
MAX_TASKS = 10_000  # in all
MAX_TASK_ID = 256  # an upstream task id longer than this is refused (the call's outcome says so)
MAX_STATUS_MESSAGE = 1_000  # characters of an upstream's statusMessage an agent is shown
MAX_TIMESTAMP = 64  # characters of createdAt / lastUpdatedAt
OUTCOME_MARGIN_S = 60.0  # an unfetched task is closed this long before the enclave's outcome window ends
RETAIN_CLOSED_S = 3_600.0  # a closed task stays answerable (tasks/get, the same tasks/result) this long
SWEEP_S = 5.0
RELATED_TASK_KEY = "io.modelcontextprotocol/related-task"
STATUSES = frozenset({"working", "input_required", "completed", "failed", "cancelled"})
TERMINAL = frozenset({"completed", "failed", "cancelled"})
CANCELLED_BY_TASKS_CANCEL = "cancelled by the client (tasks/cancel)"
NOT_FETCHED = "task result not fetched by the agent before the outcome window ended"
SHUTTING_DOWN = "relay shutting down (task abandoned)"


class TaskError(CloisterError):
    """An upstream's task object is malformed or out of bounds."""


def relay_task_id() -> str:
    """A fresh task id for agents: 192 random bits, so no agent can guess another's."""
    return RELAY_TASK_PREFIX + secrets.token_urlsafe(24)


def upstream_task_id(raw: Any) -> str:
    """The upstream's task id of a task object, checked: a non-empty printable string of at most
    MAX_TASK_ID characters."""
    if not isinstance(raw, dict):
        raise TaskError("the task is not an object")
    tid = raw.get("taskId")
    if not isinstance(tid, str) or not tid:
        raise TaskError("the task has no taskId string")
    if len(tid) > MAX_TASK_ID:
        raise TaskError(f"the taskId is {len(tid)} characters; at most {MAX_TASK_ID} are accepted")
    if not tid.isprintable():
        raise TaskError("the taskId has unprintable characters")
    return tid


def _bounded_text(value: Any, cap: int, what: str) -> str:
    if not isinstance(value, str):
        raise TaskError(f"the task's {what} is not a string")
    return value[:cap]


def _optional_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
        raise TaskError(f"the task's {what} is not a non-negative integer")
    return value


def bounded_task(raw: Any, relay_id: str) -> dict[str, Any]:
    """An upstream's Task object as an agent gets it: checked field by field (unknown fields
    dropped), its id the relay's, its texts capped. TaskError when malformed."""
    upstream_task_id(raw)
    status = raw.get("status")
    if status not in STATUSES:
        raise TaskError(f"the task's status {str(status)[:40]!r} is not one of {sorted(STATUSES)}")
    task: dict[str, Any] = {
        "taskId": relay_id,
        "status": status,
        "createdAt": _bounded_text(raw.get("createdAt"), MAX_TIMESTAMP, "createdAt"),
        "lastUpdatedAt": _bounded_text(raw.get("lastUpdatedAt", raw.get("createdAt")), MAX_TIMESTAMP, "lastUpdatedAt"),
        "ttl": _optional_int(raw.get("ttl"), "ttl"),
    }
    poll = _optional_int(raw.get("pollInterval"), "pollInterval")
    if poll is not None:
        task["pollInterval"] = poll
    if raw.get("statusMessage") is not None:
        task["statusMessage"] = _bounded_text(raw["statusMessage"], MAX_STATUS_MESSAGE, "statusMessage")
    return task


@dataclass
class TaskRecord:
    """One task an agent made through the relay."""

    relay_id: str
    server: str
    upstream_id: str
    agent: str  # the enclave-verified agent whose call made it: the only one it is answered for
    decision: int  # the log index of the call's decision, whose outcome the task closes
    started: float  # monotonic
    deadline: float  # monotonic: the outcome is recorded by then, fetched or not
    paid: str = ""
    session: str = ""  # the agent session that made it: where its status notifications go
    task: dict[str, Any] = field(default_factory=dict)  # last known, as agents get it
    closed: bool = False  # the decision's outcome is recorded
    closed_at: float = 0.0
    result_sha256: bytes | None = None  # of the payload the outcome committed to, if any
    log_meta: dict[str, int] = field(default_factory=dict)
    fetchers: list[str] = field(default_factory=list)  # agent sessions with tasks/result in flight (one per request)
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class TaskTable:
    """The relay's map from its task ids to the upstreams' and the owning agents, bounded per
    agent and in all. Closed tasks are kept RETAIN_CLOSED_S, and go first when an agent is full."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        per_agent: int = MAX_TASKS_PER_AGENT,
        total: int = MAX_TASKS,
    ) -> None:
        self.clock = clock
        self.per_agent = per_agent
        self.total = total
        self._by_id: dict[str, TaskRecord] = {}
        self._by_upstream: dict[tuple[str, str], TaskRecord] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def room(self, agent: str) -> bool:
        """Whether `agent` may make one more task (its oldest closed one is forgotten if need be)."""
        mine = self.of(agent)
        if len(mine) >= self.per_agent:
            closed = [r for r in mine if r.closed]
            if not closed:
                return False
            self._drop(min(closed, key=lambda r: r.closed_at))
        if len(self._by_id) >= self.total:
            closed = [r for r in self._by_id.values() if r.closed]
            if not closed:
                return False
            self._drop(min(closed, key=lambda r: r.closed_at))
        return True

    def add(self, record: TaskRecord) -> None:
        key = (record.server, record.upstream_id)
        if key in self._by_upstream:
            # An upstream that reuses a live task id would join two agents' tasks: refused.
            raise TaskError(f"the upstream reused the task id of a task it already made ({record.upstream_id[:40]!r})")
        if not self.room(record.agent):
            raise TaskError(f"agent {record.agent!r} has {self.per_agent} open tasks; close or fetch some first")
        self._by_id[record.relay_id] = record
        self._by_upstream[key] = record

    def owned(self, agent: str, relay_id: str) -> TaskRecord | None:
        """The task `relay_id` when it is `agent`'s; None otherwise (unknown and another's alike)."""
        record = self._by_id.get(relay_id)
        return record if record is not None and record.agent == agent else None

    def of(self, agent: str) -> list[TaskRecord]:
        return [r for r in self._by_id.values() if r.agent == agent]

    def by_upstream(self, server: str, upstream_id: str) -> TaskRecord | None:
        return self._by_upstream.get((server, upstream_id))

    def due(self) -> list[TaskRecord]:
        """Open tasks whose outcome must be recorded now."""
        now = self.clock()
        return [r for r in self._by_id.values() if not r.closed and r.deadline <= now]

    def open(self) -> list[TaskRecord]:
        return [r for r in self._by_id.values() if not r.closed]

    def close(self, record: TaskRecord, log_meta: dict[str, int], payload_sha256: bytes | None) -> None:
        record.closed, record.closed_at = True, self.clock()
        record.log_meta, record.result_sha256 = log_meta, payload_sha256

    def prune(self) -> None:
        now = self.clock()
        for r in [r for r in self._by_id.values() if r.closed and now - r.closed_at > RETAIN_CLOSED_S]:
            self._drop(r)

    def _drop(self, record: TaskRecord) -> None:
        self._by_id.pop(record.relay_id, None)
        self._by_upstream.pop((record.server, record.upstream_id), None)


def outcome_window_s(grant: bytes) -> float:
    """How long after a decision its outcome may still be recorded, less a margin: the grant's
    lifetime plus the enclave's grace (OUTCOME_GRACE_MS), measured from the relay's own start."""
    try:
        claims = read_grant(grant)
        lifetime_s = max(0, claims.expires_ms - claims.issued_ms) / 1000
    except GrantError:
        lifetime_s = 0.0
    return max(1.0, lifetime_s + OUTCOME_GRACE_MS / 1000 - OUTCOME_MARGIN_S)


def _has_task(params: Any) -> bool:
    return isinstance(params, dict) and params.get("task") is not None


def _unknown(relay_id: str) -> MCPError:
    return MCPError(INVALID_PARAMS, f"unknown task {relay_id[:80]!r}: no task of yours has this id")


def _upstream_failure(exc: UpstreamError, what: str) -> MCPError:
    """An upstream's failure on a task request as the agent's error: the upstream's own code
    (never one of Cloister's) when it answered with an error, else the relay's verdict."""
    if exc.kind == "error" and exc.code:
        data = {SOURCE: FROM_UPSTREAM, "upstream_code": exc.code, "upstream": exc.data}
        return MCPError(upstream_error_code(exc.code), f"{what}: {exc}"[:1000], data=data)
    return MCPError(UPSTREAM_FAILED, f"{what}: {exc}"[:1000], data={SOURCE: FROM_CLOISTER, "kind": exc.kind})


class TaskRelay:
    """The relay's MCP side of tasks: the task-augmented tools/call and tasks/*."""

    def __init__(self, handlers: McpHandlers, clock: Callable[[], float] = time.monotonic) -> None:
        self.handlers = handlers
        self.table = TaskTable(clock)
        handlers.calls.before_shutdown.append(self.abandon)

    def install(self, server: Server[Any]) -> None:
        """A server middleware for task-augmented tools/call (the SDK would check its answer as a
        CallToolResult), and handlers for tasks/* (methods the SDK's tables leave out)."""
        server.middleware.append(self._intercept)
        server.add_request_handler("tasks/get", types.GetTaskRequestParams, self.get)
        server.add_request_handler("tasks/result", types.GetTaskPayloadRequestParams, self.result)
        server.add_request_handler("tasks/cancel", types.CancelTaskRequestParams, self.cancel)
        server.add_request_handler("tasks/list", types.PaginatedRequestParams, self.list)

    async def _intercept(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != "tools/call" or not _has_task(ctx.params) or ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return await call_next(ctx)
        try:
            params = types.CallToolRequestParams.model_validate(ctx.params, by_name=False)
        except ValidationError as exc:
            raise MCPError(INVALID_PARAMS, f"invalid tools/call parameters ({exc.error_count()} errors)") from exc
        server, _ = split_tool_name(params.name)
        upstream = self.handlers.upstreams.by_name.get(server)
        support = upstream.task_support() if upstream is not None else None
        if support is None or support.requests is None or support.requests.tools is None:
            # The spec's rule for a receiver without task support: run the request normally.
            return await call_next(ctx)
        return await self.call(ctx, params)

    async def _agent(self, token: str) -> str:
        """The agent the enclave verifies `token` as (no log entry), or the agent's error."""
        try:
            resp = await self.handlers.state.enclave.filter_items(token, [])
        except EnclaveRefused as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                raise MCPError(UNAUTHENTICATED, f"unauthenticated: {exc}") from exc
            raise MCPError(ENCLAVE_UNAVAILABLE, f"the enclave refused: {exc}") from exc
        except EnclaveUnavailable as exc:
            raise MCPError(
                ENCLAVE_UNAVAILABLE, f"tasks are not served while the enclave is unavailable: {exc}"
            ) from exc
        if not resp.agent:
            raise MCPError(UNAUTHENTICATED, "unauthenticated: the token names no agent")
        return resp.agent

    async def _owned(self, ctx: ServerRequestContext[Any, Any], relay_id: str) -> TaskRecord:
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            raise MCPError(INVALID_REQUEST, "tasks are a 2025-11-25 feature; this session speaks a later version")
        agent = await self._agent(self.handlers._session(ctx).token)
        record = self.table.owned(agent, relay_id)
        if record is None:
            raise _unknown(relay_id)
        return record

    def _upstream(self, record: TaskRecord) -> Upstream:
        upstream = self.handlers.upstreams.by_name.get(record.server)
        if upstream is None:
            raise MCPError(INVALID_PARAMS, f"the upstream of task {record.relay_id!r} is no longer configured")
        return upstream

    # ---- tools/call with a task -----------------------------------------------------------------

    async def call(self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> dict[str, Any]:
        session = self.handlers._session(ctx)
        agent = await self._agent(session.token)
        if not self.table.room(agent):
            raise MCPError(
                INVALID_REQUEST,
                f"you have {self.table.per_agent} tasks through this relay; fetch or cancel some first "
                "(nothing was decided or forwarded)",
                data={SOURCE: FROM_CLOISTER},
            )
        server, _ = split_tool_name(params.name)
        task = params.task.model_dump(mode="json", by_alias=True, exclude_none=True) if params.task else {}
        with self.handlers.agents.flight(server, session, ctx):
            started = await self.handlers.calls.call_task(
                session.token, params.name, params.arguments, params.meta, task
            )
        if not isinstance(started, TaskStarted):
            return _shaped(server, started)  # a denial, or the upstream ran it without a task
        return await self._register(server, agent, started, session.key)

    async def _register(self, server: str, agent: str, started: TaskStarted, session: str = "") -> dict[str, Any]:
        verdict = started.verdict
        record = TaskRecord(
            relay_id=relay_task_id(),
            server=server,
            upstream_id="",
            agent=agent,
            decision=verdict.log_index,
            started=started.started,
            deadline=self.table.clock() + outcome_window_s(verdict.grant),
            paid=started.paid,
            session=session,
        )
        try:
            raw = started.created["task"]
            record.upstream_id = upstream_task_id(raw)
            record.task = bounded_task(raw, record.relay_id)
            if verdict.agent and verdict.agent != agent:  # the token was swapped meanwhile
                raise TaskError("the call was decided for another agent than the one that asked")
            self.table.add(record)
        except TaskError as exc:
            # The call's outcome says why no task reached the agent; the upstream's task is left to its TTL.
            error = f"upstream {server!r} made a task the relay refused: {exc}"
            log_meta = await self.handlers.calls.close_task(verdict.log_index, started.started, None, error)
            raise MCPError(UPSTREAM_FAILED, error, data={SOURCE: FROM_CLOISTER, **log_meta}) from exc
        log.info("task %s of %s on %s (decision %d)", record.relay_id, agent, server, verdict.log_index)
        return {"task": record.task, "_meta": {LOG_META_KEY: {"decision": verdict.log_index}}}

    # ---- tasks/* --------------------------------------------------------------------------------

    async def get(self, ctx: ServerRequestContext[Any, Any], params: types.GetTaskRequestParams) -> dict[str, Any]:
        record = await self._owned(ctx, params.task_id)
        return await self._refresh(record)

    async def _refresh(self, record: TaskRecord) -> dict[str, Any]:
        try:
            raw = await self._upstream(record).task_request("tasks/get", "tasks/get", {"taskId": record.upstream_id})
            record.task = bounded_task(raw, record.relay_id)
        except UpstreamError as exc:
            raise _upstream_failure(
                exc, f"upstream {record.server!r} did not say how task {record.relay_id} is"
            ) from exc
        except TaskError as exc:
            raise MCPError(UPSTREAM_FAILED, f"upstream {record.server!r} described the task badly: {exc}") from exc
        return dict(record.task)

    async def list(self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams) -> dict[str, Any]:
        """The caller's own tasks (at most MAX_TASKS_PER_AGENT, so one page); open ones refreshed."""
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            raise MCPError(INVALID_REQUEST, "tasks are a 2025-11-25 feature; this session speaks a later version")
        agent = await self._agent(self.handlers._session(ctx).token)
        tasks = []
        for record in self.table.of(agent):
            if not record.closed and record.task.get("status") not in TERMINAL:
                try:
                    await self._refresh(record)
                except MCPError as exc:
                    log.debug("task %s not refreshed for tasks/list: %s", record.relay_id, exc.message)
            tasks.append(dict(record.task))
        return {"tasks": tasks}

    async def result(
        self, ctx: ServerRequestContext[Any, Any], params: types.GetTaskPayloadRequestParams
    ) -> dict[str, Any]:
        """The task's payload: the call's outcome (its hash) is recorded before the agent gets it.
        Asked again, the same payload is delivered only if it hashes the same."""
        record = await self._owned(ctx, params.task_id)
        session = self.handlers._session(ctx)
        upstream = self._upstream(record)
        raw: dict[str, Any] | None = None
        failure: UpstreamError | None = None
        record.fetchers.append(session.key)
        try:
            # A flight: the upstream's elicitation or sampling request during the task reaches this
            # agent, on this request's stream (decided as it would be during a call).
            with self.handlers.agents.flight(record.server, session, ctx):
                raw = await upstream.task_request("task result", "tasks/result", {"taskId": record.upstream_id})
        except UpstreamError as exc:
            failure = exc
        finally:
            record.fetchers.remove(session.key)
        async with record.lock:
            log_meta = await self._close_on_result(record, raw, failure)
        assert raw is not None
        return _shaped(record.server, {**raw, "_meta": self._meta(record, raw.get("_meta"), log_meta)})

    async def _close_on_result(
        self, record: TaskRecord, raw: dict[str, Any] | None, failure: UpstreamError | None
    ) -> dict[str, int]:
        calls = self.handlers.calls
        if failure is not None:
            if failure.kind == "timeout" or record.closed:
                # Still running (tasks/result waits for the end), or already closed: nothing to log.
                raise _upstream_failure(failure, f"no result for task {record.relay_id} yet")
            log_meta = await calls.close_task(record.decision, record.started, None, str(failure)[:1000])
            self.table.close(record, log_meta, None)
            raise _upstream_failure(failure, f"task {record.relay_id} ended without a result (logged)")
        assert raw is not None
        if not record.closed:
            try:  # the payload of a tools/call task is a tool result (checked before it is logged)
                types.CallToolResult.model_validate(raw, by_name=False)
            except ValidationError as exc:
                error = f"upstream {record.server!r} sent a malformed task result ({exc.error_count()} errors)"
                log_meta = await calls.close_task(record.decision, record.started, None, error)
                self.table.close(record, log_meta, None)
                raise MCPError(UPSTREAM_FAILED, error, data={SOURCE: FROM_CLOISTER, **log_meta}) from exc
        digest = result_sha256(raw)
        if record.closed:
            if record.result_sha256 != digest:
                raise MCPError(
                    INVALID_REQUEST,
                    f"task {record.relay_id}'s outcome is already logged and this result is not it; "
                    "it is not delivered",
                    data={SOURCE: FROM_CLOISTER, **record.log_meta},
                )
            return record.log_meta
        log_meta = await calls.close_task(record.decision, record.started, raw, "", record.paid)
        self.table.close(record, log_meta, digest)
        return log_meta

    def _meta(self, record: TaskRecord, meta: Any, log_meta: dict[str, int]) -> dict[str, Any]:
        out = stamped_meta(meta, log_meta)
        if RELATED_TASK_KEY in out:
            out[RELATED_TASK_KEY] = {"taskId": record.relay_id}
        return out

    async def cancel(
        self, ctx: ServerRequestContext[Any, Any], params: types.CancelTaskRequestParams
    ) -> dict[str, Any]:
        """Cancel the caller's task upstream; its call's outcome says so. Not decided by the
        enclave: it can only stop what the policy allowed (decision 0029)."""
        record = await self._owned(ctx, params.task_id)
        upstream = self._upstream(record)
        support = upstream.task_support()
        if support is not None and support.cancel is None:
            raise MCPError(INVALID_REQUEST, f"upstream {record.server!r} does not cancel tasks (it did not declare it)")
        try:
            raw = await upstream.task_request("tasks/cancel", "tasks/cancel", {"taskId": record.upstream_id})
            task = bounded_task(raw, record.relay_id)
        except UpstreamError as exc:
            raise _upstream_failure(exc, f"upstream {record.server!r} did not cancel task {record.relay_id}") from exc
        except TaskError as exc:
            raise MCPError(UPSTREAM_FAILED, f"upstream {record.server!r} described the task badly: {exc}") from exc
        record.task = task
        async with record.lock:
            if not record.closed:
                log_meta = await self.handlers.calls.close_task(
                    record.decision, record.started, None, CANCELLED_BY_TASKS_CANCEL
                )
                self.table.close(record, log_meta, None)
        return {**task, "_meta": {LOG_META_KEY: record.log_meta}}

    # ---- an upstream's request during a task -----------------------------------------------------

    def relate(self, server: str, meta: Any, flight: Flight | None) -> Any:
        """The `_meta` of an upstream's request to an agent: its related-task id becomes the relay's
        when the task is that agent's and its tasks/result is in flight from that session; any
        other related-task id is dropped (an upstream must not show an agent another's task)."""
        if not isinstance(meta, dict) or RELATED_TASK_KEY not in meta:
            return meta
        out = {k: v for k, v in meta.items() if k != RELATED_TASK_KEY}
        related = meta[RELATED_TASK_KEY]
        tid = related.get("taskId") if isinstance(related, dict) else None
        record = self.table.by_upstream(server, tid) if isinstance(tid, str) else None
        if record is not None and flight is not None and flight.session.key in record.fetchers:
            out[RELATED_TASK_KEY] = {"taskId": record.relay_id}
        return out

    async def status(self, server: str, params: types.TaskStatusNotificationParams) -> None:
        """An upstream's notifications/tasks/status: to the agent session that made the task, its
        id the relay's and its texts bounded; dropped for a task the relay did not make, a session
        it no longer knows, or a malformed task. Not logged (a status, like progress)."""
        record = self.table.by_upstream(server, params.task_id)
        if record is None or not record.session:
            return
        agent_session = self.handlers.agents.sessions.get(record.session)
        if agent_session is None:
            return
        try:
            task = bounded_task(params.model_dump(mode="json", by_alias=True, exclude_none=True), record.relay_id)
        except TaskError as exc:
            log.debug("task %s: status from %s dropped: %s", record.relay_id, server, exc)
            return
        record.task = task
        note = types.TaskStatusNotification(params=types.TaskStatusNotificationParams.model_validate(task))
        try:
            await agent_session.ctx.session.send_notification(cast(Any, note))
        except Exception as exc:  # the agent is gone
            log.debug("task %s: status not delivered to session %s: %s", record.relay_id, record.session, exc)

    # ---- outcomes nobody fetched -----------------------------------------------------------------

    async def sweep(self) -> None:
        """Close tasks whose outcome window is ending (their payload unfetched), and at shutdown
        every open one, so each allowed call keeps exactly one outcome."""
        try:
            while True:
                await anyio.sleep(SWEEP_S)
                for record in self.table.due():
                    await self._close_unfetched(record, f"{NOT_FETCHED} (last status: {record.task.get('status')})")
                self.table.prune()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self.abandon()
            raise

    async def abandon(self) -> None:
        """At shutdown (`CallPath.shutdown`, before the enclave closes): every open task's call
        gets its outcome, "relay shutting down (task abandoned)"."""
        for record in self.table.open():
            await self._close_unfetched(record, SHUTTING_DOWN)

    async def _close_unfetched(self, record: TaskRecord, error: str) -> None:
        async with record.lock:
            if record.closed:
                return
            try:
                log_meta = await self.handlers.calls.close_task(record.decision, record.started, None, error)
            except Exception as exc:  # the enclave or storage gone (shutdown): an auditor will see it open
                log.error("task %s: its call's outcome (%s) could not be recorded: %s", record.relay_id, error, exc)
                return
            self.table.close(record, log_meta, None)
            log.info("task %s closed: %s", record.relay_id, error)


def _shaped(server: str, result: dict[str, Any]) -> dict[str, Any]:
    """A tool's result as agents get it: upstream resource links renamed to the relay's URIs."""
    from cloister.relay.mcp_handlers import relay_links_json  # the module imports this one

    content = result.get("content")
    if isinstance(content, list):
        result = {**result, "content": [relay_links_json(server, c) for c in content]}
    return result
