"""Upstream sampling and elicitation reach a 2026-07-28 agent as input rounds of its tools/call
(decision 0030), with real processes: the enclave, the relay, `@modelcontextprotocol/server-everything`
(a handshake-era upstream that sends sampling and elicitation requests of its own) and a Python
SDK upstream on 2026-07-28 (`rounds_modern_server.py`, which asks in input rounds of its own),
driven by the official Python SDK client at 2026-07-28.

Each request is decided as the agent's (`CreateMessage`, `Elicit`), logged with its answer's hash
as the outcome, and the call is decided and logged once however many rounds it takes. A denied
request never reaches the agent. Attacks: forged, altered, replayed and re-targeted requestStates,
inputResponses without one, and a flood of abandoned rounds; `cloister audit replay` reads it all."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from cloister.dev.mcp_http import mcp_http_client
from cloister.dev.state import copy_example_bundle
from cloister.verify.entries import DecisionEntry, OutcomeEntry
from cloister.verify.response_sig import result_sha256
from tests.e2e.conftest import ADMIN_TOKEN, Stack
from tests.e2e.protocol_stack import EVERYTHING, EVERYTHING_UPSTREAM, protocol_stack, replayed
from tests.e2e.test_protocol import TOOLS, log_meta
from tests.e2e.test_relay import entry_at

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not EVERYTHING.exists(), reason="npm test peers not installed (scripts/test)")
MODERN = "2026-07-28"
POLICY = """
@id("tester-tools")
permit (principal in Cloister::Role::"tester", action in Cloister::Action::"CallTool", resource);

@id("tester-sampling")
permit (principal in Cloister::Role::"tester", action == Cloister::Action::"CreateMessage", resource);

@id("tester-elicitation")
permit (principal in Cloister::Role::"tester", action == Cloister::Action::"Elicit", resource);

@id("mute-no-sampling")
forbid (principal in Cloister::Role::"mute", action == Cloister::Action::"CreateMessage", resource);
"""


def _bundle(dst: Path) -> Path:
    copy_example_bundle(dst)
    entities = (dst / "entities.toml").read_text()
    (dst / "entities.toml").write_text(
        entities.replace("[roles]\n", "[roles]\ntester = {}\nmute = {}\n")
        + '\n[agents.test-bot]\nroles = ["tester"]\nregion = "eu"\n'
        + '\n[agents.peer-bot]\nroles = ["tester"]\nregion = "eu"\n'
        + '\n[agents.flood-bot]\nroles = ["tester"]\nregion = "eu"\n'
        + '\n[agents.mute-bot]\nroles = ["tester", "mute"]\nregion = "eu"\n'
        + f'\n[servers.everything]\nregion = "eu"\ntools = {json.dumps(TOOLS)}\n'
        + '\n[servers.modern]\nregion = "eu"\ntools = ["muse", "both"]\n'
    )
    (dst / "policies" / "rounds.cedar").write_text(POLICY)
    return dst


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("rounds")
    upstreams = f"""{EVERYTHING_UPSTREAM}
[[upstreams]]
name = "modern"
command = [{json.dumps(sys.executable)}, "{HERE / "rounds_modern_server.py"}"]
timeout_s = 20
"""
    with protocol_stack(tmp, _bundle(tmp / "bundle"), upstreams, ["everything", "modern"]) as s:
        yield s


class Agent:
    """A 2026-07-28 agent that offers sampling and elicitation, and records what it was asked."""

    def __init__(self) -> None:
        self.sampled: list[types.CreateMessageRequestParams] = []
        self.elicited: list[Any] = []
        self.answers: list[Any] = []

    async def sampling(self, context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.sampled.append(params)
        answer = types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="a sampled answer"), model="stand-in"
        )
        self.answers.append(answer)
        return answer

    async def elicitation(self, context: Any, params: Any) -> types.ElicitResult:
        self.elicited.append(params)
        if "colour" in str(params):
            answer = types.ElicitResult(action="accept", content={"colour": "teal"})
        else:
            answer = types.ElicitResult(action="decline")
        self.answers.append(answer)
        return answer


def client(stack: Stack, token: str, agent: Agent | None = None) -> Client:
    http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    a = agent or Agent()
    return Client(
        streamable_http_client(stack.mcp_url, http_client=http),
        cache=None,
        mode="auto",  # the SDK's default: 2026-07-28, one self-contained POST per request
        sampling_callback=a.sampling,
        elicitation_callback=a.elicitation,
    )


def between(stack: Stack, result: Any) -> list[Any]:
    """The entries logged between a call's decision and its outcome."""
    meta = log_meta(result)
    return [entry_at(stack, i) for i in range(meta["decision"] + 1, meta["outcome"])]


def text(result: types.CallToolResult) -> str:
    first = result.content[0]
    assert isinstance(first, types.TextContent), result
    return first.text


