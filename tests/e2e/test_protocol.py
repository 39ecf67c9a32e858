"""The whole MCP protocol through Cloister (issue 11 part 2, decision 0018), with real processes:
the enclave, the relay, and the reference upstream `@modelcontextprotocol/server-everything`
(stdio, from tests/node) that exercises every feature, driven by the official Python SDK client.

Each feature allowed, denied and logged: resources (static allowed, dynamic denied), resource
templates, prompts (one hidden and denied), completions (only for what the agent may see),
progress, log messages and logging/setLevel, sampling (allowed) and elicitation (forbidden), and
list_changed. An agent with no permits sees none of it."""

from __future__ import annotations

import contextlib
import json
import signal
import time
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
from cloister.relay.codes import DENIED
from cloister.verify.entries import DecisionEntry, OutcomeEntry
from tests.e2e.conftest import ADMIN_TOKEN, Stack
from tests.e2e.procs import (
    stop,
    wait_for,
)
from tests.e2e.protocol_stack import EVERYTHING, EVERYTHING_UPSTREAM, protocol_stack, replayed
from tests.e2e.test_relay import entry_at

pytestmark = pytest.mark.skipif(not EVERYTHING.exists(), reason="npm test peers not installed (scripts/test)")

TOOLS = [
    "echo",
    "get-sum",
    "trigger-long-running-operation",
    "trigger-sampling-request",
    "trigger-elicitation-request",
    "toggle-simulated-logging",
    "toggle-subscriber-updates",
    "get-resource-links",
]
POLICY = """
@id("tester-tools")
permit (principal in Cloister::Role::"tester", action in Cloister::Action::"CallTool",
        resource == Cloister::Server::"everything");

@id("tester-static-docs")
permit (principal in Cloister::Role::"tester", action == Cloister::Action::"ReadResource",
        resource == Cloister::Server::"everything")
when { context.input.uri like "demo://resource/static/*" };

@id("tester-prompts")
permit (principal in Cloister::Role::"tester", action == Cloister::Action::"GetPrompt",
        resource == Cloister::Server::"everything");

@id("no-args-prompt")
forbid (principal, action == Cloister::Action::"GetPrompt", resource)
when { context.input.name == "args-prompt" };

@id("tester-sampling")
permit (principal in Cloister::Role::"tester", action == Cloister::Action::"CreateMessage",
        resource == Cloister::Server::"everything");

@id("no-elicitation")
forbid (principal, action == Cloister::Action::"Elicit", resource);
"""


def _bundle(dst: Path) -> Path:
    copy_example_bundle(dst)
    entities = (dst / "entities.toml").read_text()
    (dst / "entities.toml").write_text(
        entities.replace("[roles]\n", "[roles]\ntester = {}\nnobody = {}\n")
        + '\n[agents.test-bot]\nroles = ["tester"]\nregion = "eu"\n'
        + '\n[agents.other-bot]\nroles = ["nobody"]\nregion = "eu"\n'
        + '\n[agents.peer-bot]\nroles = ["tester"]\nregion = "eu"\n'
        + f'\n[servers.everything]\nregion = "eu"\ntools = {json.dumps(TOOLS)}\n'
    )
    (dst / "policies" / "protocol.cedar").write_text(POLICY)
    return dst


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("protocol")
    with protocol_stack(tmp, _bundle(tmp / "bundle"), EVERYTHING_UPSTREAM, ["everything"]) as s:
        yield s


class Agent:
    """What the agent's client received beside its answers."""

    def __init__(self) -> None:
        self.sampled: list[types.CreateMessageRequestParams] = []
        self.elicited: list[Any] = []
        self.logs: list[types.LoggingMessageNotificationParams] = []
        self.logged = anyio.Event()
        self.notices: list[str] = []
        self.noticed = anyio.Event()
        self.updated: list[Any] = []

    async def sampling(
        self, context: Any, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData:
        self.sampled.append(params)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="a sampled answer"), model="stand-in"
        )

    async def elicitation(self, context: Any, params: Any) -> types.ElicitResult | types.ErrorData:
        self.elicited.append(params)
        return types.ElicitResult(action="decline")

    async def logging(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params)
        self.logged.set()

    async def message(self, message: Any) -> None:
        method = getattr(getattr(message, "root", message), "method", None)
        if isinstance(method, str):
            if method == "notifications/resources/updated":
                self.updated.append(message.params.uri)
            self.notices.append(method)
            self.noticed.set()


