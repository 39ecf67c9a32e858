"""An upstream's sampling and elicitation requests on the relay's real path (decision 0018), in
process: the enclave decides them as the calling agent's, the decision is durable before the
agent is asked, the answer is the outcome, and an upstream that gives up cancels the request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import mcp_types as types

from cloister.relay.mcp_handlers import McpHandlers
from cloister.verify.entries import DecisionEntry, OutcomeEntry
from tests.relay.test_call_path import Rig, refund_bot, run

SAMPLING = """
@id("sampling") permit (principal in Cloister::Role::"refund-agent", action == Cloister::Action::"CreateMessage",
    resource == Cloister::Server::"refunds") when { context.input.maxTokens <= 100 };
"""


class AgentSession:
    """The agent's side of a tools/call in flight: what the relay sends it on the call's stream."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer  # None: never answers
        self.asked: list[Any] = []
        self.can_send_request = True
        self.protocol_version = "2025-11-25"

    def check_client_capability(self, capability: Any) -> bool:
        return True

    async def send_request(self, request: Any, result_type: Any, **kw: Any) -> Any:
        self.asked.append(request)
        if self.answer is None:
            await anyio.sleep_forever()
        return self.answer


class Ctx:
    def __init__(self, session: AgentSession) -> None:
        self.session = session
        self.request = type("R", (), {"headers": {"mcp-session-id": "s1"}})()
        self.request_id = 7


async def setup(rig: Rig, session: AgentSession) -> tuple[McpHandlers, Any]:
    signed = rig.world.sign_bundle(2, {"policies/sampling.cedar": SAMPLING})
    await rig.state.persist((await rig.enclave.load_policy(signed, rig.state.writer.persisted_size)).log)
    handlers = McpHandlers(rig.state, rig.upstreams, rig.calls)
    ctx = Ctx(session)
    return handlers, handlers.agents.seen(ctx, refund_bot(rig))  # type: ignore[arg-type]


def params(max_tokens: int) -> types.CreateMessageRequestParams:
    message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text="hi"))
    return types.CreateMessageRequestParams(messages=[message], max_tokens=max_tokens)


def test_sampling_is_decided_as_the_calling_agent_and_its_answer_logged(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        answer = types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="ok"), model="m"
        )
        session = AgentSession(answer)
        handlers, agent = await setup(rig, session)
        with handlers.agents.flight("refunds", agent, agent.ctx):
            got = await handlers.sampling("refunds", params(50))
            refused = await handlers.sampling("refunds", params(5000))
        assert got == answer and len(session.asked) == 1  # the second never reached the agent
        assert isinstance(refused, types.ErrorData) and "no policy permits" in refused.message
        size = rig.state.writer.persisted_size
        entries = [await rig.entry(i) for i in range(size - 3, size)]
        decision, outcome, denial = entries
        assert isinstance(decision, DecisionEntry) and decision.agent == "refund-bot" and decision.decision == "allow"
        assert isinstance(outcome, OutcomeEntry) and outcome.decision_index == size - 3 and outcome.result_sha256
        assert isinstance(denial, DecisionEntry) and denial.decision == "deny"
        # Without a call in flight, the request reaches no one, and nothing is decided.
        alone = await handlers.sampling("refunds", params(50))
        assert isinstance(alone, types.ErrorData) and "no agent call is in flight" in alone.message
        assert rig.state.writer.persisted_size == size

    run(tmp_path, scenario)


def test_an_upstream_that_cancels_its_request_cancels_it_at_the_agent_and_the_outcome_says_so(
    tmp_path: Path,
) -> None:
    async def scenario(rig: Rig) -> None:
        session = AgentSession()  # never answers
        handlers, agent = await setup(rig, session)
        before = rig.state.writer.persisted_size
        with handlers.agents.flight("refunds", agent, agent.ctx), anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(handlers.sampling, "refunds", params(50))
                with anyio.fail_after(5):
                    while not session.asked:  # noqa: ASYNC110 (the stand-in agent sets no event)
                        await anyio.sleep(0.01)
                scope.cancel()  # what the SDK does when the upstream sends notifications/cancelled
        size = rig.state.writer.persisted_size
        outcome = await rig.entry(size - 1)
        assert isinstance(outcome, OutcomeEntry) and outcome.error == "cancelled by the upstream"
        assert outcome.decision_index == before and outcome.result_sha256 is None

    run(tmp_path, scenario)
