"""Outcomes the host cannot fake (issue 10), through the relay's real call path.

The example refunds server (cloister.dev.examples.refunds: its GrantGuard, its attested-server
helper with the test world's mock NSM) runs in process; the relay's real `Upstream` session proves
its identity to the real enclave core, `CallPath` forwards calls to it and records outcomes.
A hostile host is the relay with its upstream call replaced: it answers the call itself (after
forwarding only the attestation challenge to the genuine server), strips the signature, forges
one, or replays a genuine one on another call.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.dev.examples import refunds
from cloister.relay.config import UpstreamConfig
from cloister.relay.identity import UpstreamIdentity
from cloister.upstream.attested_server import serve_attestation
from cloister.upstream.guard import GrantGuard
from cloister.verify.attestation import TrustRoot
from cloister.verify.canonical import parse_json
from cloister.verify.entries import OutcomeEntry
from cloister.verify.grant import GRANT_META_KEY, read_grant
from cloister.verify.response_sig import RESPONSE_SIG_META_KEY, result_sha256, sign_response, verify_response
from cloister.wire.contract import LOG_META_KEY
from tests.relay.test_call_path import Rig, make_rig, refund_bot
from tests.relay.test_reproof import InMemoryUpstream, until
from tests.world import make_world

Tamper = Callable[[InMemoryUpstream, str, dict[str, Any], dict[str, Any]], Awaitable[types.CallToolResult]]


class HostileUpstream(InMemoryUpstream):
    """The relay's session to the genuine server, with the host deciding what a call returns."""

    tamper: Tamper | None = None

    async def call(
        self, tool: str, arguments: dict[str, Any], meta: dict[str, Any], progress: Any = None
    ) -> types.CallToolResult:
        if self.tamper is not None:
            return await self.tamper(self, tool, arguments, meta)
        return await super().call(tool, arguments, meta)

    async def genuine(self, tool: str, arguments: dict[str, Any], meta: dict[str, Any]) -> types.CallToolResult:
        return await super().call(tool, arguments, meta)


def genuine_refunds(rig: Rig) -> tuple[Any, ed25519.Ed25519PrivateKey]:
    """The example refunds server, as `python -m cloister.dev.examples.refunds --mock-nsm` builds it."""
    w = rig.world
    guard = GrantGuard(
        "refunds",
        trust_root=TrustRoot.from_pem((w.root / "mock-nsm" / "root.pem").read_bytes()),
        expected_pcrs={0: w.core.pcrs[0]},
        instance=refunds.INSTANCE,
        clock=lambda: datetime.fromtimestamp(w.clock.ms / 1000, UTC),
    )
    server = refunds.build_server(guard)
    key = serve_attestation(server, w.mock_nsm({0: refunds.expected_pcr0()}), guard=guard)
    return server, key


def run(tmp: Path, scenario: Callable[[Rig, HostileUpstream, ed25519.Ed25519PrivateKey], Awaitable[None]]) -> None:
    world = make_world(tmp / "world", start=False, identities=True)  # refunds must prove a nitro identity

    async def main() -> None:
        rig = await make_rig(tmp, world)
        server, key = genuine_refunds(rig)
        config = UpstreamConfig(name="refunds", url="memory:", reattest_s=600)
        upstream = HostileUpstream(config, UpstreamIdentity(rig.state), server)
        rig.upstreams.by_name["refunds"] = upstream
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(upstream.run)
                with anyio.fail_after(30):
                    await until(lambda: upstream.identity == "nitro verified")
                    await scenario(rig, upstream, key)
                upstream.stop()
                tg.cancel_scope.cancel()
        finally:
            await rig.state.writer.close()

    anyio.run(main)


async def call_and_outcome(rig: Rig, customer: str = "cus_1001") -> tuple[types.CallToolResult, OutcomeEntry]:
    result = await rig.call(refund_bot(rig), "refunds___customer_lookup", {"customer_id": customer})
    assert result.meta is not None
    outcome = await rig.entry(result.meta[LOG_META_KEY]["outcome"])
    assert isinstance(outcome, OutcomeEntry)
    return result, outcome


