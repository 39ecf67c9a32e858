"""A paid call through real processes: the enclave (mock NSM, AF_UNIX for vsock), the relay, and
the example `research` server over streamable HTTP, verifying grants with GrantGuard as instance
`research-us-1`.

The agent's paid call goes through. Then the host, which can talk to the enclave and to the
upstream directly, asks the enclave for a grant for one payment and sends the upstream another: the
upstream refuses it, because the grant binds the payment the enclave charged."""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from cloister.dev.examples.payments import payment
from cloister.dev.mcp_http import mcp_http_client
from cloister.dev.measure import mock_pcrs
from cloister.dev.state import DevState, copy_example_bundle, ensure_state, free_port
from cloister.enclave.config import load_config
from cloister.relay.enclave_client import EnclaveClient
from cloister.upstream.guard import GRANT_REFUSED
from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY, read_grant
from cloister.wire import enclave_pb2 as pb
from cloister.wire.contract import X402_META_KEY
from tests.e2e.procs import start_enclave, start_relay, stop, wait_for, write_relay_config

PAYMENT_REQUIRED = -32402


def _bundle(dst: Path) -> Path:
    """The example bundle, with no upstream identities to prove (research runs over HTTP here)."""
    copy_example_bundle(dst)
    entities = dst / "entities.toml"
    text = re.sub(r"^identity = .*$", 'identity = { kind = "none" }', entities.read_text(), flags=re.M)
    entities.write_text(re.sub(r"^pins = .*\n", "", text, flags=re.M))
    return dst


def _health(url: str) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:  # the relay we started
            body: dict[str, Any] = json.loads(r.read())
            return body
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        return body
    except OSError:
        return {"ready": False, "upstreams": {}}


def _client(url: str, token: str | None = None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Client(streamable_http_client(url, http_client=mcp_http_client(headers=headers)), cache=None)


async def _agent_pays(mcp_url: str, token: str) -> None:
    async with _client(mcp_url, token) as agent:
        with pytest.raises(MCPError) as unpaid:
            await agent.call_tool("research___deep_search", {"query": "attestation"})
        assert unpaid.value.error.code == PAYMENT_REQUIRED
        paid = payment("0.05", now_s=int(time.time()), nonce=secrets.token_hex(8))
        result = await agent.call_tool(
            "research___deep_search",
            {"query": "attestation"},
            meta={X402_META_KEY: paid},  # type: ignore[arg-type]
        )
        assert not result.is_error and result.structured_content is not None
        assert result.structured_content["paid"] == "0.05"


async def _host_swaps_the_payment(state: DevState, sock: Path, research_url: str, run_dir: Path) -> None:
    token = state.mint_token("research-bot", ["research-agent"], 600)
    charged = payment("0.05", now_s=int(time.time()), nonce=secrets.token_hex(8))
    async with EnclaveClient(f"unix:{sock}", run_dir) as enclave:
        verdict = await enclave.authorize(
            pb.AuthorizeRequest(
                token=token,
                server="research",
                tool="deep_search",
                arguments_json=b'{"query":"attestation"}',
                request_id="host",
                payment=json.dumps(charged).encode(),
            )
        )
        assert verdict.decision == pb.ALLOW, verdict.reason
        document = (await enclave.attest(secrets.token_bytes(16))).document
    claims = read_grant(verdict.grant)
    assert (claims.audience, claims.payment_amount) == ("research-us-1", "0.05")
    meta = {
        GRANT_META_KEY: base64.b64encode(verdict.grant).decode(),
        ATTESTATION_META_KEY: base64.b64encode(document).decode(),
    }
    swapped = payment("0.25", now_s=int(time.time()), nonce=secrets.token_hex(8))
    async with _client(research_url) as host:
        for sent in (swapped, None):
            with pytest.raises(MCPError) as refused:
                extra = {X402_META_KEY: sent} if sent is not None else {}
                await host.call_tool("deep_search", {"query": "attestation"}, meta={**meta, **extra})  # type: ignore[arg-type]
            assert refused.value.error.code == GRANT_REFUSED, refused.value.error
            assert isinstance(refused.value.error.data, dict)
            assert refused.value.error.data["reason"] == "wrong-payment"
        # The grant is good for exactly the payment the enclave charged, once.
        ok = await host.call_tool("deep_search", {"query": "attestation"}, meta={**meta, X402_META_KEY: charged})  # type: ignore[arg-type]
        assert not ok.is_error
        with pytest.raises(MCPError) as again:
            await host.call_tool("deep_search", {"query": "attestation"}, meta={**meta, X402_META_KEY: charged})  # type: ignore[arg-type]
        assert isinstance(again.value.error.data, dict) and again.value.error.data["reason"] == "replayed"


def test_a_paid_call_with_a_mismatched_payment_is_refused_by_the_upstream(tmp_path: Path) -> None:
    state = ensure_state(tmp_path / "state", bundle_source=_bundle(tmp_path / "bundle"), witnessed=False)
    sock = tmp_path / "enclave.vsock"
    enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp_path / "enclave.log")
    pcr0 = mock_pcrs(load_config(state.enclave_config, mock_nsm=True).raw)[0].hex()
    research_port, relay_port = free_port(), free_port()
    research = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloister.dev.examples.research",
            "--port",
            str(research_port),
            "--trust-root",
            str(state.mock_root),
            "--expect-pcr0",
            pcr0,
            "--nonces",
            str(tmp_path / "research-nonces"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "research.log").open("ab"),
        start_new_session=True,
    )
    research_url = f"http://127.0.0.1:{research_port}/mcp"
    config = write_relay_config(
        tmp_path / "relay.toml",
        port=relay_port,
        sock=sock,
        upstreams=f'\n[[upstreams]]\nname = "research"\nurl = "{research_url}"\ntimeout_s = 10\n',
    )
    relay = start_relay(config, tmp_path / "relay.log")
    relay_url = f"http://127.0.0.1:{relay_port}"
    try:
        wait_for(
            lambda: (
                relay.poll() is not None or _health(relay_url)["upstreams"].get("research", {}).get("state") == "up"
            ),
            90,
            "the relay and the research upstream",
        )
        assert relay.poll() is None, (tmp_path / "relay.log").read_text()[-3000:]
        anyio.run(_agent_pays, f"{relay_url}/mcp", state.mint_token("research-bot", ["research-agent"], 600))
        anyio.run(_host_swaps_the_payment, state, sock, research_url, tmp_path / "host-run")
        log = (tmp_path / "research.log").read_text()
        assert "wrong-payment" in log and "replayed" in log
    finally:
        stop(relay)
        stop(research)
        stop(enclave)
