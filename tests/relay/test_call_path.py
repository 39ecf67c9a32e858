"""The relay's call path (`CallPath.call`, i.e. tools/call) in-process and without sockets.

Real objects throughout: the relay's `CallPath` and `RelayState`, its `EnclaveClient` over the
enclave's own servicer and `EnclaveCore` (the test world's: mock NSM, the world's clock), and the
real storage `LogWriter` on tmp_path. Only the upstream MCP server is a stand-in, which records
what reached it and what the log held at that moment.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from cloister.dev.examples.payments import payment as x402_payment
from cloister.relay.call_path import DENIAL_META_KEY, DENIALS_META_KEY, CallPath
from cloister.relay.codes import DENIED, ENCLAVE_UNAVAILABLE, LIMITED, UNAUTHENTICATED, UPSTREAM_FAILED
from cloister.relay.config import UpstreamConfig
from cloister.relay.state import RelayState
from cloister.relay.storage import LocalBackend, LogWriter
from cloister.relay.upstreams import Upstream, Upstreams
from cloister.verify.canonical import canonical_sha256
from cloister.verify.enclave_identity import EnclaveBinding
from cloister.verify.entries import DecisionEntry, OutcomeEntry, parse_entry
from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY, read_grant, verify_grant
from cloister.wire.contract import LOG_META_KEY, X402_META_KEY
from tests.relay.inprocess import InProcessEnclave, relay_config
from tests.world import World, epoch_ms, make_world


@dataclass
class Forwarded:
    tool: str
    arguments: dict[str, Any]
    meta: dict[str, Any]
    durable_size: int  # the relay's durable log size when the call reached the upstream
    decision: Any  # the entry at the grant's log index, read back from storage at that moment


class StandInUpstream(Upstream):
    """The upstream MCP server, answering every call; it never connects anywhere."""

    def __init__(self, name: str, writer: Callable[[], LogWriter]) -> None:
        super().__init__(UpstreamConfig(name=name, url="http://upstream.invalid/mcp", timeout_s=0.2))
        self.state = "up"
        self._writer = writer
        self.forwarded: list[Forwarded] = []
        self.hang = False  # True: never answer (a slow or stuck upstream)
        self.reached = anyio.Event()  # set when a call reaches this upstream

    async def call(
        self, tool: str, arguments: dict[str, Any], meta: dict[str, Any], progress: Any = None
    ) -> types.CallToolResult:
        writer = self._writer()
        grant = base64.b64decode(meta[GRANT_META_KEY])
        index = read_grant(grant).log_index
        stored = await writer.read_entries(index, index + 1) if index < writer.persisted_size else []
        self.forwarded.append(
            Forwarded(tool, arguments, meta, writer.persisted_size, parse_entry(stored[0]) if stored else None)
        )
        self.reached.set()
        if self.hang:
            await anyio.sleep_forever()
        return types.CallToolResult(content=[types.TextContent(text=json.dumps({"ok": arguments}))])


@dataclass
class Rig:
    world: World
    enclave: InProcessEnclave
    state: RelayState
    upstreams: Upstreams
    calls: CallPath
    stand_ins: dict[str, StandInUpstream] = field(default_factory=dict)

    async def call(
        self, token: str, name: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> types.CallToolResult:
        params = types.CallToolRequestParams(
            name=name, arguments=arguments, _meta=cast("types.RequestParamsMeta | None", meta)
        )
        return await self.calls.call(token, params)

    async def entry(self, index: int) -> Any:
        return parse_entry((await self.state.writer.read_entries(index, index + 1))[0])

    def forwarded(self) -> list[Forwarded]:
        return [f for s in self.stand_ins.values() for f in s.forwarded]


async def make_rig(tmp: Path, world: World) -> Rig:
    config = relay_config(tmp)
    enclave = InProcessEnclave(world.core, config.run_dir)
    state = RelayState(config, enclave)
    state.writer = await LogWriter.open(LocalBackend(config.storage))
    # What the relay's start-up does (Lifecycle.ensure_enclave_ready), in short.
    await state.persist((await enclave.start_log(None)).log)
    await state.persist((await enclave.load_policy(world.sign_bundle(1), state.writer.persisted_size)).log)
    state.attestation = (await enclave.attest(b"call-path-test")).document
    upstreams = Upstreams(())
    rig = Rig(world, enclave, state, upstreams, CallPath(state, upstreams))
    for name in ("refunds", "research"):
        rig.stand_ins[name] = upstreams.by_name[name] = StandInUpstream(name, lambda: state.writer)
    return rig


def run(tmp: Path, scenario: Callable[[Rig], Awaitable[None]]) -> None:
    world = make_world(tmp / "world", start=False)  # outside the event loop: it runs one of its own

    async def main() -> None:
        rig = await make_rig(tmp, world)
        try:
            with anyio.fail_after(10):
                await scenario(rig)
        finally:
            await rig.state.writer.close()

    anyio.run(main)


def refund_bot(rig: Rig) -> str:
    return rig.world.token("refund-bot", ["refund-agent"])


def research_bot(rig: Rig) -> str:
    return rig.world.token("research-bot", ["research-agent"])


def test_an_allow_persists_the_decision_before_forwarding(tmp_path: Path) -> None:
    args = {"customer_id": "cus_1001"}

    async def scenario(rig: Rig) -> None:
        result = await rig.call(refund_bot(rig), "refunds___customer_lookup", args)
        [f] = rig.forwarded()
        index = result.meta[LOG_META_KEY]["decision"] if result.meta else -1
        # When the call reached the upstream, its decision entry was already durable in storage.
        assert f.durable_size > index
        assert isinstance(f.decision, DecisionEntry) and f.decision.decision == "allow"
        assert f.decision.args_sha256 == canonical_sha256(args) and f.decision.agent == "refund-bot"
        # The upstream got exactly the agent's arguments, the enclave's grant for them, and its attestation.
        assert (f.tool, f.arguments) == ("customer_lookup", args)
        keys = EnclaveBinding("o", rig.world.core.log_public, rig.world.core.grant_public).grant_keys()
        claims = verify_grant(
            base64.b64decode(f.meta[GRANT_META_KEY]),
            grant_keys=keys,
            server="refunds",
            tool="customer_lookup",
            arguments=args,
            now_ms=rig.world.clock.ms,
            audience="refunds-eu-1",  # the upstream instance the bundle names for refunds
        )
        assert claims.log_index == index
        assert base64.b64decode(f.meta[ATTESTATION_META_KEY]) == rig.state.attestation
        # The outcome is durable too before the agent's answer, which names both entries.
        assert result.meta is not None
        outcome_index = result.meta[LOG_META_KEY]["outcome"]
        assert rig.state.writer.persisted_size > outcome_index > index
        outcome = await rig.entry(outcome_index)
        assert isinstance(outcome, OutcomeEntry) and outcome.decision_index == index
        assert outcome.result_sha256 == canonical_sha256(
            result.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"meta"})
        )
        assert await rig.state.writer.get_body(index, "args") == json.dumps(args, separators=(",", ":")).encode()

    run(tmp_path, scenario)


MODEL_CODES = {"policy", "no-permit", "limit", "quarantined", "bad-arguments"}


@pytest.mark.parametrize(
    ("who", "name", "arguments", "meta", "jsonrpc", "code"),
    [
        (research_bot, "refunds___customer_lookup", {"customer_id": "c"}, None, DENIED, "no-permit"),
        (refund_bot, "refunds___refund.approve_above_threshold", {"refund_id": "r"}, None, DENIED, "policy"),
        (refund_bot, "refunds___delete_all", {}, None, DENIED, "unknown-tool"),
        # Regression (boundary fuzzer): a lone surrogate ("\\ud800" in the agent's JSON) made the
        # relay's own JSON encoding raise; it now reaches the enclave, which refuses it.
        (refund_bot, "refunds___customer_lookup", {"customer_id": "\ud800"}, None, DENIED, "bad-arguments"),
        (lambda rig: "", "refunds___customer_lookup", {"customer_id": "c"}, None, UNAUTHENTICATED, "unauthenticated"),
        (
            research_bot,
            "research___deep_search",
            {"query": "q"},
            {X402_META_KEY: x402_payment("0.11", now_s=epoch_ms() // 1000)},
            LIMITED,
            "limit",
        ),
    ],
)
def test_an_enclave_denial_forwards_nothing_upstream(
    tmp_path: Path,
    who: Callable[[Rig], str],
    name: str,
    arguments: dict[str, Any],
    meta: dict[str, Any] | None,
    jsonrpc: int,
    code: str,
) -> None:
    async def scenario(rig: Rig) -> None:
        # Decision 0018: a denial the model can act on is a tool result with isError (its data in
        # _meta); a client may ask for JSON-RPC errors instead. Identity and unknown names are errors.
        for shape in ("result", "error"):
            asked = {**(meta or {}), **({DENIALS_META_KEY: "error"} if shape == "error" else {})}
            if shape == "result" and code in MODEL_CODES:
                result = await rig.call(who(rig), name, arguments, asked)
                assert result.is_error and (result.meta or {}).keys() >= {DENIAL_META_KEY, "dev.cloister/log"}
                data = (result.meta or {})[DENIAL_META_KEY]
                assert isinstance(data, dict) and data["reason"] in str(result.content[0])
                error_code = data["error_code"]
            else:
                with pytest.raises(MCPError) as denied:
                    await rig.call(who(rig), name, arguments, asked)
                data, error_code = denied.value.error.data, denied.value.error.code
            assert rig.forwarded() == []
            # The agent's error code comes from the typed denial class; the denial itself is logged and durable.
            assert error_code == jsonrpc and isinstance(data, dict) and data["code"] == code
            assert data["source"] == "cloister" and data["decision"] == "deny"
            index = data["log_index"]
            assert rig.state.writer.persisted_size == index + 1
            entry = await rig.entry(index)
            assert isinstance(entry, DecisionEntry) and entry.decision == "deny" and entry.code == code
            assert await rig.state.writer.get_body(index, "args") is None

    run(tmp_path, scenario)


@pytest.mark.parametrize("how", ["the connection is gone", "a new enclave has no log yet"])
def test_an_unavailable_enclave_fails_closed(tmp_path: Path, how: str) -> None:
    async def scenario(rig: Rig) -> None:
        if how == "the connection is gone":
            rig.enclave.reachable = False
        else:  # restarted: fresh keys, AWAITING_LOG, so the core answers NotReady (gRPC UNAVAILABLE)
            rig.enclave.restart(rig.world.new_core())
        durable = rig.state.writer.persisted_size
        with pytest.raises(MCPError) as refused:
            await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "cus_1001"})
        assert refused.value.error.code == ENCLAVE_UNAVAILABLE and "fail closed" in refused.value.error.message
        assert rig.forwarded() == [] and rig.state.writer.persisted_size == durable

    run(tmp_path, scenario)


# --- Every allowed decision gets exactly one outcome -------------------------------------------


async def outcomes_of(rig: Rig, decision: int) -> list[OutcomeEntry]:
    writer = rig.state.writer
    entries = [parse_entry(e) for e in await writer.read_entries(0, writer.persisted_size)]
    return [e for e in entries if isinstance(e, OutcomeEntry) and e.decision_index == decision]


def decision_of(rig: Rig) -> int:
    [f] = rig.forwarded()
    return read_grant(base64.b64decode(f.meta[GRANT_META_KEY])).log_index


async def hung_call(rig: Rig, interrupt: Callable[[anyio.CancelScope], Awaitable[None]]) -> BaseException | None:
    """A call whose upstream never answers, interrupted by `interrupt(the call's cancel scope)`
    once it reached the upstream; returns what the call raised (None if it was cancelled)."""
    rig.stand_ins["refunds"].hang = True
    raised: list[BaseException] = []

    async def call() -> None:
        try:
            await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "cus_1001"})
        except MCPError as exc:
            raised.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await rig.stand_ins["refunds"].reached.wait()
        await interrupt(tg.cancel_scope)
    return raised[0] if raised else None


def test_a_call_cancelled_by_the_client_gets_one_outcome(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        async def cancel(scope: anyio.CancelScope) -> None:
            scope.cancel()  # what the SDK does on notifications/cancelled, or when the agent's stream closes

        assert await hung_call(rig, cancel) is None
        [outcome] = await outcomes_of(rig, decision_of(rig))
        assert outcome.error == "cancelled by the client" and outcome.result_sha256 is None
        # The enclave closed the decision: a second outcome is refused.
        with pytest.raises(MCPError, match="not an open allowed decision"):
            await rig.calls._record_outcome(decision_of(rig), None, "again", 1, "")

    run(tmp_path, scenario)


@pytest.mark.parametrize("step", ["authorize", "persist"])
def test_a_call_cancelled_while_being_decided_gets_one_outcome_and_is_not_forwarded(tmp_path: Path, step: str) -> None:
    # Regression (found by the input-rounds work, 2026-12-06): a cancel that landed while the
    # enclave decided, or while the decision entry was persisted, left an allowed decision
    # without an outcome (`cloister audit replay`: missing). Those steps are now shielded; the
    # cancel takes effect at the forward, which records it.
    async def scenario(rig: Rig) -> None:
        entered, release = anyio.Event(), anyio.Event()
        target: Any = rig.enclave if step == "authorize" else rig.state
        original = getattr(target, step)

        async def slow(*args: Any) -> Any:
            entered.set()
            await release.wait()
            return await original(*args)

        setattr(target, step, slow)
        before = rig.state.writer.persisted_size

        async def call() -> None:
            await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "cus_1001"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await entered.wait()
            setattr(target, step, original)
            tg.cancel_scope.cancel()  # the agent goes away mid-decision
            release.set()
        assert rig.forwarded() == []  # the cancel took effect before anything was forwarded
        writer = rig.state.writer
        entries = [parse_entry(e) for e in await writer.read_entries(before, writer.persisted_size)]
        [decision] = [e for e in entries if isinstance(e, DecisionEntry)]
        assert decision.decision == "allow"
        [outcome] = [e for e in entries if isinstance(e, OutcomeEntry)]
        assert outcome.error == "cancelled by the client" and outcome.result_sha256 is None

    run(tmp_path, scenario)


def test_an_upstream_timeout_gets_one_outcome(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        rig.stand_ins["refunds"].hang = True
        with pytest.raises(MCPError) as failed:
            await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": "cus_1001"})
        assert failed.value.error.code == UPSTREAM_FAILED
        assert "did not answer within 0.2s" in failed.value.error.message
        [outcome] = await outcomes_of(rig, decision_of(rig))
        assert outcome.error == "upstream timed out after 0.2s: upstream 'refunds' did not answer within 0.2s"

    run(tmp_path, scenario)


@pytest.mark.parametrize("how", ["the relay stops its calls", "the server cancels them while stopping"])
def test_relay_shutdown_mid_call_gets_one_outcome(tmp_path: Path, how: str) -> None:
    async def scenario(rig: Rig) -> None:
        async def stop(scope: anyio.CancelScope) -> None:
            if how == "the relay stops its calls":
                with anyio.fail_after(5):
                    await rig.calls.shutdown()
            else:
                rig.calls.shutting_down = lambda: True
                scope.cancel()

        raised = await hung_call(rig, stop)
        if how == "the relay stops its calls":  # the agent hears why, with the entries' indexes
            assert isinstance(raised, MCPError) and "relay shutting down" in raised.error.message
        [outcome] = await outcomes_of(rig, decision_of(rig))
        assert outcome.error == "relay shutting down"

    run(tmp_path, scenario)


def test_an_unreachable_enclave_leaves_the_outcome_unrecorded_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(rig: Rig) -> None:
        async def cancel(scope: anyio.CancelScope) -> None:
            rig.enclave.reachable = False
            scope.cancel()

        assert await hung_call(rig, cancel) is None
        assert await outcomes_of(rig, decision_of(rig)) == []
        assert f"the outcome of decision {decision_of(rig)} (cancelled by the client) could not be recorded" in (
            caplog.text
        )

    run(tmp_path, scenario)