def test_a_2026_agent_is_sampled_in_an_input_round_and_the_call_is_decided_once(stack: Stack) -> None:
    """server-everything (handshake-era) sends the relay a sampling request during the call: it
    reaches the 2026-07-28 agent as an input round, decided and logged; the retry completes it."""

    async def go() -> None:
        agent = Agent()
        async with client(stack, stack.token(), agent) as c:
            assert c.protocol_version == MODERN
            result = await c.call_tool("everything___trigger-sampling-request", {"prompt": "hi", "maxTokens": 5})
        assert not result.is_error and "a sampled answer" in str(result.content), result
        assert len(agent.sampled) == 1 and agent.sampled[0].max_tokens == 5
        meta = log_meta(result)
        call = entry_at(stack, meta["decision"])
        assert isinstance(call, DecisionEntry) and call.tool == "trigger-sampling-request" and call.decision == "allow"
        inner = between(stack, result)
        decisions = [e for e in inner if isinstance(e, DecisionEntry)]
        # One decision for the call (not one per round), one for the sampling request, as the agent's.
        assert [(e.tool, e.decision, e.agent) for e in decisions] == [("sampling/createMessage:", "allow", "test-bot")]
        [answer] = [e for e in inner if isinstance(e, OutcomeEntry)]
        assert answer.result_sha256 == result_sha256(
            agent.answers[0].model_dump(mode="json", by_alias=True, exclude_none=True)
        )
        outcome = entry_at(stack, meta["outcome"])
        assert isinstance(outcome, OutcomeEntry) and outcome.decision_index == meta["decision"] and not outcome.error

    anyio.run(go)


def test_a_2026_agent_answers_an_elicitation_in_an_input_round(stack: Stack) -> None:
    async def go() -> None:
        agent = Agent()
        async with client(stack, stack.token(), agent) as c:
            result = await c.call_tool("everything___trigger-elicitation-request", {})
        assert len(agent.elicited) == 1 and not result.is_error, result
        assert "decline" in str(result.content).lower(), result
        decisions = [e for e in between(stack, result) if isinstance(e, DecisionEntry)]
        assert [(e.tool, e.decision) for e in decisions] == [("elicitation/create:", "allow")]

    anyio.run(go)


def test_a_2026_upstreams_own_input_rounds_reach_the_2026_agent(stack: Stack) -> None:
    """A 2026-07-28 upstream asks in input rounds of its own (sampling, then elicitation): the
    relay drives them (the SDK's driver) into the same decisions, and each reaches the agent as
    an input round of the agent's call."""

    async def go() -> None:
        agent = Agent()
        async with client(stack, stack.token(), agent) as c:
            result = await c.call_tool("modern___both", {"topic": "tides"})
        assert not result.is_error, result
        assert json.loads(text(result)) == {"topic": "tides", "sampled": "a sampled answer", "colour": "teal"}
        assert len(agent.sampled) == 1 and len(agent.elicited) == 1
        decisions = [e for e in between(stack, result) if isinstance(e, DecisionEntry)]
        assert sorted((e.tool, e.decision, e.agent) for e in decisions) == [
            ("elicitation/create:", "allow", "test-bot"),
            ("sampling/createMessage:", "allow", "test-bot"),
        ]

    anyio.run(go)


def fast_path(stack: Stack) -> dict[str, int]:
    r = httpx2.get(f"{stack.relay_url}/admin/fast-path", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    return {k: int(v) for k, v in r.json().items()}


def test_the_fast_path_and_the_sdk_path_give_the_same_rounds(stack: Stack) -> None:
    """The first request of a call is the fast path's (decision 0023) unless it asks for progress;
    a retry (inputResponses) is always the SDK's. Both paths run the same rounds."""

    async def go() -> None:
        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            return None

        agent = Agent()
        async with client(stack, stack.token(), agent) as c:
            before = fast_path(stack)
            fast = await c.call_tool("modern___muse", {"topic": "paths"})
            middle = fast_path(stack)
            sdk = await c.call_tool("modern___muse", {"topic": "paths"}, progress_callback=on_progress)
            after = fast_path(stack)
        assert middle["calls"] == before["calls"] + 1 and after["calls"] == middle["calls"]  # who took the first
        assert not fast.is_error and not sdk.is_error and text(fast) == text(sdk), (fast, sdk)
        assert len(agent.sampled) == 2
        for result in (fast, sdk):
            decisions = [e for e in between(stack, result) if isinstance(e, DecisionEntry)]
            assert [(e.tool, e.decision) for e in decisions] == [("sampling/createMessage:", "allow")]

    anyio.run(go)


def test_a_denied_sampling_request_never_reaches_the_agent(stack: Stack) -> None:
    async def go() -> None:
        agent = Agent()
        async with client(stack, stack.token("mute-bot", ["tester", "mute"]), agent) as c:
            legacy = await c.call_tool("everything___trigger-sampling-request", {"prompt": "x", "maxTokens": 5})
            with pytest.raises(MCPError) as modern:
                await c.call_tool("modern___muse", {"topic": "tides"})
        assert agent.sampled == [] and agent.answers == []
        # server-everything reports the failed sampling in its result; the denial's text is in it.
        assert "forbidden by policy mute-no-sampling" in str(legacy.content), legacy
        decisions = [e for e in between(stack, legacy) if isinstance(e, DecisionEntry)]
        assert [(e.tool, e.decision, e.agent) for e in decisions] == [("sampling/createMessage:", "deny", "mute-bot")]
        # The 2026-07-28 upstream's driver fails its call on a refused round: an upstream failure.
        assert "forbidden by policy mute-no-sampling" in modern.value.error.message

    anyio.run(go)


async def _first_round(c: Client, name: str, arguments: dict[str, Any]) -> types.InputRequiredResult:
    """A call's first answer, not driven: the round the relay issued."""
    got = await c.session.call_tool(name, arguments, allow_input_required=True)
    assert isinstance(got, types.InputRequiredResult), got
    return got


def _answer() -> dict[str, types.CreateMessageResult]:
    sampled = types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text="by hand"), model="m"
    )
    return {"x": sampled}


