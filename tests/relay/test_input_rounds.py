"""Input rounds of 2026-07-28 agents (decision 0030) on the relay's real path, in process: the
enclave decides, storage persists, only the upstream is a stand-in that asks the agent for a
sample during its call. What e2e tests cannot reach in reasonable time: a round that expires
(its request's outcome says so, the call still gets exactly one outcome, the record is gone), the
relay-wide cap, an upstream asking after the call ended, an agent that goes away mid-call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import CLIENT_CAPABILITIES_META_KEY, PROTOCOL_VERSION_META_KEY

from cloister.relay.agent_sessions import AgentSession
from cloister.relay.config import UpstreamConfig
from cloister.relay.input_rounds import InputRounds, Waiter
from cloister.relay.mcp_handlers import McpHandlers
from cloister.verify.entries import DecisionEntry, OutcomeEntry
from cloister.wire.contract import LOG_META_KEY
from tests.relay.test_call_path import Rig, StandInUpstream, refund_bot, research_bot, run
from tests.relay.test_upstream_requests import SAMPLING, params

MODERN = "2026-07-28"
CALL = "refunds___customer_lookup"
SAMPLER = {CLIENT_CAPABILITIES_META_KEY: {"sampling": {}}, PROTOCOL_VERSION_META_KEY: MODERN}


class AskingUpstream(StandInUpstream):
    """Asks the agent for a sample during each call (as an upstream's sampling request does),
    then answers with what it got."""

    def __init__(self, rig: Rig) -> None:
        super().__init__("refunds", lambda: rig.state.writer)
        self.config = UpstreamConfig(name="refunds", url="http://upstream.invalid/mcp", timeout_s=5)
        self.got: list[Any] = []
        self.asks = 1
        self.stall = False  # True: never answer once the agent answered

    async def call(self, tool: str, arguments: dict[str, Any], meta: dict[str, Any], progress: Any = None) -> Any:
        await super().call(tool, arguments, meta)
        answers = []
        for _ in range(self.asks):
            got = await self.hooks.sampling(self.name, params(50)) if self.hooks else None
            self.got.append(got)
            answers.append(got.message if isinstance(got, types.ErrorData) else "sampled")
        if self.stall:
            await anyio.sleep_forever()
        return types.CallToolResult(content=[types.TextContent(text=json.dumps(answers))])


class Ctx:
    """The agent's request as the handlers see it (a 2026-07-28 one: no session)."""

    def __init__(self) -> None:
        self.session = self
        self.protocol_version = MODERN
        self.request_id = 1

    async def send_log_message(self, *args: Any, **kwargs: Any) -> None:
        return None


async def setup(rig: Rig, **caps: int | float) -> tuple[McpHandlers, AskingUpstream]:
    signed = rig.world.sign_bundle(2, {"policies/sampling.cedar": SAMPLING})
    await rig.state.persist((await rig.enclave.load_policy(signed, rig.state.writer.persisted_size)).log)
    upstream = AskingUpstream(rig)
    rig.upstreams.by_name["refunds"] = rig.stand_ins["refunds"] = upstream
    handlers = McpHandlers(rig.state, rig.upstreams, rig.calls)
    handlers.rounds = InputRounds(handlers.agents, **caps)  # type: ignore[arg-type]
    return handlers, upstream


async def first(handlers: McpHandlers, token: str, args: dict[str, Any]) -> dict[str, Any]:
    session = AgentSession("obj:1", Ctx(), token)  # type: ignore[arg-type]
    return await handlers.call_modern(session, CALL, args, dict(SAMPLER), None, None, Waiter(Ctx(), 1))


async def retry(handlers: McpHandlers, token: str, args: dict[str, Any], state: Any, responses: Any) -> dict[str, Any]:
    session = AgentSession("obj:2", Ctx(), token)  # type: ignore[arg-type]
    return await handlers.call_modern(session, CALL, args, dict(SAMPLER), responses, state, Waiter(Ctx(), 2))


def sampled() -> dict[str, Any]:
    return {"role": "assistant", "content": {"type": "text", "text": "ok"}, "model": "m"}


def test_a_round_answered_completes_the_call_with_one_decision_and_one_outcome(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        handlers, _ = await setup(rig)
        token, args = refund_bot(rig), {"customer_id": "c1"}
        before = rig.state.writer.persisted_size
        got = await first(handlers, token, args)
        assert got["resultType"] == "input_required"
        [(key, request)] = got["inputRequests"].items()
        assert request == {
            "method": "sampling/createMessage",
            "params": params(50).model_dump(mode="json", by_alias=True, exclude_none=True),
        }
        done = await retry(handlers, token, args, got["requestState"], {key: sampled()})
        assert done["resultType"] == "complete" and json.loads(done["content"][0]["text"]) == ["sampled"]
        entries = [await rig.entry(i) for i in range(before, rig.state.writer.persisted_size)]
        assert [type(e).__name__ for e in entries] == ["DecisionEntry", "DecisionEntry", "OutcomeEntry", "OutcomeEntry"]
        call, ask, answer, outcome = entries
        assert call.tool == "customer_lookup" and ask.tool == "sampling/createMessage:"
        assert answer.decision_index == before + 1 and outcome.decision_index == before
        assert done["_meta"][LOG_META_KEY]["decision"] == before
        assert handlers.rounds.calls == {} and handlers.rounds.by_state == {}

    run(tmp_path, scenario)


def test_an_abandoned_round_expires_and_every_decision_still_gets_one_outcome(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        handlers, upstream = await setup(rig, ttl_s=0.3)
        token, args = refund_bot(rig), {"customer_id": "c2"}
        before = rig.state.writer.persisted_size
        got = await first(handlers, token, args)
        assert got["resultType"] == "input_required"
        with anyio.fail_after(5):  # the agent never comes back: the round expires, the call ends
            while handlers.rounds.calls:  # noqa: ASYNC110 (the relay's record sets no event)
                await anyio.sleep(0.05)
        [refused] = upstream.got
        assert isinstance(refused, types.ErrorData) and "did not answer" in refused.message
        entries = [await rig.entry(i) for i in range(before, rig.state.writer.persisted_size)]
        outcomes = {e.decision_index: e for e in entries if isinstance(e, OutcomeEntry)}
        decisions = [i for i, e in enumerate(entries, before) if isinstance(e, DecisionEntry)]
        assert sorted(outcomes) == decisions  # exactly one outcome for each decision
        assert "did not answer the sampling/createMessage input round within 0.3s" in outcomes[before + 1].error
        assert handlers.rounds.stats["abandoned"] == 1
        with pytest.raises(MCPError) as late:
            await retry(handlers, token, args, got["requestState"], {"cloister-1": sampled()})
        assert "names no input round" in late.value.error.message

    run(tmp_path, scenario)


def test_the_relay_wide_cap_refuses_an_input_request_before_any_decision(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        handlers, _ = await setup(rig, total=1)
        parked = await first(handlers, refund_bot(rig), {"customer_id": "c3"})
        assert parked["resultType"] == "input_required"
        size = rig.state.writer.persisted_size
        other = await first(handlers, rig.world.token("refund-bot", ["refund-agent"], ttl=500), {"customer_id": "c4"})
        # The second call was decided and ran; its upstream's request was refused, nothing decided for it.
        assert other["resultType"] == "complete"
        assert "calls are waiting on their agents' input" in json.loads(other["content"][0]["text"])[0]
        entries = [await rig.entry(i) for i in range(size, rig.state.writer.persisted_size)]
        assert [e.tool for e in entries if isinstance(e, DecisionEntry)] == ["customer_lookup"]
        await retry(handlers, refund_bot(rig), {"customer_id": "c3"}, parked["requestState"], {"cloister-1": sampled()})

    run(tmp_path, scenario)


def test_an_upstream_asking_after_the_call_ended_reaches_no_one(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        handlers, _ = await setup(rig)
        token, args = refund_bot(rig), {"customer_id": "c5"}
        got = await first(handlers, token, args)
        await retry(handlers, token, args, got["requestState"], {"cloister-1": sampled()})
        size = rig.state.writer.persisted_size
        late = await handlers.sampling("refunds", params(50))
        assert isinstance(late, types.ErrorData) and "no agent call is in flight" in late.message
        assert rig.state.writer.persisted_size == size

    run(tmp_path, scenario)


def test_an_agent_that_goes_away_mid_call_cancels_it(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        handlers, upstream = await setup(rig)
        token, args = refund_bot(rig), {"customer_id": "c6"}
        got = await first(handlers, token, args)
        before = rig.state.writer.persisted_size
        upstream.stall = True  # the upstream stalls after the answer: the retry waits, then leaves
        with anyio.move_on_after(0.3):
            await retry(handlers, token, args, got["requestState"], {"cloister-1": sampled()})
        with anyio.fail_after(5):
            while handlers.rounds.calls:  # noqa: ASYNC110 (the relay's record sets no event)
                await anyio.sleep(0.05)
        entries = [await rig.entry(i) for i in range(before, rig.state.writer.persisted_size)]
        assert [e.error for e in entries if isinstance(e, OutcomeEntry)][-1] == "cancelled by the client"

    run(tmp_path, scenario)


def test_a_retry_by_another_agent_is_refused_and_consumes_nothing(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        handlers, _ = await setup(rig)
        token, args = refund_bot(rig), {"customer_id": "c7"}
        got = await first(handlers, token, args)
        with pytest.raises(MCPError) as stolen:
            await retry(handlers, research_bot(rig), args, got["requestState"], {"cloister-1": sampled()})
        assert "issued to another agent" in stolen.value.error.message
        with pytest.raises(MCPError) as malformed:
            await retry(handlers, token, args, got["requestState"], {"cloister-1": {"role": "nobody"}})
        assert "is not a valid answer to sampling/createMessage" in malformed.value.error.message
        done = await retry(handlers, token, args, got["requestState"], {"cloister-1": sampled()})
        assert done["resultType"] == "complete"

    run(tmp_path, scenario)


def test_two_retries_with_one_state_deliver_one_answer(tmp_path: Path) -> None:
    """A replayed retry racing the agent's own: the round is consumed once, the other is refused."""

    async def scenario(rig: Rig) -> None:
        handlers, upstream = await setup(rig)
        token, args = refund_bot(rig), {"customer_id": "c9"}
        got = await first(handlers, token, args)
        answers: list[Any] = []

        async def one() -> None:
            try:
                answers.append(await retry(handlers, token, args, got["requestState"], {"cloister-1": sampled()}))
            except MCPError as exc:
                answers.append(exc.error.message)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        done = [a for a in answers if isinstance(a, dict)]
        refused = [a for a in answers if isinstance(a, str)]
        assert len(done) == 1 and done[0]["resultType"] == "complete"
        assert len(refused) == 1 and "names no input round" in refused[0]
        assert len(upstream.got) == 1

    run(tmp_path, scenario)
