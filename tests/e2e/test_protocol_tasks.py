"""MCP tasks through Cloister (issue 11, decision 0029), with real processes: the enclave, the
relay and `@modelcontextprotocol/server-everything` (stdio), whose `simulate-research-query`
requires task-augmented execution (`execution.taskSupport: "required"`) and, with
`ambiguous: true`, asks the client for a clarification (elicitation) through `tasks/result`.

The agents are the official Python SDK client; it has no task API, so task requests go through its
session's own JSON-RPC dispatcher (the same framing, headers and streams as its other requests).

A task-augmented call is decided like the tool call it is (allowed and denied), the agent gets a
relay task id, the payload is the call's logged outcome, cancel is logged as the outcome, the
elicitation goes through the elicitation policy to the owning agent, and another agent can neither
get, fetch, cancel nor list the task. The log replays."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from cloister.dev.mcp_http import mcp_http_client
from cloister.dev.state import copy_example_bundle
from cloister.relay.tasks import RELAY_TASK_PREFIX, SHUTTING_DOWN
from cloister.verify.entries import DecisionEntry, OutcomeEntry
from cloister.wire.contract import LOG_META_KEY
from tests.e2e.conftest import Stack
from tests.e2e.procs import stop, wait_for
from tests.e2e.protocol_stack import EVERYTHING, EVERYTHING_UPSTREAM, protocol_stack, replayed, stored_entries
from tests.e2e.test_protocol import TOOLS
from tests.e2e.test_relay import entry_at

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not EVERYTHING.exists(), reason="npm test peers not installed (scripts/test)")
RESEARCH = "everything___simulate-research-query"
POLICY = """
@id("tester-tools")
permit (principal in Cloister::Role::"tester", action in Cloister::Action::"CallTool",
        resource == Cloister::Server::"everything");

@id("tester-elicit")
permit (principal in Cloister::Role::"tester", action == Cloister::Action::"Elicit", resource);

@id("tester-hostile")
permit (principal in Cloister::Role::"tester", action in Cloister::Action::"CallTool",
        resource == Cloister::Server::"hostile");

@id("quiet-no-elicit")
forbid (principal in Cloister::Role::"quiet", action == Cloister::Action::"Elicit", resource);

@id("no-research")
forbid (principal in Cloister::Role::"noresearch",
        action == Cloister::Action::"everything___simulate-research-query", resource);
"""


def _bundle(dst: Path) -> Path:
    copy_example_bundle(dst)
    entities = (dst / "entities.toml").read_text()
    tools = [*TOOLS, "simulate-research-query"]
    (dst / "entities.toml").write_text(
        entities.replace("[roles]\n", "[roles]\ntester = {}\nquiet = {}\nnoresearch = {}\n")
        + '\n[agents.test-bot]\nroles = ["tester"]\nregion = "eu"\n'
        + '\n[agents.peer-bot]\nroles = ["tester"]\nregion = "eu"\n'
        + '\n[agents.quiet-bot]\nroles = ["tester", "quiet"]\nregion = "eu"\n'
        + '\n[agents.barred-bot]\nroles = ["tester", "noresearch"]\nregion = "eu"\n'
        + f'\n[servers.everything]\nregion = "eu"\ntools = {json.dumps(tools)}\n'
        + '\n[servers.hostile]\nregion = "eu"\ntools = ["job"]\n'
    )
    (dst / "policies" / "tasks.cedar").write_text(POLICY)
    return dst


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("tasks")
    upstreams = f"""{EVERYTHING_UPSTREAM}
