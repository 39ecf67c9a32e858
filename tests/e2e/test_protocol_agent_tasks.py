"""Task-augmented sampling and elicitation from an upstream to the agent (issue 11, decision 0031),
with real processes: the enclave, the relay, `@modelcontextprotocol/server-everything` (stdio),
whose `trigger-sampling-request-async` and `trigger-elicitation-request-async` send the relay a
task-augmented request and poll it with tasks/get and tasks/result, and a hostile raw upstream
(`agent_tasks_hostile_server.py`) that floods such requests and polls another upstream's task.

The agents are the official Python SDK 2.3 client (2025-11-25). It does not declare client
`tasks`, so the relay runs each task itself and sends the agent the plain request."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from cloister.dev.mcp_http import mcp_http_client
from cloister.dev.state import copy_example_bundle
from cloister.relay.agent_tasks import AGENT_TASK_PREFIX, MAX_OPEN_PER_UPSTREAM
from cloister.verify.entries import DecisionEntry, OutcomeEntry
from tests.e2e.conftest import Stack
from tests.e2e.protocol_stack import EVERYTHING, EVERYTHING_UPSTREAM, protocol_stack, replayed
from tests.e2e.test_protocol import TOOLS
from tests.e2e.test_relay import entry_at

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not EVERYTHING.exists(), reason="npm test peers not installed (scripts/test)")
SAMPLING = "everything___trigger-sampling-request-async"
ELICITATION = "everything___trigger-elicitation-request-async"
POLICY = """
@id("tester-tools")
permit (principal in Cloister::Role::"tester", action in Cloister::Action::"CallTool", resource);

@id("tester-sample")
permit (principal in Cloister::Role::"tester", action == Cloister::Action::"CreateMessage", resource);

@id("tester-elicit")
permit (principal in Cloister::Role::"tester", action == Cloister::Action::"Elicit", resource);

@id("quiet-no-sample")
forbid (principal in Cloister::Role::"quiet", action == Cloister::Action::"CreateMessage", resource);

@id("quiet-no-elicit")
forbid (principal in Cloister::Role::"quiet", action == Cloister::Action::"Elicit", resource);
"""


def _bundle(dst: Path) -> Path:
    copy_example_bundle(dst)
    entities = (dst / "entities.toml").read_text()
    tools = [*TOOLS, "trigger-sampling-request-async", "trigger-elicitation-request-async"]
    (dst / "entities.toml").write_text(
        entities.replace("[roles]\n", "[roles]\ntester = {}\nquiet = {}\n")
        + '\n[agents.test-bot]\nroles = ["tester"]\nregion = "eu"\n'
        + '\n[agents.quiet-bot]\nroles = ["tester", "quiet"]\nregion = "eu"\n'
        + f'\n[servers.everything]\nregion = "eu"\ntools = {json.dumps(sorted(set(tools)))}\n'
        + '\n[servers.hostile]\nregion = "eu"\ntools = ["flood", "peek"]\n'
    )
    (dst / "policies" / "agent_tasks.cedar").write_text(POLICY)
    return dst


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("agent-tasks")
    upstreams = f"""{EVERYTHING_UPSTREAM}
