"""The relay's tasks for upstreams' task-augmented sampling and elicitation (decision 0031), in
process: a stand-in for McpHandlers.agent_request that decides, runs the send `around` the task as
`_to_agent` does, and records one outcome per allowed decision as `CallPath.governed` does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from cloister.relay.agent_tasks import (
    AGENT_TASK_PREFIX,
    CANCELLED_BY_UPSTREAM,
    MAX_OPEN_PER_UPSTREAM,
    MAX_TTL_MS,
    RELATED_TASK,
    WITHDRAWN,
    AgentTasks,
)
from cloister.relay.upstreams import UpstreamError

DENIED = -32003
WALL = 1_796_000_000.0


class Enclave:
    """Decides (deny when `deny`), forwards through `around`, records each allowed request's outcome."""

    def __init__(self, deny: bool = False) -> None:
        self.deny = deny
        self.decided = anyio.Event()  # the decision is made when set (set at once unless a test clears it)
        self.decided.set()
        self.decisions: list[dict[str, Any]] = []
        self.outcomes: list[str] = []  # "ok" or the error
        self.recorded = anyio.Event()  # set at the first outcome
        self.answer = anyio.Event()  # the agent answers when set
        self.sent: list[dict[str, Any]] = []

    async def agent_request(
        self,
        server: str,
        method: str,
        params: dict[str, Any],
        around: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
    ) -> Any:
        self.decisions.append(params)
        await self.decided.wait()
        if self.deny:
            return types.ErrorData(code=DENIED, message="denied by policy (forbid no-sampling)")

        async def send() -> types.CreateMessageResult:
            self.sent.append(params)
            await self.answer.wait()
            return types.CreateMessageResult(
                role="assistant", content=types.TextContent(type="text", text="hi"), model="m"
            )

        try:
            result = await around(send)
        except UpstreamError as exc:
            self.outcomes.append(str(exc))
            self.recorded.set()
            return types.ErrorData(code=-32603, message=str(exc))
        self.outcomes.append("ok")
        self.recorded.set()
        return result


def sampling(ttl: Any = 60_000) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": {"type": "text", "text": "q"}}],
        "maxTokens": 5,
        "task": {"ttl": ttl},
    }


async def with_tasks(enclave: Enclave, body: Callable[[AgentTasks], Awaitable[None]]) -> None:
    tasks = AgentTasks(enclave, wall=lambda: WALL)
    async with anyio.create_task_group() as tg:
        tg.start_soon(tasks.run)
        await anyio.lowlevel.checkpoint()
        with anyio.fail_after(10):
            await body(tasks)
        tg.cancel_scope.cancel()


async def create(tasks: AgentTasks, server: str = "a", ttl: Any = 60_000) -> str:
    answer = await tasks.request(server, "sampling/createMessage", sampling(ttl))
    assert answer is not None
    task_id = answer["task"]["taskId"]
    assert isinstance(task_id, str)
    return task_id


def go(enclave: Enclave, body: Callable[[AgentTasks], Awaitable[None]]) -> None:
    anyio.run(with_tasks, enclave, body)


def test_an_allowed_request_becomes_a_task_whose_answer_is_its_outcome() -> None:
    enclave = Enclave()

    async def body(tasks: AgentTasks) -> None:
        tid = await create(tasks)
        assert tid.startswith(AGENT_TASK_PREFIX) and len(tid) == len(AGENT_TASK_PREFIX) + 32
        got = await tasks.request("a", "tasks/get", {"taskId": tid})
        assert got is not None and got["status"] == "working" and got["createdAt"] == "2026-11-30T00:53:20Z"
        # The agent got the plain request; the decision hashed it without `task`.
        assert "task" not in enclave.decisions[0] and "task" not in enclave.sent[0]
        enclave.answer.set()
        result = await tasks.request("a", "tasks/result", {"taskId": tid})
        assert result is not None and result["content"]["text"] == "hi"
        assert result["_meta"][RELATED_TASK] == {"taskId": tid}
        got = await tasks.request("a", "tasks/get", {"taskId": tid})
        assert got is not None and got["status"] == "completed"
        listed = await tasks.request("a", "tasks/list", {})
        assert listed is not None and [t["taskId"] for t in listed["tasks"]] == [tid]

    go(enclave, body)
    assert enclave.outcomes == ["ok"]


def test_ids_are_unguessable_and_distinct() -> None:
    async def body(tasks: AgentTasks) -> None:
        ids = {await create(tasks) for _ in range(8)}
        assert len(ids) == 8

    go(Enclave(), body)


def test_another_upstream_gets_unknown_task_for_every_method() -> None:
    enclave = Enclave()

    async def body(tasks: AgentTasks) -> None:
        tid = await create(tasks, "a")
        for method in ("tasks/get", "tasks/result", "tasks/cancel"):
            with pytest.raises(MCPError) as err:
                await tasks.request("b", method, {"taskId": tid})
            assert err.value.error.code == -32602 and "unknown task" in err.value.error.message
        assert await tasks.request("b", "tasks/list", {}) == {"tasks": []}
        got = await tasks.request("a", "tasks/get", {"taskId": tid})
        assert got is not None and got["status"] == "working"  # b's cancel did nothing
        enclave.answer.set()

    go(enclave, body)