[[upstreams]]
name = "hostile"
command = [{json.dumps(sys.executable)}, "{HERE / "tasks_hostile_server.py"}"]
env = {{ CALLS_FILE = "{tmp / "hostile.jsonl"}" }}
timeout_s = 20
"""
    with protocol_stack(tmp, _bundle(tmp / "bundle"), upstreams, ["everything", "hostile"], tmp / "hostile.jsonl") as s:
        yield s


class Agent:
    def __init__(self, answer: str = "historical") -> None:
        self.answer = answer
        self.elicited: list[Any] = []

    async def elicitation(self, context: Any, params: Any) -> types.ElicitResult | types.ErrorData:
        self.elicited.append(params)
        return types.ElicitResult(action="accept", content={"interpretation": self.answer})


def client(stack: Stack, token: str, agent: Agent | None = None) -> Client:
    http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    return Client(
        streamable_http_client(stack.mcp_url, http_client=http),
        cache=None,
        mode="legacy",  # 2025-11-25: tasks are a feature of this version
        elicitation_callback=(agent or Agent()).elicitation,
    )


async def raw(c: Client, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """A request through the SDK client's own session and dispatcher, its result as sent."""
    data: dict[str, Any] = {"method": method, "params": params}
    opts: dict[str, Any] = {"timeout": 30}
    c.session._stamp(data, opts)  # type: ignore[arg-type]
    return await c.session._dispatcher.send_raw_request(method, data["params"], opts)  # type: ignore[arg-type]


async def start_research(c: Client, topic: str, ambiguous: bool = False) -> dict[str, Any]:
    return await raw(
        c,
        "tools/call",
        {"name": RESEARCH, "arguments": {"topic": topic, "ambiguous": ambiguous}, "task": {"ttl": 120_000}},
    )


async def wait_status(c: Client, task_id: str, statuses: set[str], timeout: float = 20) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            task = await raw(c, "tasks/get", {"taskId": task_id})
            if task["status"] in statuses:
                return task
            await anyio.sleep(0.3)


def run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)


def test_the_relay_offers_tasks_and_passes_task_support_through(stack: Stack) -> None:
    async def go() -> None:
        async with client(stack, stack.token()) as c:
            caps = c.server_capabilities.tasks
            assert caps is not None and caps.list is not None and caps.cancel is not None
            assert caps.requests is not None and caps.requests.tools is not None
            tools = {t.name: t for t in (await c.list_tools()).tools}
            research = tools[RESEARCH]
            assert research.execution is not None and research.execution.task_support == "required"

    run(go)


def test_a_task_call_is_decided_forwarded_and_its_payload_is_the_logged_outcome(stack: Stack) -> None:
    async def go() -> None:
        async with client(stack, stack.token()) as c:
            created = await start_research(c, "tide pools")
            task = created["task"]
            tid = task["taskId"]
            assert tid.startswith(RELAY_TASK_PREFIX) and task["status"] in ("working", "input_required")
            decision_index = created["_meta"]["dev.cloister/log"]["decision"]
            decision = entry_at(stack, decision_index)
            assert isinstance(decision, DecisionEntry) and decision.decision == "allow"
            assert decision.tool == "simulate-research-query" and decision.agent == "test-bot"

            working = await raw(c, "tasks/get", {"taskId": tid})
            assert working["taskId"] == tid and working["status"] in ("working", "completed")
            done = await wait_status(c, tid, {"completed"})
            assert done["taskId"] == tid

            payload = await raw(c, "tasks/result", {"taskId": tid})
            text = payload["content"][0]["text"]
            assert "Research Report: tide pools" in text
            meta = payload["_meta"]
            assert meta["io.modelcontextprotocol/related-task"] == {"taskId": tid}  # the relay's id, not the upstream's
            log = meta["dev.cloister/log"]
            assert log["decision"] == decision_index
            outcome = entry_at(stack, log["outcome"])
            assert isinstance(outcome, OutcomeEntry) and outcome.decision_index == decision_index
            assert outcome.result_sha256 is not None and not outcome.error

            # Fetched again: the same payload, the same outcome (no second one).
            again = await raw(c, "tasks/result", {"taskId": tid})
            assert again["content"] == payload["content"] and again["_meta"]["dev.cloister/log"] == log

            listed = await raw(c, "tasks/list", {})
            assert next(t for t in listed["tasks"] if t["taskId"] == tid)["status"] == "completed"

    run(go)


def test_a_denied_task_call_reaches_no_upstream_and_is_logged(stack: Stack) -> None:
    async def go() -> None:
        async with client(stack, stack.token("barred-bot", ["tester", "noresearch"])) as c:
            denied = await start_research(c, "forbidden topic")
            assert "task" not in denied and denied["isError"] is True
            data = denied["_meta"]["dev.cloister/denial"]
            assert data["code"] == "policy" and data["policies"] == ["no-research"]
            entry = entry_at(stack, data["log_index"])
            assert isinstance(entry, DecisionEntry) and entry.decision == "deny"
            assert entry.tool == "simulate-research-query"
            assert (await raw(c, "tasks/list", {}))["tasks"] == []

    run(go)