[[upstreams]]
name = "hostile"
command = [{json.dumps(sys.executable)}, "{HERE / "agent_tasks_hostile_server.py"}"]
env = {{ CAPS_FILE = "{tmp / "caps.json"}" }}
timeout_s = 30
"""
    with protocol_stack(tmp, _bundle(tmp / "bundle"), upstreams, ["everything", "hostile"], tmp / "caps.json") as s:
        yield s


class Agent:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.sampled: list[types.CreateMessageRequestParams] = []
        self.elicited: list[Any] = []

    async def sampling(self, context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.sampled.append(params)
        await anyio.sleep(self.delay)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="a sampled answer"), model="stand-in"
        )

    async def elicitation(self, context: Any, params: Any) -> types.ElicitResult:
        self.elicited.append(params)
        return types.ElicitResult(action="accept", content={"name": "Ada", "favoriteColor": "Blue"})


def client(stack: Stack, token: str, agent: Agent) -> Client:
    http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    return Client(
        streamable_http_client(stack.mcp_url, http_client=http),
        cache=None,
        mode="legacy",
        read_timeout_seconds=60,
        sampling_callback=agent.sampling,
        elicitation_callback=agent.elicitation,
    )


def text(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


def log_meta(result: types.CallToolResult) -> dict[str, int]:
    value = (result.meta or {})["dev.cloister/log"]
    assert isinstance(value, dict)
    return value


def between(stack: Stack, result: types.CallToolResult) -> dict[int, Any]:
    """The entries logged between the tool call's decision and its outcome, by index."""
    call = log_meta(result)
    return {i: entry_at(stack, i) for i in range(call["decision"] + 1, call["outcome"])}


def decided(entries: dict[int, Any]) -> dict[int, DecisionEntry]:
    return {i: e for i, e in entries.items() if isinstance(e, DecisionEntry)}


def outcomes_of(entries: dict[int, Any], index: int) -> list[OutcomeEntry]:
    return [e for e in entries.values() if isinstance(e, OutcomeEntry) and e.decision_index == index]


def run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)


TASK_IDS: list[str] = []  # server-everything reports the relay's task id; the attack test reuses it


def test_the_relay_declares_client_tasks_and_the_async_tools_are_offered(stack: Stack) -> None:
    caps = json.loads(stack.calls_file.read_text())
    assert caps["tasks"]["requests"]["sampling"]["createMessage"] == {}
    assert caps["tasks"]["requests"]["elicitation"]["create"] == {}
    assert "list" in caps["tasks"] and "cancel" in caps["tasks"]

    async def go() -> set[str]:
        async with client(stack, stack.token(), Agent()) as c:
            return {t.name for t in (await c.list_tools()).tools}

    names = run(go)
    assert {SAMPLING, ELICITATION} <= names


def test_a_task_augmented_sampling_is_decided_run_by_the_relay_and_its_answer_logged(stack: Stack) -> None:
    agent = Agent()

    async def go() -> types.CallToolResult:
        async with client(stack, stack.token(), agent) as c:
            return await c.call_tool(SAMPLING, {"prompt": "hello", "maxTokens": 20})

    result = run(go)
    assert not result.is_error, result
    out = text(result)
    assert "[COMPLETED]" in out and "a sampled answer" in out, out
    found = re.search(r"Task created: (\S+)", out)
    assert found is not None and found.group(1).startswith(AGENT_TASK_PREFIX), out
    TASK_IDS.append(found.group(1))
    # The agent got the plain request (no `task`: its client declares no tasks), once.
    assert len(agent.sampled) == 1 and "task" not in agent.sampled[0].model_dump(exclude_none=True)
    entries = between(stack, result)
    decisions = decided(entries)
    assert [(e.tool, e.decision, e.agent) for e in decisions.values()] == [
        ("sampling/createMessage:", "allow", "test-bot")
    ]
    outcomes = outcomes_of(entries, next(iter(decisions)))
    assert len(outcomes) == 1 and outcomes[0].result_sha256 is not None and not outcomes[0].error


def test_a_task_augmented_elicitation_is_decided_and_answered(stack: Stack) -> None:
    agent = Agent()

    async def go() -> types.CallToolResult:
        async with client(stack, stack.token(), agent) as c:
            return await c.call_tool(ELICITATION, {})

    result = run(go)
    assert not result.is_error, result
    assert "[COMPLETED]" in text(result) and "Ada" in text(result), text(result)
    assert len(agent.elicited) == 1
    entries = between(stack, result)
    decisions = decided(entries)
    assert [(e.tool, e.decision) for e in decisions.values()] == [("elicitation/create:", "allow")]
    assert len(outcomes_of(entries, next(iter(decisions)))) == 1