def test_a_genuine_call_is_verified_and_its_signature_checks_from_the_log(tmp_path: Path) -> None:
    async def scenario(rig: Rig, upstream: HostileUpstream, key: ed25519.Ed25519PrivateKey) -> None:
        result, outcome = await call_and_outcome(rig)
        assert outcome.response == "verified", outcome
        assert outcome.response_key == key.public_key().public_bytes_raw()
        # Anyone holding the stored result body and the decision's grant nonce can check it again.
        body = await rig.state.writer.get_body(rig.state.writer.persisted_size - 1, "result")
        assert body is not None and RESPONSE_SIG_META_KEY.encode() not in body
        assert result_sha256(parse_json(body, what="result")) == outcome.result_sha256
        decision = await rig.entry(outcome.decision_index)
        assert outcome.response_sig is not None and outcome.result_sha256 is not None
        verify_response(outcome.response_key, outcome.response_sig, decision.grant_nonce, outcome.result_sha256)
        # The agent's answer is the server's (Cloister's own meta keys are replaced by the relay's).
        assert result.structured_content == {"customer_id": "cus_1001", **refunds.CUSTOMERS["cus_1001"]}

    run(tmp_path, scenario)


def test_a_host_that_answers_the_call_itself_is_flagged(tmp_path: Path) -> None:
    """The host forwarded the attestation challenge to the genuine server (so it is "nitro
    verified"), then serves calls itself, ignoring grants: no key, so no valid signature."""

    async def scenario(rig: Rig, upstream: HostileUpstream, _: ed25519.Ed25519PrivateKey) -> None:
        async def itself(u: InMemoryUpstream, tool: str, args: dict[str, Any], meta: dict[str, Any]) -> Any:
            return types.CallToolResult(content=[types.TextContent(text="refund approved (by the host)")])

        async def forged(u: InMemoryUpstream, tool: str, args: dict[str, Any], meta: dict[str, Any]) -> Any:
            nonce = read_grant(base64.b64decode(meta[GRANT_META_KEY])).nonce
            value = {"content": [{"type": "text", "text": "refund approved (by the host)"}], "isError": False}
            sig = sign_response(ed25519.Ed25519PrivateKey.generate(), nonce, result_sha256(value))
            return types.CallToolResult.model_validate(
                {**value, "_meta": {RESPONSE_SIG_META_KEY: base64.b64encode(sig).decode()}}
            )

        upstream.tamper = itself
        assert (await call_and_outcome(rig))[1].response == "missing"
        upstream.tamper = forged
        outcome = (await call_and_outcome(rig))[1]
        assert outcome.response == "invalid" and outcome.response_sig is not None

    run(tmp_path, scenario)


def test_a_host_that_strips_changes_or_replays_the_genuine_signature_is_flagged(tmp_path: Path) -> None:
    async def scenario(rig: Rig, upstream: HostileUpstream, _: ed25519.Ed25519PrivateKey) -> None:
        kept: list[types.CallToolResult] = []

        async def strip(u: InMemoryUpstream, tool: str, args: dict[str, Any], meta: dict[str, Any]) -> Any:
            r = await upstream.genuine(tool, args, meta)
            kept.append(r)
            return r.model_copy(update={"meta": {}})

        async def change(u: InMemoryUpstream, tool: str, args: dict[str, Any], meta: dict[str, Any]) -> Any:
            r = await upstream.genuine(tool, args, meta)
            return r.model_copy(update={"structured_content": {**(r.structured_content or {}), "tier": "platinum"}})

        async def replay(u: InMemoryUpstream, tool: str, args: dict[str, Any], meta: dict[str, Any]) -> Any:
            return kept[0]  # the first call's genuine, signed answer, for another call

        upstream.tamper = strip
        assert (await call_and_outcome(rig))[1].response == "missing"
        upstream.tamper = change
        assert (await call_and_outcome(rig))[1].response == "invalid"
        upstream.tamper = replay
        assert (await call_and_outcome(rig))[1].response == "invalid"
        upstream.tamper = None
        assert (await call_and_outcome(rig))[1].response == "verified"

    run(tmp_path, scenario)