def test_a_task_call_to_a_tool_without_task_support_still_has_one_outcome(stack: Stack) -> None:
    """`echo` does not support tasks: whatever server-everything answers to a task-augmented call
    (2026.8.31: the error -32602 "Invalid task creation result"), the call's decision has its
    outcome at once and no task is left."""

    async def go() -> None:
        async with client(stack, stack.token()) as c:
            before = {t["taskId"] for t in (await raw(c, "tasks/list", {}))["tasks"]}
            try:
                answer = await raw(
                    c, "tools/call", {"name": "everything___echo", "arguments": {"message": "hi"}, "task": {}}
                )
                log = answer["_meta"]["dev.cloister/log"]
                assert "task" not in answer and answer["content"]
            except MCPError as exc:
                log = exc.error.data if isinstance(exc.error.data, dict) else {}
            outcome = entry_at(stack, log["outcome"])
            assert isinstance(outcome, OutcomeEntry) and outcome.decision_index == log["decision"]
            assert {t["taskId"] for t in (await raw(c, "tasks/list", {}))["tasks"]} == before

    run(go)


def test_another_agent_cannot_get_fetch_cancel_or_list_a_task(stack: Stack) -> None:
    """Attack: agent B, with a valid token and the same roles, learns agent A's task id (or guesses
    ids) and tries every task request on it; each is 'unknown task', and A's task is untouched."""

    async def go() -> None:
        async with client(stack, stack.token()) as a, client(stack, stack.token("peer-bot")) as b:
            created = await start_research(a, "coral reefs")
            tid = created["task"]["taskId"]
            for method in ("tasks/get", "tasks/result", "tasks/cancel"):
                for guess in (tid, tid[:-1] + ("A" if tid[-1] != "A" else "B"), "1", "0", RELAY_TASK_PREFIX):
                    with pytest.raises(MCPError) as refused:
                        await raw(b, method, {"taskId": guess})
                    assert refused.value.error.code == -32602 and "unknown task" in refused.value.error.message
            assert (await raw(b, "tasks/list", {}))["tasks"] == []
            # A's task went on: not cancelled, its payload A's.
            await wait_status(a, tid, {"completed"})
            payload = await raw(a, "tasks/result", {"taskId": tid})
            assert "Research Report: coral reefs" in payload["content"][0]["text"]
            assert tid in {t["taskId"] for t in (await raw(a, "tasks/list", {}))["tasks"]}

    run(go)


def test_cancelling_a_task_is_its_calls_outcome(stack: Stack) -> None:
    async def go() -> None:
        async with client(stack, stack.token()) as c:
            created = await start_research(c, "slow topic")
            tid = created["task"]["taskId"]
            decision_index = created["_meta"]["dev.cloister/log"]["decision"]
            cancelled = await raw(c, "tasks/cancel", {"taskId": tid})
            assert cancelled["taskId"] == tid and cancelled["status"] == "cancelled"
            log = cancelled["_meta"]["dev.cloister/log"]
            outcome = entry_at(stack, log["outcome"])
            assert isinstance(outcome, OutcomeEntry) and outcome.decision_index == decision_index
            assert outcome.result_sha256 is None and "cancelled by the client" in outcome.error
            # No payload can follow an outcome that committed to none.
            with pytest.raises(MCPError):
                await raw(c, "tasks/result", {"taskId": tid})

    run(go)