def client(stack: Stack, token: str, agent: Agent | None = None, mode: str = "legacy") -> Client:
    http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    a = agent or Agent()
    return Client(
        streamable_http_client(stack.mcp_url, http_client=http),
        cache=None,
        mode=mode,  # legacy, 2025-11-25: server-to-client requests on the call's stream
        sampling_callback=a.sampling,
        elicitation_callback=a.elicitation,
        logging_callback=a.logging,
        message_handler=a.message,
    )


def log_meta(result: Any) -> dict[str, int]:
    meta = result.meta or {}
    value = meta["dev.cloister/log"]
    assert isinstance(value, dict)
    return value


def run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)


def test_resources_are_listed_filtered_read_under_policy_and_logged(stack: Stack) -> None:
    async def go() -> None:
        async with client(stack, stack.token()) as c:
            listed = await c.list_resources()
            uris = [str(r.uri) for r in listed.resources]
            assert uris and all(u.startswith("cloister://upstream/everything/") for u in uris), uris
            templates = [t.uri_template for t in (await c.list_resource_templates()).resource_templates]
            assert any(t.startswith("cloister://upstream/everything/demo%3A%2F%2F") and "{" in t for t in templates)
            # Allowed: a static document, read through the relay, its body committed in the log.
            read = await c.read_resource(uris[0])
            assert read.contents and str(read.contents[0].uri) == uris[0]
            meta = log_meta(read)
            decision, outcome = entry_at(stack, meta["decision"]), entry_at(stack, meta["outcome"])
            assert isinstance(decision, DecisionEntry) and decision.decision == "allow"
            assert decision.tool.startswith("resources/read:demo://resource/static/")
            assert decision.policies == ("tester-static-docs",)
            assert isinstance(outcome, OutcomeEntry) and outcome.result_sha256 is not None and not outcome.error
            # Denied: a dynamic resource (a template's URI), no permit; the denial is logged.
            dynamic = "cloister://upstream/everything/" + "demo%3A%2F%2Fresource%2Fdynamic%2Ftext%2F1"
            with pytest.raises(MCPError) as denied:
                await c.read_resource(dynamic)
            assert denied.value.error.code == DENIED
            data = denied.value.error.data
            assert isinstance(data, dict) and data["code"] == "no-permit"
            entry = entry_at(stack, data["log_index"])
            assert isinstance(entry, DecisionEntry) and entry.decision == "deny"
            assert entry.tool == "resources/read:demo://resource/dynamic/text/1"

        async with client(stack, stack.token("other-bot", ["nobody"])) as c:
            assert (await c.list_resources()).resources == []
            assert [t.name for t in (await c.list_resource_templates()).resource_templates] == ["enclave-attestation"]

    run(go)


def test_resource_links_in_results_are_named_as_the_relay_serves_them(stack: Stack) -> None:
    async def go() -> None:
        async with client(stack, stack.token()) as c:
            result = await c.call_tool("everything___get-resource-links", {"count": 2})
            links = [x for x in result.content if isinstance(x, types.ResourceLink)]
            assert links and all(str(x.uri).startswith("cloister://upstream/everything/demo%3A") for x in links)
            # Following a link is a read like any other: these dynamic ones this agent may not read.
            with pytest.raises(MCPError) as denied:
                await c.read_resource(str(links[0].uri))
            assert denied.value.error.code == DENIED

    run(go)