@pytest.mark.parametrize("task_id", [7, None, "x" * 100_000, AGENT_TASK_PREFIX + "guess"])
def test_malformed_or_guessed_ids_are_unknown_with_a_bounded_message(task_id: Any) -> None:
    async def body(tasks: AgentTasks) -> None:
        await create(tasks)
        with pytest.raises(MCPError) as err:
            await tasks.request("a", "tasks/get", {"taskId": task_id})
        assert "unknown task" in err.value.error.message and len(err.value.error.message) < 120

    go(Enclave(), body)


def test_a_denied_request_is_answered_with_the_denial_and_nothing_is_kept() -> None:
    enclave = Enclave(deny=True)

    async def body(tasks: AgentTasks) -> None:
        with pytest.raises(MCPError) as err:
            await create(tasks)
        assert err.value.error.code == DENIED
        assert await tasks.request("a", "tasks/list", {}) == {"tasks": []}

    go(enclave, body)
    assert enclave.sent == [] and enclave.outcomes == []


def test_cancel_by_the_upstream_is_the_outcome_and_happens_once() -> None:
    enclave = Enclave()

    async def body(tasks: AgentTasks) -> None:
        tid = await create(tasks)
        cancelled = await tasks.request("a", "tasks/cancel", {"taskId": tid})
        assert cancelled is not None and cancelled["status"] == "cancelled"
        with pytest.raises(MCPError) as err:
            await tasks.request("a", "tasks/result", {"taskId": tid})
        assert CANCELLED_BY_UPSTREAM in err.value.error.message
        with pytest.raises(MCPError, match="already ended"):
            await tasks.request("a", "tasks/cancel", {"taskId": tid})

    go(enclave, body)
    assert enclave.outcomes == [CANCELLED_BY_UPSTREAM]


def test_a_task_whose_agent_does_not_answer_fails_at_its_ttl() -> None:
    enclave = Enclave()

    async def body(tasks: AgentTasks) -> None:
        tid = await create(tasks, ttl=100)
        with pytest.raises(MCPError, match="ttl"):
            await tasks.request("a", "tasks/result", {"taskId": tid})
        got = await tasks.request("a", "tasks/get", {"taskId": tid})
        assert got is not None and got["status"] == "failed" and "ttl" in got["statusMessage"]

    go(enclave, body)
    assert len(enclave.outcomes) == 1 and "ttl (100 ms)" in enclave.outcomes[0]


@pytest.mark.parametrize("ttl", [10**12, -5, "soon", True])
def test_the_ttl_is_capped_and_defaulted(ttl: Any) -> None:
    async def body(tasks: AgentTasks) -> None:
        tid = await create(tasks, ttl=ttl)
        got = await tasks.request("a", "tasks/get", {"taskId": tid})
        assert got is not None and 0 < got["ttl"] <= MAX_TTL_MS

    go(Enclave(), body)


def test_a_flood_is_refused_before_anything_is_decided() -> None:
    enclave = Enclave()

    async def body(tasks: AgentTasks) -> None:
        for _ in range(MAX_OPEN_PER_UPSTREAM):
            await create(tasks, "a")
        with pytest.raises(MCPError, match="already has 16 tasks running"):
            await create(tasks, "a")
        assert len(enclave.decisions) == MAX_OPEN_PER_UPSTREAM
        await create(tasks, "b")  # another upstream is not starved by this one
        enclave.answer.set()
        listed = await tasks.request("a", "tasks/list", {})
        assert listed is not None
        for t in listed["tasks"]:
            await tasks.request("a", "tasks/result", {"taskId": t["taskId"]})
        await create(tasks, "a")  # room again once they ended

    go(enclave, body)


def test_other_requests_are_left_to_the_sdk() -> None:
    async def body(tasks: AgentTasks) -> None:
        plain = {k: v for k, v in sampling().items() if k != "task"}
        assert await tasks.request("a", "sampling/createMessage", plain) is None
        assert await tasks.request("a", "roots/list", None) is None
        assert await tasks.request("a", "ping", {}) is None

    go(Enclave(), body)


def test_a_request_withdrawn_while_it_is_decided_still_gets_its_one_outcome() -> None:
    enclave = Enclave()
    enclave.decided = anyio.Event()

    async def body(tasks: AgentTasks) -> None:
        with anyio.move_on_after(0.2):  # the upstream gives up before the decision
            await create(tasks)
        assert await tasks.request("a", "tasks/list", {}) == {"tasks": []}
        enclave.decided.set()
        await enclave.recorded.wait()

    go(enclave, body)
    assert enclave.outcomes == [WITHDRAWN] and enclave.sent == []
