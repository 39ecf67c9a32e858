"""The enclave as a real process behind the vsock bridge (AF_UNIX standing in for AF_VSOCK),
driven by the relay's own gRPC client through the parent-side bridge."""

from __future__ import annotations

import json
import secrets
import signal
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from cloister.dev.measure import mock_pcrs
from cloister.dev.state import ensure_state
from cloister.enclave.config import load_config
from cloister.relay.enclave_client import EnclaveClient, EnclaveRefused, EnclaveUnavailable
from cloister.verify.attestation import DOCUMENT_TIME, AttestationPolicy, TrustRoot
from cloister.verify.checkpoint import verify_checkpoint
from cloister.verify.enclave_identity import verify_enclave
from cloister.verify.entries import DecisionEntry, parse_entry
from cloister.wire import enclave_pb2 as pb
from tests.e2e.procs import start_enclave, stop, unseal


@pytest.fixture
def state(tmp_path: Path):  # type: ignore[no-untyped-def]
    from tests.world import decision_bundle

    return ensure_state(tmp_path / "state", bundle_source=decision_bundle(tmp_path / "bundle"), witnessed=False)


def test_enclave_over_the_bridge(state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "enclave.vsock"
    proc, ready = start_enclave(state.root, f"unix:{sock}", log=tmp_path / "enclave.log")
    expected_pcr0 = mock_pcrs(load_config(state.enclave_config, mock_nsm=True).raw)[0]
    assert ready["pcr0"] == expected_pcr0.hex() and ready["mock_nsm"] is True
    root = TrustRoot.from_pem(state.mock_root.read_bytes())

    async def scenario() -> None:
        async with EnclaveClient(f"unix:{sock}", tmp_path / "run") as client:
            health = await client.health()
            assert health.log_size == 0 and not health.ready and health.awaiting_key
            # Nothing is decided before the log key, the log and the policy exist (fail closed).
            with pytest.raises(EnclaveUnavailable, match="not been started"):
                await client.authorize(pb.AuthorizeRequest(token="x", server="refunds", tool="customer_lookup"))
            with pytest.raises(EnclaveUnavailable, match="no log key"):
                await client.start_log(None)
            await unseal(client, state.root, health.origin, first_start=True)
            health = await client.health()
            assert not health.awaiting_key and len(health.log_public_key) == 32
            started = await client.start_log(None)
            loaded = await client.load_policy(state.signed_bundle.read_bytes(), 1)
            assert loaded.version == 1
            # The attestation binds the keys, carries our nonce and PCR0 of the loaded code.
            nonce = secrets.token_bytes(16)
            att = await client.attest(nonce, include_checkpoint=True)
            policy = AttestationPolicy(
                root=root, at=DOCUMENT_TIME, now=datetime.now(UTC), nonce=nonce, expected_pcrs={0: expected_pcr0}
            )
            verified = verify_enclave(att.document, policy, checkpoint=att.checkpoint)
            assert verified.binding.log_key == health.log_public_key
            cp = verify_checkpoint(
                att.checkpoint, [verified.binding.log_verifier()], origin=verified.binding.origin
            ).checkpoint
            assert cp.size == 2
            token = state.mint_token("refund-bot", ["refund-agent"])
            v = await client.authorize(
                pb.AuthorizeRequest(
                    token=token,
                    server="refunds",
                    tool="customer_lookup",
                    arguments_json=json.dumps({"customer_id": "cus_1001"}).encode(),
                    persisted_size=2,
                )
            )
            assert v.decision == pb.ALLOW and v.grant and v.log_index == 2
            assert isinstance(parse_entry(v.log.entries[0]), DecisionEntry)
            assert started.log.first_index == 0
            # Oversized or garbage input gets a clear error, not a crash.
            with pytest.raises(EnclaveRefused, match="COSE_Sign1|bundle"):
                await client.load_policy(b"\x00garbage", 3)
            # Kill the enclave: the client fails closed with "unavailable", quickly.
            stop(proc, signal.SIGKILL)
            with anyio.fail_after(10), pytest.raises(EnclaveUnavailable):
                await client.authorize(
                    pb.AuthorizeRequest(token=token, server="refunds", tool="customer_lookup", arguments_json=b"{}")
                )

    try:
        anyio.run(scenario)
    finally:
        stop(proc)