def test_subscriptions_deliver_updates_of_resources_the_agent_may_read(stack: Stack) -> None:
    async def go() -> None:
        agent = Agent()
        async with client(stack, stack.token(), agent) as c:
            static = next(str(r.uri) for r in (await c.list_resources()).resources)
            dynamic = "cloister://upstream/everything/demo%3A%2F%2Fresource%2Fdynamic%2Ftext%2F1"
            with pytest.raises(MCPError) as refused:
                await c.subscribe_resource(dynamic)  # not readable by this agent: no updates either
            assert refused.value.error.code == DENIED
            await c.subscribe_resource(static)
            await c.call_tool("everything___toggle-subscriber-updates", {})
            try:
                with anyio.fail_after(15):
                    while "notifications/resources/updated" not in agent.notices:
                        await agent.noticed.wait()
                        agent.noticed = anyio.Event()
            finally:
                await c.call_tool("everything___toggle-subscriber-updates", {})
            assert static in [str(u) for u in agent.updated]
            await c.unsubscribe_resource(static)

    run(go)


def test_a_2026_agents_listen_stream_gets_updates_of_resources_it_may_read_only(stack: Stack) -> None:
    """2026-07-28 has no resources/subscribe: an agent names resources on its subscriptions/listen
    stream. Only those it may read are honored (the ack says which), and their updates arrive."""
    from mcp.shared.subscriptions import ResourceUpdated

    async def go() -> None:
        async with client(stack, stack.token(), mode="auto") as c:
            assert c.protocol_version == "2026-07-28"
            static = next(str(r.uri) for r in (await c.list_resources()).resources)
            dynamic = "cloister://upstream/everything/demo%3A%2F%2Fresource%2Fdynamic%2Ftext%2F1"
            async with c.listen(resource_subscriptions=[static, dynamic, "file:///etc/passwd"]) as sub:
                assert sub.honored.resource_subscriptions == [static]  # not the unreadable, not a stranger
                await c.call_tool("everything___toggle-subscriber-updates", {})
                try:
                    with anyio.fail_after(15):
                        async for event in sub:
                            assert isinstance(event, ResourceUpdated) and event.uri == static, event
                            break
                finally:
                    await c.call_tool("everything___toggle-subscriber-updates", {})

    run(go)


def test_a_2026_client_gets_resources_prompts_and_denial_results(stack: Stack) -> None:
    """A client that negotiates 2026-07-28 (the SDK's default) by discovery, not a handshake."""

    async def go() -> None:
        agent = Agent()
        async with client(stack, stack.token(), agent, mode="auto") as c:
            assert c.protocol_version == "2026-07-28"
            uri = next(str(r.uri) for r in (await c.list_resources()).resources)
            assert log_meta(await c.read_resource(uri))["decision"] > 0
            assert (await c.get_prompt("everything___simple-prompt")).messages
            echo = await c.call_tool("everything___echo", {"message": "hi"})
            assert not echo.is_error and "hi" in str(echo.content[0])
            # The upstream's sampling request reaches a 2026-07-28 agent as an input round of its
            # call (decision 0030; tests/e2e/test_protocol_rounds.py), decided as the agent's.
            sampled = await c.call_tool("everything___trigger-sampling-request", {"prompt": "x", "maxTokens": 5})
            assert not sampled.is_error and len(agent.sampled) == 1, sampled
            call = log_meta(sampled)
            between = [entry_at(stack, i) for i in range(call["decision"] + 1, call["outcome"])]
            decisions = [e for e in between if isinstance(e, DecisionEntry)]
            assert [e.tool for e in decisions] == ["sampling/createMessage:"]

    run(go)