def test_a_tasks_elicitation_goes_through_the_elicitation_policy_to_its_agent(stack: Stack) -> None:
    """input_required: the upstream's elicitation (relatedTask) rides the agent's tasks/result; it is
    decided as that agent's Elicit (allowed for test-bot, forbidden for quiet-bot) and logged."""

    async def go() -> None:
        asked = Agent("historical")
        async with client(stack, stack.token(), asked) as c:
            created = await start_research(c, "python", ambiguous=True)
            tid = created["task"]["taskId"]
            await wait_status(c, tid, {"input_required"})
            payload = await raw(c, "tasks/result", {"taskId": tid})
            assert len(asked.elicited) == 1
            meta = asked.elicited[0].meta or {}
            assert meta.get("io.modelcontextprotocol/related-task") == {"taskId": tid}
            assert "Clarification**: historical" in payload["content"][0]["text"]

        quiet = Agent("snake")
        async with client(stack, stack.token("quiet-bot", ["tester", "quiet"]), quiet) as c:
            created = await start_research(c, "python", ambiguous=True)
            tid = created["task"]["taskId"]
            await wait_status(c, tid, {"input_required"})
            started = time.monotonic()
            payload = await raw(c, "tasks/result", {"taskId": tid})
            assert quiet.elicited == []  # forbidden: never asked
            assert "elicitation unavailable" in payload["content"][0]["text"]
            assert time.monotonic() - started < 20
            outcome = entry_at(stack, payload["_meta"]["dev.cloister/log"]["outcome"])
            assert isinstance(outcome, OutcomeEntry) and outcome.result_sha256 is not None
            # The denied elicitation is in the log, just before the outcome.
            denial = next(
                e
                for i in range(outcome.decision_index + 1, payload["_meta"]["dev.cloister/log"]["outcome"])
                if isinstance(e := entry_at(stack, i), DecisionEntry) and e.tool == "elicitation/create:"
            )
            assert denial.decision == "deny" and denial.agent == "quiet-bot" and denial.policies == ("quiet-no-elicit",)

    run(go)


def test_a_hostile_upstreams_task_ids_and_status_messages_are_refused_or_capped(stack: Stack) -> None:
    """Attack: an upstream answers with a 100,000-character task id, a 2 MB status message, and the
    id of a live task again (to join two agents' tasks). Refused (the call's outcome says why) or
    capped; the relay serves on."""

    async def go() -> None:
        async with client(stack, stack.token()) as c:
            created = await job(c, "ok")
            task = created["task"]
            assert task["taskId"].startswith(RELAY_TASK_PREFIX) and len(task["statusMessage"]) == 1000
            polled = await raw(c, "tasks/get", {"taskId": task["taskId"]})
            assert polled["status"] == "completed" and len(polled["statusMessage"]) == 1000
            for mode, why in (("long-id", "100000 characters"), ("reuse", "reused")):
                with pytest.raises(MCPError) as refused:
                    await job(c, mode)
                assert "the relay refused" in refused.value.error.message and why in refused.value.error.message
                data = refused.value.error.data
                assert isinstance(data, dict)
                outcome = entry_at(stack, data["outcome"])
                assert isinstance(outcome, OutcomeEntry) and outcome.decision_index == data["decision"]
                assert outcome.result_sha256 is None and "refused" in outcome.error
            payload = await raw(c, "tasks/result", {"taskId": task["taskId"]})
            assert payload["content"][0]["text"].startswith("payload of t-")
            assert len({t["taskId"] for t in (await raw(c, "tasks/list", {}))["tasks"]}) >= 1

    run(go)


def test_an_upstream_cannot_show_one_agent_anothers_task(stack: Stack) -> None:
    """Attack: while agent B fetches its own task, the upstream sends an elicitation whose
    related-task names agent A's task. B is asked (the policy allows Elicit) but never sees A's task
    id, in the relay's form or the upstream's."""

    async def go() -> None:
        nosy_target = Agent("fine")
        async with client(stack, stack.token()) as a, client(stack, stack.token("peer-bot"), nosy_target) as b:
            mine = (await job(a, "ok"))["task"]["taskId"]
            theirs = (await job(b, "nosy"))["task"]["taskId"]
            payload = await raw(b, "tasks/result", {"taskId": theirs})
            assert len(nosy_target.elicited) == 1
            meta = nosy_target.elicited[0].meta or {}
            assert "io.modelcontextprotocol/related-task" not in meta
            assert mine not in json.dumps(payload) and mine not in repr(nosy_target.elicited[0])
            assert '"action": "accept"' in payload["content"][0]["text"]
            forwarded = [c for c in stack.forwarded() if c["method"] == "tasks/result"]
            assert forwarded and all(c["taskId"].startswith("t-") for c in forwarded)

    run(go)


