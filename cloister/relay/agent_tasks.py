"""Task-augmented sampling and elicitation from an upstream (MCP 2025-11-25 tasks, the upstream ->
agent direction; decision 0031).

The relay declares `tasks.requests.sampling.createMessage` and `tasks.requests.elicitation.create`
(with `list` and `cancel`) to every upstream on handshake-era sessions. An upstream's
task-augmented request (`params.task`) is decided by the enclave as the agent's, exactly as a
plain one (`McpHandlers._to_agent`: attribution, the agent's capability, `CreateMessage` /
`Elicit`, the decision entry); a refusal or denial answers the request itself, as for a plain
one, and nothing is kept. When allowed, the upstream gets a CreateTaskResult with a relay task id
at once, and the relay runs the task: its work is the plain request to the agent (so any agent
serves it), bounded by the task's ttl; the agent's answer (or the failure, the upstream's
`tasks/cancel`, the ttl's end) is the decision's one outcome (`CallPath.governed`).

The upstream's `tasks/get`, `tasks/result`, `tasks/list` and `tasks/cancel` are answered from
the tasks the relay holds for THAT upstream only: another upstream's id, or a guess, is "unknown
task", the same answer. Ids are 192 random bits. Bounds: `MAX_OPEN_PER_UPSTREAM` tasks running
per upstream (refused before anything is decided: a flood costs no log entries), `MAX_KEPT_PER_UPSTREAM`
kept (ended ones are forgotten first), ttl capped at `MAX_TTL_MS`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import anyio.abc
import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST
from pydantic import TypeAdapter, ValidationError

from cloister.relay.upstreams import UpstreamError, wire_value

AGENT_TASK_PREFIX = "cloister-upstream-task-"
MAX_OPEN_PER_UPSTREAM = 16  # tasks running at once for one upstream
MAX_KEPT_PER_UPSTREAM = 256  # running and ended tasks remembered for one upstream
MAX_TTL_MS = 600_000  # well inside the decision's outcome window (decision 0029)
DEFAULT_TTL_MS = 300_000
POLL_INTERVAL_MS = 500
MAX_ID = 256
RELATED_TASK = "io.modelcontextprotocol/related-task"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
CANCELLED_BY_UPSTREAM = "cancelled by the upstream (tasks/cancel)"
WITHDRAWN = "cancelled by the upstream (it withdrew the task-augmented request)"
_ELICIT: TypeAdapter[types.ElicitRequestParams] = TypeAdapter(types.ElicitRequestParams)
TASK_METHODS = frozenset({"tasks/get", "tasks/result", "tasks/list", "tasks/cancel"})
AUGMENTABLE = frozenset({"sampling/createMessage", "elicitation/create"})

# Runs the plain request `around` the send to the agent: (server, method, params, around) ->
# the agent's answer or the refusal/denial/failure (McpHandlers.agent_request).
Around = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


class Runner(Protocol):
    async def agent_request(
        self, server: str, method: str, params: dict[str, Any], around: Around
    ) -> Any | types.ErrorData: ...


@dataclass
class AgentTask:
    task_id: str
    server: str
    method: str
    ttl_ms: int
    created_at: str
    deadline: float  # event-loop time
    status: str = "working"
    status_message: str | None = None
    updated_at: str = ""
    result: dict[str, Any] | None = None
    error: types.ErrorData | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope | None = None
    cancel_requested: str = ""  # why, once cancelled
    ended: float | None = None  # event-loop time

    def wire(self) -> dict[str, Any]:
        task: dict[str, Any] = {
            "taskId": self.task_id,
            "status": self.status,
            "createdAt": self.created_at,
            "lastUpdatedAt": self.updated_at or self.created_at,
            "ttl": self.ttl_ms,
            "pollInterval": POLL_INTERVAL_MS,
        }
        if self.status_message:
            task["statusMessage"] = self.status_message
        return task


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _ttl(task: Any) -> int:
    ttl = task.get("ttl") if isinstance(task, dict) else None
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
        return DEFAULT_TTL_MS
    return min(ttl, MAX_TTL_MS)


class AgentTasks:
    """The relay's tasks for upstreams' task-augmented requests, per upstream."""

    def __init__(self, runner: Runner, wall: Callable[[], float] = time.time) -> None:
        self.runner = runner
        self.wall = wall  # createdAt / lastUpdatedAt only
        self.by_server: dict[str, dict[str, AgentTask]] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> None:
        """Hosts the tasks' runs for as long as the upstreams run."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None

    async def request(self, server: str, method: str, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """An upstream's request, if it is one of ours (a task-augmented sampling or elicitation,
        or tasks/*): its result, or MCPError. None: not ours (the SDK's handlers take it)."""
        params = params or {}
        if method in AUGMENTABLE and "task" in params:
            return await self.create(server, method, params)
        if method not in TASK_METHODS:
            return None
        if method == "tasks/list":
            tasks = self.by_server.get(server, {})
            return {"tasks": [t.wire() for t in tasks.values()]}
        task = self._find(server, params.get("taskId"))
        if method == "tasks/get":
            return task.wire()
        if method == "tasks/cancel":
            return self.cancel(task)
        await task.done.wait()  # tasks/result blocks until the task ends (bounded by its ttl)
        if task.error is not None:
            raise MCPError(code=task.error.code, message=task.error.message, data=task.error.data)
        assert task.result is not None
        meta = task.result.get("_meta")
        return {
            **task.result,
            "_meta": {**(meta if isinstance(meta, dict) else {}), RELATED_TASK: {"taskId": task.task_id}},
        }

    def _find(self, server: str, task_id: Any) -> AgentTask:
        task = self.by_server.get(server, {}).get(task_id) if isinstance(task_id, str) else None
        if task is None:
            shown = task_id[:64] if isinstance(task_id, str) else type(task_id).__name__
            raise MCPError(code=INVALID_PARAMS, message=f"unknown task {shown!r}")
        return task

    def cancel(self, task: AgentTask) -> dict[str, Any]:
        if task.status in TERMINAL:
            raise MCPError(code=INVALID_PARAMS, message=f"task {task.task_id!r} already ended ({task.status})")
        task.cancel_requested = CANCELLED_BY_UPSTREAM
        if task.scope is not None:
            task.scope.cancel()
        self._end(task, "cancelled", CANCELLED_BY_UPSTREAM)
        return task.wire()

    def _room(self, server: str) -> str:
        """Why a new task of `server` is refused, or "" (checked before anything is decided)."""
        if self._tg is None:
            return "the relay is not running tasks"
        tasks = self.by_server.setdefault(server, {})
        if sum(1 for t in tasks.values() if t.status not in TERMINAL) >= MAX_OPEN_PER_UPSTREAM:
            return f"this upstream already has {MAX_OPEN_PER_UPSTREAM} tasks running"
        if len(tasks) >= MAX_KEPT_PER_UPSTREAM:
            ended = sorted((t for t in tasks.values() if t.status in TERMINAL), key=lambda t: t.ended or 0.0)
            for t in ended[: len(tasks) - MAX_KEPT_PER_UPSTREAM + 1]:
                del tasks[t.task_id]
        return ""

    async def create(self, server: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        refusal = self._room(server)
        if refusal:
            raise MCPError(code=INVALID_REQUEST, message=f"task-augmented {method} refused: {refusal}")
        assert self._tg is not None
        ttl = _ttl(params.get("task"))
        now = anyio.current_time()
        task = AgentTask(
            task_id=AGENT_TASK_PREFIX + secrets.token_urlsafe(24),
            server=server,
            method=method,
            ttl_ms=ttl,
            created_at=_iso(self.wall()),
            deadline=now + ttl / 1000,
        )
        tasks = self.by_server[server]
        tasks[task.task_id] = task  # counted against the cap while it is decided
        allowed = anyio.Event()
        plain = {k: v for k, v in params.items() if k != "task"}
        # Started from this request's task: the run inherits its context (attribution, decision 0030).
        self._tg.start_soon(self._run, task, plain, allowed)
        try:
            async with anyio.create_task_group() as wait:

                async def on(event: anyio.Event) -> None:
                    await event.wait()
                    wait.cancel_scope.cancel()

                wait.start_soon(on, allowed)
                wait.start_soon(on, task.done)
        except anyio.get_cancelled_exc_class():
            # The upstream withdrew its request (or its session ended) before learning the id: the
            # run stops at its send, and an allowed decision still gets its outcome.
            tasks.pop(task.task_id, None)
            task.cancel_requested = WITHDRAWN
            if task.scope is not None:
                task.scope.cancel()
            raise
        if not allowed.is_set():  # refused or denied: answered as a plain request would be
            tasks.pop(task.task_id, None)
            error = task.error or types.ErrorData(code=INTERNAL_ERROR, message="the task did not start")
            raise MCPError(code=error.code, message=error.message, data=error.data)
        return {"task": task.wire()}

    async def _run(self, task: AgentTask, plain: dict[str, Any], allowed: anyio.Event) -> None:
        async def around(send: Callable[[], Awaitable[Any]]) -> Any:
            # Only reached when the enclave allowed the request and its decision is durable.
            allowed.set()
            if task.cancel_requested:
                raise UpstreamError("error", task.cancel_requested)
            with anyio.CancelScope(deadline=task.deadline) as scope:
                task.scope = scope
                return await send()
            if task.cancel_requested:
                raise UpstreamError("error", task.cancel_requested)
            raise UpstreamError("timeout", f"the task's ttl ({task.ttl_ms} ms) ended before the agent answered")

        try:
            answer = await self.runner.agent_request(task.server, task.method, plain, around)
        except Exception as exc:  # a relay fault: the task fails, the relay goes on
            answer = types.ErrorData(code=INTERNAL_ERROR, message=f"relay error: {exc!r}"[:500])
        finally:
            task.scope = None
        if isinstance(answer, types.ErrorData):
            task.error = answer
            if task.status not in TERMINAL:
                self._end(task, "failed", answer.message[:1000])
        else:
            task.result = wire_value(answer)
            if task.status not in TERMINAL:
                self._end(task, "completed", None)
        task.done.set()

    def _end(self, task: AgentTask, status: str, message: str | None) -> None:
        task.status, task.status_message = status, message
        task.updated_at = _iso(self.wall())
        task.ended = anyio.current_time()
        if status == "cancelled" and task.error is None:
            task.error = types.ErrorData(code=INVALID_REQUEST, message=CANCELLED_BY_UPSTREAM)
        if status == "cancelled" and task.scope is None:
            task.done.set()  # not running (yet, or any more)


def parse_params(method: str, params: dict[str, Any]) -> types.CreateMessageRequestParams | types.ElicitRequestParams:
    """The plain request's parameters as the SDK would parse them; MCPError when malformed."""
    try:
        if method == "sampling/createMessage":
            return types.CreateMessageRequestParams.model_validate(params)
        return _ELICIT.validate_python(params)
    except ValidationError as exc:
        raise MCPError(
            code=INVALID_PARAMS, message=f"malformed {method} parameters ({exc.error_count()} errors)"
        ) from exc