def test_prompts_are_listed_filtered_got_under_policy_and_logged(stack: Stack) -> None:
    async def go() -> None:
        async with client(stack, stack.token()) as c:
            names = [p.name for p in (await c.list_prompts()).prompts]
            assert "everything___simple-prompt" in names and "everything___args-prompt" not in names, names
            got = await c.get_prompt("everything___simple-prompt")
            assert got.messages
            meta = log_meta(got)
            decision = entry_at(stack, meta["decision"])
            assert isinstance(decision, DecisionEntry) and decision.tool == "prompts/get:simple-prompt"
            with pytest.raises(MCPError) as denied:
                await c.get_prompt("everything___args-prompt", {"city": "Paris"})
            assert isinstance(denied.value.error.data, dict) and denied.value.error.data["code"] == "policy"
            assert denied.value.error.data["policies"] == ["no-args-prompt"]
            # Completions: for a prompt the agent may see, passed through; for a hidden one, refused.
            done = await c.complete(
                types.PromptReference(type="ref/prompt", name="everything___completable-prompt"),
                {"name": "department", "value": "E"},
            )
            assert "Engineering" in done.completion.values
            with pytest.raises(MCPError):
                await c.complete(
                    types.PromptReference(type="ref/prompt", name="everything___args-prompt"),
                    {"name": "city", "value": "P"},
                )
        async with client(stack, stack.token("other-bot", ["nobody"])) as c:
            assert (await c.list_prompts()).prompts == []

    run(go)


def test_progress_reaches_the_agent_under_its_own_token(stack: Stack) -> None:
    async def go() -> None:
        seen: list[tuple[float, float | None]] = []

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append((progress, total))

        async with client(stack, stack.token()) as c:
            result = await c.call_tool(
                "everything___trigger-long-running-operation", {"duration": 1, "steps": 3}, progress_callback=progress
            )
            assert not result.is_error
        assert [v for v, _ in seen] == [1, 2, 3] and all(t == 3 for _, t in seen), seen

    run(go)


def log_size(stack: Stack) -> int:
    with httpx2.Client() as h:
        att = h.get(f"{stack.relay_url}/log/attestation", params={"nonce": "00" * 16}).json()
    return int(att["checkpoint"].splitlines()[1])


def test_an_agent_cancelling_a_call_ends_it_upstream_with_its_outcome_logged(stack: Stack) -> None:
    async def go() -> None:
        async with client(stack, stack.token()) as c:
            with anyio.move_on_after(1.5):
                await c.call_tool("everything___trigger-long-running-operation", {"duration": 30, "steps": 30})
            # The session still works, and the upstream is not stuck on the abandoned call.
            assert not (await c.call_tool("everything___echo", {"message": "after"})).is_error

    before = log_size(stack)
    run(go)
    entries = [entry_at(stack, i) for i in range(before, log_size(stack))]
    cancelled = [e for e in entries if isinstance(e, OutcomeEntry) and e.error == "cancelled by the client"]
    assert len(cancelled) == 1, entries
    decision = entry_at(stack, cancelled[0].decision_index)
    assert isinstance(decision, DecisionEntry) and decision.tool == "trigger-long-running-operation"
    assert cancelled[0].duration_us < 10_000_000  # ended when the agent cancelled, not when the operation would have


def test_sampling_is_decided_logged_and_reaches_the_calling_agent(stack: Stack) -> None:
    async def go() -> None:
        agent = Agent()
        async with client(stack, stack.token(), agent) as c:
            result = await c.call_tool("everything___trigger-sampling-request", {"prompt": "hello", "maxTokens": 20})
            assert not result.is_error, result
            assert "a sampled answer" in json.dumps(result.model_dump(mode="json"))
        assert len(agent.sampled) == 1
        # The call's decision, then the sampling request's own decision and outcome, then the call's outcome.
        call = log_meta(result)
        between = [entry_at(stack, i) for i in range(call["decision"] + 1, call["outcome"])]
        sampling = [e for e in between if isinstance(e, DecisionEntry)]
        assert [(e.tool, e.decision, e.agent) for e in sampling] == [("sampling/createMessage:", "allow", "test-bot")]
        assert any(isinstance(e, OutcomeEntry) and e.result_sha256 is not None for e in between)

    run(go)