def test_a_retry_must_carry_the_rounds_own_state_agent_tool_and_arguments(stack: Stack) -> None:
    """Attacks on the requestState: forged, altered, replayed by another agent, re-used for other
    arguments, or absent beside inputResponses: each refused (-32602), none consumes the round,
    and the agent's own retry then completes the call."""

    async def go() -> None:
        name, args = "modern___muse", {"topic": "tides"}
        async with client(stack, stack.token()) as a, client(stack, stack.token("peer-bot")) as b:
            first = await _first_round(a, name, args)
            assert first.request_state and first.input_requests
            [(key, request)] = first.input_requests.items()
            assert request.method == "sampling/createMessage"
            responses: Any = {key: _answer()["x"]}
            state = first.request_state
            altered = state[:-2] + ("AA" if not state.endswith("AA") else "BB")
            attempts = [
                (a, name, args, "v1.forged-state", "names no input round"),
                (a, name, args, altered, "names no input round"),
                (b, name, args, state, "issued to another agent"),
                (a, name, {"topic": "other"}, state, "issued for another call"),
                (a, "modern___both", args, state, "issued for another call"),
            ]
            for who, n, arguments, s, why in attempts:
                with pytest.raises(MCPError) as refused:
                    await who.session.call_tool(
                        n, arguments, input_responses=responses, request_state=s, allow_input_required=True
                    )
                assert refused.value.error.code == -32602 and why in refused.value.error.message, (
                    why,
                    refused.value.error,
                )
            with pytest.raises(MCPError) as stray:
                await a.session.call_tool(name, args, input_responses=responses, allow_input_required=True)
            assert stray.value.error.code == -32602 and "without a requestState" in stray.value.error.message
            with pytest.raises(MCPError) as wrong_key:
                await a.session.call_tool(
                    name, args, input_responses={"nope": _answer()["x"]}, request_state=state, allow_input_required=True
                )
            assert "is missing or is not a valid answer" in wrong_key.value.error.message
            # The round is still the agent's: its own retry completes the call, once.
            done = await a.session.call_tool(
                name, args, input_responses=responses, request_state=state, allow_input_required=True
            )
            assert isinstance(done, types.CallToolResult) and not done.is_error, done
            assert json.loads(text(done))["sampled"] == "by hand"
            with pytest.raises(MCPError) as replayed:
                await a.session.call_tool(
                    name, args, input_responses=responses, request_state=state, allow_input_required=True
                )
            assert "names no input round" in replayed.value.error.message
        decisions = [e for e in between(stack, done) if isinstance(e, DecisionEntry)]
        assert [(e.tool, e.agent) for e in decisions] == [("sampling/createMessage:", "test-bot")]

    anyio.run(go)


def test_a_flood_of_abandoned_rounds_is_capped_per_agent(stack: Stack) -> None:
    """An agent that opens rounds and never answers them parks at most 16 calls; its next
    call's input request is refused before any decision, and another agent is unaffected."""

    async def go() -> None:
        async with client(stack, stack.token("flood-bot")) as c:
            for i in range(16):
                await _first_round(c, "modern___muse", {"topic": f"t{i}"})
            with pytest.raises(MCPError) as capped:
                await c.call_tool("modern___muse", {"topic": "one more"})
            assert "calls waiting on its input (the cap per agent)" in capped.value.error.message
        agent = Agent()
        async with client(stack, stack.token("peer-bot"), agent) as c:
            result = await c.call_tool("modern___muse", {"topic": "fine"})
        assert not result.is_error and len(agent.sampled) == 1

    anyio.run(go)


def test_round_entries_replay(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The auditor reads every entry the rounds left (calls, sampling and elicitation decisions,
    their outcomes, denials)."""

    async def go() -> None:
        async with client(stack, stack.token("mute-bot", ["tester", "mute"])) as c:
            await c.call_tool("everything___trigger-sampling-request", {"prompt": "x", "maxTokens": 5})
        async with client(stack, stack.token()) as c:
            await c.call_tool("modern___muse", {"topic": "tides"})

    anyio.run(go)
    monkeypatch.setenv("CLOISTER_STATE", str(stack.state.root))
    summary = replayed(stack.relay_url, tmp_path / "a")
    assert summary["denials_by_code"].get("policy", 0) >= 1, summary