@pytest.mark.parametrize("tool", [SAMPLING, ELICITATION])
def test_a_denied_task_augmented_request_never_reaches_the_agent_and_is_logged(stack: Stack, tool: str) -> None:
    agent = Agent()

    async def go() -> types.CallToolResult:
        async with client(stack, stack.token("quiet-bot", ["tester", "quiet"]), agent) as c:
            return await c.call_tool(tool, {"prompt": "x"} if tool == SAMPLING else {})

    result = run(go)
    assert agent.sampled == [] and agent.elicited == []
    assert result.is_error or "[COMPLETED]" not in text(result), result
    decisions = decided(between(stack, result))
    assert [(e.decision, e.agent) for e in decisions.values()] == [("deny", "quiet-bot")], decisions


def test_another_upstream_cannot_reach_a_task_by_its_id(stack: Stack) -> None:
    assert TASK_IDS, "runs after the sampling test"

    async def go() -> types.CallToolResult:
        async with client(stack, stack.token(), Agent()) as c:
            return await c.call_tool("hostile___peek", {"taskId": TASK_IDS[0]})

    answers = json.loads(text(run(go)))
    for method in ("tasks/get", "tasks/result", "tasks/cancel"):
        assert answers[method]["error"]["code"] == -32602, answers
        assert "unknown task" in answers[method]["error"]["message"], answers
    assert answers["tasks/list"]["result"] == {"tasks": []}, answers


def test_a_flood_of_task_augmented_requests_is_capped_before_anything_is_decided(stack: Stack) -> None:
    agent = Agent(delay=5.0)  # the tasks stay open while the flood arrives

    async def go() -> types.CallToolResult:
        async with client(stack, stack.token(), agent) as c:
            return await c.call_tool("hostile___flood", {"n": 3 * MAX_OPEN_PER_UPSTREAM})

    result = run(go)
    summary = json.loads(text(result))
    assert summary["accepted"] == MAX_OPEN_PER_UPSTREAM, summary
    assert summary["refused"] == [
        f"task-augmented sampling/createMessage refused: this upstream already has {MAX_OPEN_PER_UPSTREAM} tasks running"
    ], summary
    assert len(summary["results"]) == MAX_OPEN_PER_UPSTREAM
    assert all("a sampled answer" in r for r in summary["results"]), summary
    assert len(agent.sampled) == MAX_OPEN_PER_UPSTREAM
    # Only the accepted ones were decided (and each has its outcome).
    entries = between(stack, result)
    decisions = decided(entries)
    assert len(decisions) == MAX_OPEN_PER_UPSTREAM
    assert all(len(outcomes_of(entries, i)) == 1 for i in decisions)


def test_the_log_replays_with_no_missing_outcome(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOISTER_STATE", str(stack.state.root))
    summary = replayed(stack.relay_url, tmp_path / "a")
    assert summary["missing_outcomes"] == 0, summary


def test_a_2026_07_28_agent_serves_a_task_augmented_sampling_as_an_input_round(stack: Stack) -> None:
    """The relay's task sends the plain request the way `_to_agent` sends any: to a 2026-07-28
    agent as an input round of its call (decision 0030)."""
    agent = Agent()

    async def go() -> types.CallToolResult:
        http = mcp_http_client(headers={"Authorization": f"Bearer {stack.token()}"})
        async with Client(
            streamable_http_client(stack.mcp_url, http_client=http),
            cache=None,
            read_timeout_seconds=60,
            sampling_callback=agent.sampling,
        ) as c:
            assert c.protocol_version == "2026-07-28"
            return await c.call_tool(SAMPLING, {"prompt": "modern", "maxTokens": 5})

    result = run(go)
    assert not result.is_error, result
    assert "[COMPLETED]" in text(result) and "a sampled answer" in text(result), text(result)
    assert len(agent.sampled) == 1