def test_an_upstream_request_is_never_given_to_another_agent(stack: Stack) -> None:
    """A hostile (or merely busy) upstream asks for sampling while calls of two agents are in flight
    on it: the relay cannot tell whose call it serves, so it reaches neither agent."""

    async def go() -> None:
        first, second = Agent(), Agent()
        async with (
            client(stack, stack.token(), first) as a,
            client(stack, stack.token("peer-bot", ["tester"]), second) as b,
            anyio.create_task_group() as tg,
        ):

            async def long() -> None:
                await a.call_tool("everything___trigger-long-running-operation", {"duration": 3, "steps": 3})

            tg.start_soon(long)
            await anyio.sleep(0.5)
            result = await b.call_tool("everything___trigger-sampling-request", {"prompt": "x", "maxTokens": 5})
        assert first.sampled == [] and second.sampled == []
        assert result.is_error and "calls of 2 agents are in flight" in str(result.content[0]), result
        call = log_meta(result)
        between = [entry_at(stack, i) for i in range(call["decision"] + 1, call["outcome"])]
        assert not [e for e in between if isinstance(e, DecisionEntry) and e.tool.startswith("sampling/")]

    run(go)


def test_elicitation_forbidden_by_policy_never_reaches_the_agent_and_is_logged(stack: Stack) -> None:
    async def go() -> None:
        agent = Agent()
        async with client(stack, stack.token(), agent) as c:
            result = await c.call_tool("everything___trigger-elicitation-request", {})
        assert agent.elicited == []
        # The upstream got the denial as the answer to its request, and reported it in its result.
        assert result.is_error and "denied: forbidden by policy no-elicitation" in str(result.content[0])
        call = log_meta(result)
        between = [entry_at(stack, i) for i in range(call["decision"] + 1, call["outcome"])]
        denials = [e for e in between if isinstance(e, DecisionEntry)]
        assert [(e.tool, e.decision, e.policies) for e in denials] == [
            ("elicitation/create:", "deny", ("no-elicitation",))
        ]
        assert not any(isinstance(e, OutcomeEntry) for e in between)  # nothing went to the agent

    run(go)


def test_log_messages_follow_set_level_and_list_changed_is_offered(stack: Stack) -> None:
    async def go() -> None:
        agent = Agent()
        async with client(stack, stack.token(), agent) as c:
            caps = c.server_capabilities
            assert caps.tools is not None and caps.tools.list_changed
            assert caps.resources is not None and caps.resources.list_changed
            assert caps.prompts is not None and caps.prompts.list_changed
            await c.list_tools()  # log messages outside a call reach sessions shown something of the server
            await c.set_logging_level("debug")
            await c.call_tool("everything___toggle-simulated-logging", {})
            with anyio.move_on_after(15):
                await agent.logged.wait()
            await c.call_tool("everything___toggle-simulated-logging", {})
        assert agent.logs, "no upstream log message reached the agent"
        assert all(str(m.logger or "").startswith("everything") for m in agent.logs)

    run(go)


