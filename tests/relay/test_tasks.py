"""The relay's task map and task requests (cloister/relay/tasks.py, decision 0029), in process with
stand-ins for the enclave, the call path and the upstream: ids the relay controls, bounded per
agent and in all; a hostile upstream's task ids and status messages refused or capped; ownership;
and the one outcome per task-augmented call (fetched, failed, cancelled, never fetched)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from cloister.relay.agent_sessions import AgentSession, AgentSessions, Flight
from cloister.relay.call_path import TaskStarted, is_create_task_result
from cloister.relay.tasks import (
    CANCELLED_BY_TASKS_CANCEL,
    MAX_STATUS_MESSAGE,
    MAX_TASK_ID,
    NOT_FETCHED,
    RELATED_TASK_KEY,
    RELAY_TASK_PREFIX,
    TaskError,
    TaskRecord,
    TaskRelay,
    TaskTable,
    bounded_task,
    outcome_window_s,
    relay_task_id,
    upstream_task_id,
)
from cloister.relay.upstreams import UpstreamError
from cloister.verify.entries import OUTCOME_GRACE_MS
from cloister.verify.grant import GrantClaims, encode_grant
from cloister.verify.response_sig import result_sha256
from cloister.wire import enclave_pb2 as pb


def _task(tid: str = "up-1", status: str = "working", **extra: Any) -> dict[str, Any]:
    return {
        "taskId": tid,
        "status": status,
        "createdAt": "2026-12-06T13:00:00Z",
        "lastUpdatedAt": "2026-12-06T13:00:01Z",
        "ttl": 60_000,
        **extra,
    }


# ---- ids and bounds ---------------------------------------------------------------------------------


def test_relay_ids_are_random_and_never_the_upstreams() -> None:
    ids = {relay_task_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith(RELAY_TASK_PREFIX) and len(i) == len(RELAY_TASK_PREFIX) + 32 for i in ids)
    task = bounded_task(_task("up-1"), "cloister-task-x")
    assert task["taskId"] == "cloister-task-x"


@pytest.mark.parametrize(
    "hostile",
    ["", "x" * (MAX_TASK_ID + 1), "x" * 1_000_000, "a\x00b", "line\nbreak", 7, None, ["up-1"], {"id": 1}],
)
def test_a_hostile_upstream_task_id_is_refused(hostile: Any) -> None:
    with pytest.raises(TaskError):
        upstream_task_id({"taskId": hostile})
    with pytest.raises(TaskError):
        bounded_task({**_task(), "taskId": hostile}, "cloister-task-x")


def test_the_longest_accepted_upstream_id() -> None:
    assert upstream_task_id({"taskId": "t" * MAX_TASK_ID}) == "t" * MAX_TASK_ID


def test_a_huge_status_message_and_timestamps_are_capped_and_unknown_fields_dropped() -> None:
    raw = _task(statusMessage="s" * 5_000_000, createdAt="c" * 10_000, pollInterval=500, secret="leak")
    task = bounded_task(raw, "cloister-task-x")
    assert len(task["statusMessage"]) == MAX_STATUS_MESSAGE
    assert len(task["createdAt"]) == 64
    assert task["pollInterval"] == 500
    assert "secret" not in task
    assert set(task) == {"taskId", "status", "createdAt", "lastUpdatedAt", "ttl", "pollInterval", "statusMessage"}
    types.GetTaskResult.model_validate(task)  # an agent's SDK reads it


@pytest.mark.parametrize(
    "bad",
    [
        {"status": "done"},
        {"status": None},
        {"ttl": -1},
        {"ttl": True},
        {"ttl": 2**60},
        {"ttl": "60"},
        {"pollInterval": 1.5},
        {"statusMessage": {"nested": "x"}},
        {"createdAt": 5},
    ],
)
def test_a_malformed_task_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(TaskError):
        bounded_task({**_task(), **bad}, "cloister-task-x")
    with pytest.raises(TaskError):
        bounded_task("not an object", "cloister-task-x")


def test_what_counts_as_a_created_task() -> None:
    assert is_create_task_result({"task": _task()})
    assert not is_create_task_result({"content": [], "task": _task()})  # a tool's result that says "task"
    assert not is_create_task_result({"content": [{"type": "text", "text": "plain"}]})
    assert not is_create_task_result({"task": "x"})


def test_the_outcome_window_follows_the_grant() -> None:
    claims = GrantClaims(
        agent="a",
        server="s",
        tool="t",
        args_sha256=b"\x00" * 32,
        policy_sha256=b"\x00" * 32,
        log_index=1,
        entry_hash=b"\x00" * 32,
        origin="o",
        issued_ms=1_000,
        expires_ms=61_000,
        nonce=b"\x00" * 16,
    )
    grant = encode_grant(claims, lambda data: b"\x00" * 64, b"\x01" * 32)
    grace = OUTCOME_GRACE_MS / 1000
    assert outcome_window_s(grant) == 60 + grace - 60
    assert outcome_window_s(b"not a grant") == grace - 60  # no lifetime known: the grace alone


# ---- the table ---------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _record(agent: str, upstream_id: str, server: str = "up", deadline: float = 1e9) -> TaskRecord:
    return TaskRecord(relay_task_id(), server, upstream_id, agent, decision=1, started=0.0, deadline=deadline)


def test_tasks_are_answered_only_for_their_agent() -> None:
    table = TaskTable()
    mine = _record("alice", "u1")
    table.add(mine)
    assert table.owned("alice", mine.relay_id) is mine
    assert table.owned("bob", mine.relay_id) is None  # another agent's: unknown, as any other id
    assert table.owned("alice", mine.upstream_id) is None  # the upstream's id names nothing
    assert table.owned("alice", mine.relay_id[:-1]) is None
    assert table.of("bob") == []


def test_an_agent_may_hold_only_so_many_tasks_and_closed_ones_make_room() -> None:
    clock = Clock()
    table = TaskTable(clock, per_agent=3, total=5)
    records = [_record("alice", f"u{i}") for i in range(3)]
    for r in records:
        table.add(r)
    assert not table.room("alice")
    with pytest.raises(TaskError, match="open tasks"):
        table.add(_record("alice", "u9"))
    assert table.room("bob")  # the cap is per agent
    table.close(records[1], {"decision": 1, "outcome": 2}, None)
    clock.now += 1
    table.close(records[0], {"decision": 1, "outcome": 3}, None)
    table.add(_record("alice", "u10"))  # the oldest closed one (records[1]) is forgotten
    assert table.owned("alice", records[1].relay_id) is None
    assert table.owned("alice", records[0].relay_id) is records[0]
    # In all: bob and carol fill the rest; with nothing closed of theirs, nobody gets more.
    table.add(_record("bob", "b1"))
    table.add(_record("carol", "c1"))
    assert len(table) == 5
    table.add(_record("dave", "d1"))  # alice's remaining closed one makes room
    assert table.owned("alice", records[0].relay_id) is None
    with pytest.raises(TaskError):
        table.add(_record("erin", "e1"))


def test_an_upstream_reusing_a_live_task_id_cannot_join_two_agents_tasks() -> None:
    table = TaskTable()
    table.add(_record("alice", "same"))
    with pytest.raises(TaskError, match="reused"):
        table.add(_record("bob", "same"))
    table.add(_record("bob", "same", server="other"))  # another upstream's id space


def test_due_and_pruned() -> None:
    clock = Clock()
    table = TaskTable(clock)
    early, late = _record("a", "u1", deadline=110), _record("a", "u2", deadline=500)
    table.add(early)
    table.add(late)
    assert table.due() == []
    clock.now = 120
    assert table.due() == [early]
    table.close(early, {}, None)
    assert table.due() == []
    clock.now = 120 + 3_601
    table.prune()
    assert table.owned("a", early.relay_id) is None and table.owned("a", late.relay_id) is late


# ---- the relay's task requests, with stand-ins ----------------------------------------------------------


@dataclass
class FakeEnclave:
    agents: dict[str, str]

    async def filter_items(self, token: str, refs: list[pb.ToolRef]) -> pb.FilterToolsResponse:
        return pb.FilterToolsResponse(agent=self.agents.get(token, ""))


@dataclass
class FakeState:
    enclave: FakeEnclave


@dataclass
class FakeCalls:
    outcomes: list[tuple[int, dict[str, Any] | None, str]] = field(default_factory=list)
    fail: bool = False
    before_shutdown: list[Any] = field(default_factory=list)

    async def close_task(
        self, decision: int, started: float, result: dict[str, Any] | None, error: str, paid: str = ""
    ) -> dict[str, int]:
        if self.fail:
            raise MCPError(-32006, "the log is unavailable")
        self.outcomes.append((decision, result, error))
        return {"decision": decision, "outcome": 1000 + len(self.outcomes), "checkpoint_size": 2000}


@dataclass
class FakeUpstream:
    answers: dict[str, Any] = field(default_factory=dict)
    asked: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    support: types.ServerTasksCapability | None = None

    def task_support(self) -> types.ServerTasksCapability | None:
        return self.support

    async def task_request(self, what: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.asked.append((method, params))
        answer = self.answers[method]
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)


@dataclass
class FakeUpstreams:
    by_name: dict[str, FakeUpstream]


class Ctx:
    protocol_version = "2025-11-25"
    request = None
    request_id = 1

    def __init__(self, token: str) -> None:
        self.token = token
        self.session = object()


class FakeHandlers:
    def __init__(self, upstream: FakeUpstream) -> None:
        self.state = FakeState(FakeEnclave({"tok-a": "alice", "tok-b": "bob"}))
        self.calls = FakeCalls()
        self.upstreams = FakeUpstreams({"up": upstream})
        self.agents = AgentSessions()

    def _session(self, ctx: Ctx) -> AgentSession:
        return AgentSession(f"obj:{ctx.token}", ctx, ctx.token)  # type: ignore[arg-type]


def _relay(upstream: FakeUpstream, clock: Clock | None = None) -> tuple[TaskRelay, FakeHandlers]:
    handlers = FakeHandlers(upstream)
    return TaskRelay(handlers, clock or Clock()), handlers  # type: ignore[arg-type]


def _started(task: Any, index: int = 7, agent: str = "alice") -> TaskStarted:
    verdict = pb.AuthorizeResponse(decision=pb.ALLOW, log_index=index, agent=agent)
    return TaskStarted(verdict, {"task": task}, 0.0, "")


def _payload(text: str = "done", tid: str = "up-1") -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "_meta": {RELATED_TASK_KEY: {"taskId": tid}}}


async def _made(relay: TaskRelay, task: Any = None) -> str:
    created = await relay._register("up", "alice", _started(_task() if task is None else task))
    assert created["_meta"]["dev.cloister/log"] == {"decision": 7}
    tid = created["task"]["taskId"]
    assert isinstance(tid, str)
    return tid


@pytest.mark.parametrize(
    "hostile",
    [_task("x" * 100_000), _task(status="pwned"), {"taskId": "a"}, _task("\x1b[2J")],
)
def test_a_hostile_created_task_closes_the_call_with_an_error_and_reaches_no_agent(hostile: Any) -> None:
    async def go() -> None:
        relay, handlers = _relay(FakeUpstream())
        with pytest.raises(MCPError, match="made a task the relay refused") as refused:
            await relay._register("up", "alice", _started(hostile))
        assert refused.value.error.data["outcome"] == 1001
        assert handlers.calls.outcomes == [(7, None, handlers.calls.outcomes[0][2])]
        assert "refused" in handlers.calls.outcomes[0][2]
        assert len(relay.table) == 0

    anyio.run(go)


def test_a_task_decided_for_another_agent_is_refused() -> None:
    async def go() -> None:
        relay, handlers = _relay(FakeUpstream())
        with pytest.raises(MCPError, match="another agent"):
            await relay._register("up", "alice", _started(_task(), agent="bob"))
        assert len(handlers.calls.outcomes) == 1 and len(relay.table) == 0

    anyio.run(go)


def test_the_payload_is_the_one_outcome_and_is_delivered_again_only_unchanged() -> None:
    async def go() -> None:
        upstream = FakeUpstream({"tasks/result": _payload()})
        relay, handlers = _relay(upstream)
        tid = await _made(relay)
        got = await relay.result(Ctx("tok-a"), types.GetTaskPayloadRequestParams(task_id=tid))  # type: ignore[arg-type]
        assert upstream.asked == [("tasks/result", {"taskId": "up-1"})]
        assert got["_meta"][RELATED_TASK_KEY] == {"taskId": tid}
        assert got["_meta"]["dev.cloister/log"] == {"decision": 7, "outcome": 1001, "checkpoint_size": 2000}
        assert handlers.calls.outcomes == [(7, _payload(), "")]  # the upstream's own, hashed as sent
        assert relay.table.owned("alice", tid).result_sha256 == result_sha256(_payload())  # type: ignore[union-attr]
        again = await relay.result(Ctx("tok-a"), types.GetTaskPayloadRequestParams(task_id=tid))  # type: ignore[arg-type]
        assert again == got and len(handlers.calls.outcomes) == 1
        upstream.answers["tasks/result"] = _payload("changed")
        with pytest.raises(MCPError, match="not delivered"):
            await relay.result(Ctx("tok-a"), types.GetTaskPayloadRequestParams(task_id=tid))  # type: ignore[arg-type]
        assert len(handlers.calls.outcomes) == 1

    anyio.run(go)


def test_another_agent_gets_nothing_of_a_task() -> None:
    async def go() -> None:
        upstream = FakeUpstream({"tasks/result": _payload(), "tasks/get": _task(), "tasks/cancel": _task()})
        relay, handlers = _relay(upstream)
        tid = await _made(relay)
        bob = Ctx("tok-b")
        for call in (
            relay.get(bob, types.GetTaskRequestParams(task_id=tid)),  # type: ignore[arg-type]
            relay.result(bob, types.GetTaskPayloadRequestParams(task_id=tid)),  # type: ignore[arg-type]
            relay.cancel(bob, types.CancelTaskRequestParams(task_id=tid)),  # type: ignore[arg-type]
        ):
            with pytest.raises(MCPError, match="unknown task"):
                await call
        assert (await relay.list(bob, types.PaginatedRequestParams()))["tasks"] == []  # type: ignore[arg-type]
        with pytest.raises(MCPError, match="unauthenticated"):
            await relay.get(Ctx("forged"), types.GetTaskRequestParams(task_id=tid))  # type: ignore[arg-type]
        assert upstream.asked == [] and handlers.calls.outcomes == []

    anyio.run(go)


def test_a_task_result_that_fails_or_times_out() -> None:
    async def go() -> None:
        upstream = FakeUpstream({"tasks/result": UpstreamError("timeout", "did not answer within 20s")})
        relay, handlers = _relay(upstream)
        tid = await _made(relay)
        ask = types.GetTaskPayloadRequestParams(task_id=tid)
        with pytest.raises(MCPError, match="no result"):
            await relay.result(Ctx("tok-a"), ask)  # type: ignore[arg-type]
        assert handlers.calls.outcomes == []  # still running: nothing logged yet
        upstream.answers["tasks/result"] = UpstreamError("error", "Task failed: boom", code=-32603)
        with pytest.raises(MCPError) as failed:
            await relay.result(Ctx("tok-a"), ask)  # type: ignore[arg-type]
        assert failed.value.error.code == -32603
        assert handlers.calls.outcomes == [(7, None, "Task failed: boom")]
        with pytest.raises(MCPError):  # closed without a payload: none is delivered later
            upstream.answers["tasks/result"] = _payload()
            await relay.result(Ctx("tok-a"), ask)  # type: ignore[arg-type]
        assert len(handlers.calls.outcomes) == 1

    anyio.run(go)


def test_a_malformed_payload_is_logged_as_an_error_and_not_delivered() -> None:
    async def go() -> None:
        relay, handlers = _relay(FakeUpstream({"tasks/result": {"content": "not a list"}}))
        tid = await _made(relay)
        with pytest.raises(MCPError, match="malformed"):
            await relay.result(Ctx("tok-a"), types.GetTaskPayloadRequestParams(task_id=tid))  # type: ignore[arg-type]
        assert handlers.calls.outcomes[0][1] is None and "malformed" in handlers.calls.outcomes[0][2]

    anyio.run(go)


def test_cancel_is_the_outcome_once() -> None:
    async def go() -> None:
        upstream = FakeUpstream({"tasks/cancel": _task(status="cancelled", statusMessage="x" * 10_000)})
        relay, handlers = _relay(upstream)
        tid = await _made(relay)
        ask = types.CancelTaskRequestParams(task_id=tid)
        got = await relay.cancel(Ctx("tok-a"), ask)  # type: ignore[arg-type]
        assert got["taskId"] == tid and got["status"] == "cancelled" and len(got["statusMessage"]) == MAX_STATUS_MESSAGE
        assert got["_meta"]["dev.cloister/log"]["outcome"] == 1001
        await relay.cancel(Ctx("tok-a"), ask)  # type: ignore[arg-type]
        assert handlers.calls.outcomes == [(7, None, CANCELLED_BY_TASKS_CANCEL)]

    anyio.run(go)


def test_a_cancel_the_upstream_did_not_offer_is_refused_before_it_is_sent() -> None:
    async def go() -> None:
        upstream = FakeUpstream({"tasks/cancel": _task(status="cancelled")}, support=types.ServerTasksCapability())
        relay, handlers = _relay(upstream)
        tid = await _made(relay)
        with pytest.raises(MCPError, match="does not cancel"):
            await relay.cancel(Ctx("tok-a"), types.CancelTaskRequestParams(task_id=tid))  # type: ignore[arg-type]
        assert upstream.asked == [] and handlers.calls.outcomes == []

    anyio.run(go)


def test_an_unfetched_task_is_closed_before_its_window_ends_and_at_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cloister.relay.tasks.SWEEP_S", 0.01)

    async def go() -> None:
        clock = Clock()
        relay, handlers = _relay(FakeUpstream(), clock)
        tid = await _made(relay)
        record = relay.table.owned("alice", tid)
        assert record is not None and record.deadline == clock.now + outcome_window_s(b"")
        clock.now += 100  # a later task: not due when the first is
        other = await relay._register("up", "alice", _started(_task("up-2"), index=8))
        clock.now = record.deadline + 1
        handlers.calls.fail = True  # the log unavailable: it stays open, to be tried again
        for r in relay.table.due():
            await relay._close_unfetched(r, NOT_FETCHED)
        assert not record.closed
        handlers.calls.fail = False
        with anyio.move_on_after(0.2):
            await relay.sweep()
        # Both closed exactly once: the due one as unfetched, the other at the sweep's cancellation.
        errors = {d: e for d, _, e in handlers.calls.outcomes}
        assert len(handlers.calls.outcomes) == 2
        assert errors[7].startswith(NOT_FETCHED) and "shutting down" in errors[8]
        assert other["task"]["taskId"] != tid

    anyio.run(go)


def test_an_upstreams_related_task_reaches_only_the_fetching_owner() -> None:
    relay, _ = _relay(FakeUpstream())
    record = _record("alice", "up-1", server="up")
    relay.table.add(record)
    alice = AgentSession("mcp:alice", None, "tok-a")  # type: ignore[arg-type]
    bob = AgentSession("mcp:bob", None, "tok-b")  # type: ignore[arg-type]
    meta = {RELATED_TASK_KEY: {"taskId": "up-1"}, "other": 1}
    # Nobody fetching: the key is dropped (the upstream must not show a task id to whoever is in flight).
    assert relay.relate("up", meta, Flight(bob, None, "tok-b")) == {"other": 1}  # type: ignore[arg-type]
    record.fetchers.append(alice.key)
    assert relay.relate("up", meta, Flight(bob, None, "tok-b")) == {"other": 1}  # type: ignore[arg-type]
    assert relay.relate("up", meta, Flight(alice, None, "tok-a")) == {  # type: ignore[arg-type]
        RELATED_TASK_KEY: {"taskId": record.relay_id},
        "other": 1,
    }
    assert relay.relate("other", meta, Flight(alice, None, "tok-a")) == {"other": 1}  # type: ignore[arg-type]
    assert relay.relate("up", None, None) is None


class Notified:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send_notification(self, note: Any, related_request_id: Any = None) -> None:
        self.sent.append(note)


class SessionCtx:
    def __init__(self) -> None:
        self.session = Notified()


def test_status_notifications_reach_only_the_session_that_made_the_task_bounded() -> None:
    async def go() -> None:
        relay, handlers = _relay(FakeUpstream())
        alice_ctx, bob_ctx = SessionCtx(), SessionCtx()
        handlers.agents.sessions["mcp:alice"] = AgentSession("mcp:alice", alice_ctx, "tok-a")  # type: ignore[arg-type]
        handlers.agents.sessions["mcp:bob"] = AgentSession("mcp:bob", bob_ctx, "tok-b")  # type: ignore[arg-type]
        created = await relay._register("up", "alice", _started(_task("up-1")), "mcp:alice")
        tid = created["task"]["taskId"]
        huge = types.TaskStatusNotificationParams.model_validate(
            _task("up-1", "input_required", statusMessage="m" * 100_000)
        )
        await relay.status("up", huge)
        await relay.status("other", huge)  # another upstream's task of the same id: not ours
        await relay.status("up", types.TaskStatusNotificationParams.model_validate(_task("up-unknown")))
        assert bob_ctx.session.sent == []
        [note] = alice_ctx.session.sent
        assert isinstance(note, types.TaskStatusNotification)
        assert note.params.task_id == tid and note.params.status == "input_required"
        assert note.params.status_message is not None and len(note.params.status_message) == MAX_STATUS_MESSAGE
        handlers.agents.sessions.pop("mcp:alice")  # the session is gone: nothing is sent, nothing fails
        await relay.status("up", huge)
        assert len(alice_ctx.session.sent) == 1

    anyio.run(go)


def test_shutdown_closes_every_open_task_through_the_call_paths_hook() -> None:
    async def go() -> None:
        relay, handlers = _relay(FakeUpstream())
        assert handlers.calls.before_shutdown == [relay.abandon]
        await _made(relay)
        await relay._register("up", "alice", _started(_task("up-2"), index=8))
        for hook in handlers.calls.before_shutdown:
            await hook()
        assert sorted(d for d, _, _ in handlers.calls.outcomes) == [7, 8]
        assert all("shutting down" in e for _, _, e in handlers.calls.outcomes)
        await relay.abandon()  # again: nothing more
        assert len(handlers.calls.outcomes) == 2

    anyio.run(go)