def test_the_typescript_sdks_task_client_works_through_cloister(stack: Stack) -> None:
    """The TypeScript SDK's own task API (`callToolStream`: create, poll, answer the elicitation,
    fetch) through the relay, its task's status notifications, and its tasks/get of another agent's
    task id refused."""
    if shutil.which("node") is None:
        pytest.skip("needs node")

    async def foreign() -> str:
        async with client(stack, stack.token()) as c:
            return str((await start_research(c, "not yours"))["task"]["taskId"])

    theirs = run(foreign)
    script = HERE / "tasks_client.mjs"
    args = ["node", str(script), stack.mcp_url, stack.token("peer-bot"), "monty python", "1", theirs]
    done = subprocess.run(args, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["capabilities"] == {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
    assert seen["messages"][0] == "taskCreated" and seen["messages"][-1] == "result", seen
    ids = set(seen["taskIds"])
    assert len(ids) == 1 and next(iter(ids)).startswith(RELAY_TASK_PREFIX)
    mine = next(iter(ids))
    assert "Clarification**: comedy" in seen["text"]
    assert seen["elicited"] == [{"io.modelcontextprotocol/related-task": {"taskId": mine}}]
    assert mine in seen["listed"] and theirs not in seen["listed"]
    assert seen["foreign"]["code"] == -32602 and "unknown task" in seen["foreign"]["message"]
    # notifications/tasks/status: its own task's only, under the relay's id.
    statuses = seen["statuses"]
    assert statuses and {s["taskId"] for s in statuses} == {mine}, statuses
    assert "input_required" in {s["status"] for s in statuses}


async def job(c: Client, mode: str) -> dict[str, Any]:
    return await raw(c, "tools/call", {"name": "hostile___job", "arguments": {"mode": mode}, "task": {}})


def test_the_log_replays_verified_and_resumes(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOISTER_STATE", str(stack.state.root))
    summary = replayed(stack.relay_url, tmp_path / "a")
    assert summary["missing_outcomes"] == 0, summary
    # A restarted enclave resumes this log (its resume parses every entry) and takes task calls.
    stop(stack.enclave, signal.SIGKILL)
    stack.restart_enclave()
    wait_for(lambda: stack.health().get("ready") is True, 30, "the relay to re-initialise the enclave")

    async def task_after_restart() -> None:
        async with client(stack, stack.token()) as c:
            with anyio.fail_after(30):
                while True:
                    try:
                        tid = (await start_research(c, "after restart"))["task"]["taskId"]
                        break
                    except (MCPError, KeyError):
                        await anyio.sleep(0.5)
            await wait_status(c, tid, {"completed"})
            assert "after restart" in (await raw(c, "tasks/result", {"taskId": tid}))["content"][0]["text"]

    run(task_after_restart)


def test_a_relay_stopped_by_sigterm_closes_open_tasks_with_an_outcome(stack: Stack) -> None:
    # Runs last in this module: it stops the relay. Regression (found by the tasks work,
    # 2026-12-06): uvicorn re-raised SIGTERM under the default handler as its serve() returned, so
    # the process died before Relay.close(): open tasks kept their decisions open and storage was
    # never closed. `cloister.relay.relay.run` now defers the signal until the relay has closed.
    async def open_task() -> int:
        async with client(stack, stack.token()) as c:
            # ambiguous: the task waits for a clarification no one fetches (status input_required)
            created = await start_research(c, "left open", ambiguous=True)
            await wait_status(c, created["task"]["taskId"], {"input_required"})
            return int(created["_meta"][LOG_META_KEY]["decision"])

    decision = run(open_task)
    stack.relay.send_signal(signal.SIGTERM)
    code = stack.relay.wait(30)
    assert code == -signal.SIGTERM  # still ends as the signal asked, after closing
    relay_log = (stack.tmp / "relay.log").read_text()
    assert SHUTTING_DOWN in relay_log, relay_log[-2000:]

    outcomes = [
        e
        for e in stored_entries(stack.tmp / "state" / "log")
        if isinstance(e, OutcomeEntry) and e.decision_index == decision
    ]
    assert [o.error for o in outcomes] == [SHUTTING_DOWN]