def test_hostile_names_and_bodies_leave_a_log_that_replays_and_restarts(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malicious agent's long or malformed URIs and prompt names, and an oversized request: each
    refused or denied, and what they leave in the log replays and resumes."""

    async def go() -> None:
        async with client(stack, stack.token()) as c:
            base = "cloister://upstream/everything/"
            for uri in (base + "x" * 5000, base + "%ff%fe" * 50, base + "%00", "cloister://upstream//x"):
                with pytest.raises(MCPError):
                    await c.read_resource(uri)
            with pytest.raises(MCPError) as unknown:
                await c.read_resource("cloister://upstream/nowhere/" + "demo%3A%2F%2Fx")
            assert unknown.value.error.code in (DENIED, -32602)
            for name in ("everything___" + "p" * 3000, "everything___", "no-separator"):
                with pytest.raises(MCPError):
                    await c.get_prompt(name)
            with pytest.raises(MCPError) as big:
                await c.get_prompt("everything___simple-prompt", {"a": "x" * 70_000})
            assert "bytes" in big.value.error.message
            # The relay still serves.
            assert (await c.get_prompt("everything___simple-prompt")).messages

    run(go)
    monkeypatch.setenv("CLOISTER_STATE", str(stack.state.root))
    for log in (stack.relay_url, str(stack.state.log_dir)):
        summary = replayed(log, tmp_path / "a")
    assert summary["denials_by_code"]["no-permit"] >= 1, summary
    stop(stack.enclave, signal.SIGKILL)
    stack.restart_enclave()
    wait_for(lambda: stack.health().get("ready") is True, 30, "the relay to re-initialise the enclave")

    def works() -> bool:
        async def get() -> bool:
            async with client(stack, stack.token()) as c:
                try:
                    return bool((await c.get_prompt("everything___simple-prompt")).messages)
                except MCPError:
                    return False

        return bool(run(get))

    wait_for(works, 30, "prompts to be served after the enclave restart (its resume parsed every entry)")


def test_listen_streams_are_capped_per_agent_token(stack: Stack) -> None:
    """A malicious agent cannot hold every subscriptions/listen stream: at most
    MAX_LISTENS_PER_TOKEN per token; another agent still listens."""
    from cloister.relay.listen import MAX_LISTENS_PER_TOKEN

    async def go() -> None:
        token = stack.token()
        async with contextlib.AsyncExitStack() as stack_:
            clients = [
                await stack_.enter_async_context(client(stack, token, mode="auto"))
                for _ in range(MAX_LISTENS_PER_TOKEN + 1)
            ]
            for c in clients[:MAX_LISTENS_PER_TOKEN]:
                await stack_.enter_async_context(c.listen(tools_list_changed=True))
            with pytest.raises(MCPError) as refused:
                await stack_.enter_async_context(clients[-1].listen(tools_list_changed=True))
            assert f"at most {MAX_LISTENS_PER_TOKEN} subscriptions/listen streams" in refused.value.error.message
            other = await stack_.enter_async_context(client(stack, stack.token("peer-bot"), mode="auto"))
            sub = await stack_.enter_async_context(other.listen(tools_list_changed=True))
            assert sub.honored.tools_list_changed

    run(go)


def test_a_policy_push_tells_agents_their_lists_changed(stack: Stack) -> None:
    """Last in this module: it leaves version 2 in force. A push that hides a prompt reaches the
    open session as notifications/*/list_changed, and its next listing no longer shows it."""
    from cloister.enclave.bundle import read_bundle_dir
    from cloister.verify.bundle import sign_bundle

    files = read_bundle_dir(stack.state.bundle_dir)
    files["policies/protocol.cedar"] = (
        POLICY + '@id("no-simple")\nforbid (principal, action == Cloister::Action::"GetPrompt", resource) '
        'when { context.input.name == "simple-prompt" };\n'
    ).encode()
    signed = sign_bundle(
        files, 2, stack.state.admin_key(), origin=stack.state.origin(), not_after=int(time.time()) + 3600
    )

    async def go() -> None:
        agent = Agent()
        events: list[str] = []
        async with (
            client(stack, stack.token(), agent) as c,
            # A 2026-07-28 agent has no session to notify: it listens (SEP-2575, cloister/relay/listen.py).
            client(stack, stack.token("peer-bot"), mode="auto") as modern,
            modern.listen(tools_list_changed=True, prompts_list_changed=True, resources_list_changed=True) as sub,
        ):
            assert modern.protocol_version == "2026-07-28"
            assert "everything___simple-prompt" in [p.name for p in (await c.list_prompts()).prompts]
            assert "everything___simple-prompt" in [p.name for p in (await modern.list_prompts()).prompts]
            async with httpx2.AsyncClient() as h:
                pushed = await h.post(
                    f"{stack.relay_url}/admin/policy",
                    content=signed,
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                )
            assert pushed.status_code == 200, pushed.text
            with anyio.fail_after(15):
                while "notifications/prompts/list_changed" not in agent.notices:
                    await agent.noticed.wait()
                    agent.noticed = anyio.Event()
            assert {"notifications/tools/list_changed", "notifications/resources/list_changed"} <= set(agent.notices)
            assert "everything___simple-prompt" not in [p.name for p in (await c.list_prompts()).prompts]
            with anyio.fail_after(15):
                async for event in sub:
                    events.append(type(event).__name__)
                    if {"ToolsListChanged", "PromptsListChanged", "ResourcesListChanged"} <= set(events):
                        break
            assert "everything___simple-prompt" not in [p.name for p in (await modern.list_prompts()).prompts]

    run(go)
