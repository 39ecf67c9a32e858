"""The relay with real processes and the official MCP client: every failure is a clear error,
nothing is forwarded without an allow, and nothing is acknowledged without a log entry."""

from __future__ import annotations

import signal
import time
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from cloister.dev.mcp_http import mcp_http_client
from cloister.relay.call_path import DENIAL_META_KEY
from cloister.verify.entries import DecisionEntry, OutcomeEntry, parse_entry
from tests.e2e.conftest import ADMIN_TOKEN, Stack
from tests.e2e.procs import stop, wait_for


def client(stack: Stack, token: str | None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    http = mcp_http_client(headers=headers)
    return Client(streamable_http_client(stack.mcp_url, http_client=http), cache=None)


def run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)


async def _call(stack: Stack, token: str | None, tool: str, args: dict[str, Any]) -> Any:
    # Catch inside the client's task group, so the error is not wrapped in an ExceptionGroup.
    async with client(stack, token) as c:
        try:
            return await c.call_tool(tool, args)
        except MCPError as exc:
            return exc


def call(stack: Stack, token: str | None, tool: str, args: dict[str, Any]) -> Any:
    result = run(_call, stack, token, tool, args)
    if isinstance(result, MCPError):
        raise result
    return result


def denied(stack: Stack, token: str | None, tool: str, args: dict[str, Any]) -> MCPError:
    """The refusal of a call, as an MCPError: a JSON-RPC error, or a denial result (decision 0018:
    isError, the error's code and data in `_meta["dev.cloister/denial"]`)."""
    before = len(stack.forwarded())
    try:
        result = call(stack, token, tool, args)
    except MCPError as exc:
        err = exc
    else:
        data = (result.meta or {}).get(DENIAL_META_KEY)
        assert result.is_error and isinstance(data, dict), f"not refused: {result}"
        err = MCPError(data["error_code"], result.content[0].text, data=data)
    assert len(stack.forwarded()) == before, "a refused call reached the upstream"
    return err


def entry_at(stack: Stack, index: int) -> Any:
    # Read the entry back through the relay's own log API (bundles are published on demand).
    with httpx2.Client() as h:
        att = h.get(f"{stack.relay_url}/log/attestation", params={"nonce": "00" * 16}).json()
        size = int(att["checkpoint"].splitlines()[1])
        assert index < size
        n = index // 256
        width = min(256, size - n * 256)
        path = f"tile/entries/{n:03d}" + (f".p/{width}" if width < 256 else "")
        data = h.get(f"{stack.relay_url}/log/{path}").content
    from cloister.verify.tiles import parse_entry_bundle

    return parse_entry(parse_entry_bundle(data)[index % 256])


def test_allowed_call_is_forwarded_with_a_grant_and_logged(stack: Stack) -> None:
    result = call(stack, stack.token(), "slow___echo", {"text": "hello"})
    assert not result.is_error and result.content[0].text == "hello"
    meta = result.meta["dev.cloister/log"]
    decision, outcome = entry_at(stack, meta["decision"]), entry_at(stack, meta["outcome"])
    assert isinstance(decision, DecisionEntry) and decision.decision == "allow" and decision.agent == "test-bot"
    assert isinstance(outcome, OutcomeEntry) and outcome.decision_index == meta["decision"] and not outcome.error
    assert stack.forwarded()[-1] == {"tool": "echo", "args": {"text": "hello"}}


def test_bodies_are_not_served_without_an_auditor_token_and_can_be_redacted(stack: Stack) -> None:
    # This relay has an admin token but no auditor token: reading bodies is disabled for everyone.
    meta = call(stack, stack.token(), "slow___echo", {"text": "card 4242"}).meta["dev.cloister/log"]
    decision = entry_at(stack, meta["decision"])
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for headers in ({}, admin, {"Authorization": f"Bearer {stack.token()}"}):
        body = httpx2.get(f"{stack.relay_url}/log/body/{meta['decision']}/args", headers=headers)
        assert body.status_code == 403 and "auditor_token_file" in body.json()["error"]
        assert "4242" not in body.text
    # Redaction (of what is stored) needs the admin token.
    url = f"{stack.relay_url}/admin/redact/{meta['decision']}/args"
    assert httpx2.post(url).status_code == 401
    assert httpx2.post(url, headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    r = httpx2.post(url, headers=admin)
    assert r.status_code == 200 and r.json()["redacted"] is True
    assert entry_at(stack, meta["decision"]) == decision  # the log is untouched
    assert httpx2.post(f"{stack.relay_url}/admin/redact/999999/args", headers=admin).status_code == 404


def test_tools_list_is_filtered_per_agent(stack: Stack) -> None:
    async def names(token: str) -> list[str]:
        async with client(stack, token) as c:
            return sorted(t.name for t in (await c.list_tools()).tools)

    assert run(names, stack.token()) == ["slow___crash", "slow___echo", "slow___sleep"]
    assert run(names, stack.token("refund-bot", ["refund-agent"])) == []  # no refunds upstream on this relay


@pytest.mark.parametrize(
    ("token", "code", "text"),
    [
        (lambda s: s.token(ttl=-100), -32003, "expired"),
        (lambda s: s.token()[:-6] + "AAAAAA", -32003, "bad-signature"),
        (lambda s: "not.a.jwt", -32003, "malformed"),
        (lambda s: s.token("mallory", ["tester"]), -32001, "not registered"),
        (lambda s: s.token("test-bot", ["refund-agent"]), -32003, "does not grant role"),
    ],
)
def test_bad_tokens(stack: Stack, token: Any, code: int, text: str) -> None:
    err = denied(stack, token(stack), "slow___echo", {"text": "x"})
    assert err.code == code and text in err.message
    assert isinstance(entry_at(stack, err.data["log_index"]), DecisionEntry)


def test_missing_token_is_refused_at_the_door(stack: Stack) -> None:
    r = httpx2.post(
        stack.mcp_url,
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Accept": "application/json, text/event-stream"},
    )
    assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"]
    assert "Authorization: Bearer" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("tool", "args", "text"),
    [
        ("ghost___echo", {"text": "x"}, "server 'ghost' is not in the policy bundle"),
        ("slow___rm_rf", {}, "tool 'rm_rf' is not a tool of server 'slow'"),
        ("echo", {"text": "x"}, "server '' is not in the policy bundle"),
        ("slow___echo", {"text": "x" * 5000}, "exceeds the limit of 4096 bytes"),
    ],
)
def test_unknown_server_tool_and_oversize_arguments(stack: Stack, tool: str, args: dict[str, Any], text: str) -> None:
    err = denied(stack, stack.token(), tool, args)
    assert err.code == -32001 and text in err.message
    assert isinstance(entry_at(stack, err.data["log_index"]), DecisionEntry)


def test_arguments_over_the_relay_limit_never_leave_the_relay(stack: Stack) -> None:
    err = denied(stack, stack.token(), "slow___echo", {"text": "x" * 70_000})
    assert err.code == -32602 and "at most 65536" in err.message


def test_malformed_json_rpc(stack: Stack) -> None:
    headers = {
        "Authorization": f"Bearer {stack.token()}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    for body in (b"{not json", b'{"jsonrpc": "2.0", "id": 1}', b"[]", b'{"jsonrpc": "1.0", "method": 5}'):
        r = httpx2.post(stack.mcp_url, content=body, headers=headers)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert r.json()["error"]["code"] in (-32700, -32600, -32602), r.text
    assert stack.health()["ready"] is True


def test_upstream_hang_is_a_timeout_reported_and_logged(stack: Stack) -> None:
    err = denied_after_forward(stack, "slow___sleep", {"seconds": 30})
    assert err.code == -32005 and "did not answer within 2s" in err.message
    outcome = entry_at(stack, err.data["outcome"])
    assert isinstance(outcome, OutcomeEntry) and "did not answer" in outcome.error


def test_upstream_crash_is_reported_logged_and_recovered(stack: Stack) -> None:
    err = denied_after_forward(stack, "slow___crash", {})
    assert err.code == -32005
    assert isinstance(entry_at(stack, err.data["outcome"]), OutcomeEntry)
    wait_for(lambda: stack.health()["upstreams"]["slow"]["state"] == "up", 30, "the upstream to be relaunched")
    assert call(stack, stack.token(), "slow___echo", {"text": "back"}).content[0].text == "back"


def denied_after_forward(stack: Stack, tool: str, args: dict[str, Any]) -> MCPError:
    before = len(stack.forwarded())
    with pytest.raises(MCPError) as err:
        call(stack, stack.token(), tool, args)
    assert len(stack.forwarded()) == before + 1
    return err.value


def test_policy_push_is_verified_by_the_enclave(stack: Stack) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from cloister.enclave.bundle import read_bundle_dir
    from cloister.verify.bundle import sign_bundle

    files = read_bundle_dir(stack.state.bundle_dir)
    url = f"{stack.relay_url}/admin/policy"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    origin, not_after = stack.state.origin(), int(time.time()) + 86400

    def sign(version: int, key: ed25519.Ed25519PrivateKey) -> bytes:
        return sign_bundle(files, version, key, origin=origin, not_after=not_after)

    assert httpx2.post(url, content=sign(2, stack.state.admin_key())).status_code == 401  # no admin token
    ok = httpx2.post(url, content=sign(2, stack.state.admin_key()), headers=admin)
    assert ok.status_code == 200 and ok.json()["version"] == 2, ok.text
    stale = httpx2.post(url, content=sign(2, stack.state.admin_key()), headers=admin)
    assert stale.status_code == 409 and "not above the version in force" in stale.json()["error"]
    forged = httpx2.post(url, content=sign(3, ed25519.Ed25519PrivateKey.generate()), headers=admin)
    assert forged.status_code == 409 and "not a pinned admin key" in forged.json()["error"]
    garbage = httpx2.post(url, content=b"\x00" * 100, headers=admin)
    assert garbage.status_code == 409 and "COSE_Sign1" in garbage.json()["error"]
    assert stack.health()["enclave"]["policy_version"] == 2
    # Calls still work under the new version.
    assert call(stack, stack.token(), "slow___echo", {"text": "v2"}).content[0].text == "v2"


def test_enclave_down_fails_closed_then_recovers_by_resuming_the_log(stack: Stack) -> None:
    first = call(stack, stack.token(), "slow___echo", {"text": "before"}).meta["dev.cloister/log"]
    stop(stack.enclave, signal.SIGKILL)
    err = denied(stack, stack.token(), "slow___echo", {"text": "while down"})
    assert err.code == -32004 and "fail closed" in err.message
    stack.restart_enclave()
    wait_for(lambda: stack.health().get("ready") is True, 30, "the relay to re-initialise the enclave")

    def works() -> bool:
        try:
            return bool(call(stack, stack.token(), "slow___echo", {"text": "after"}).content[0].text == "after")
        except MCPError:
            return False

    wait_for(works, 30, "calls to succeed after the enclave restart")
    after = call(stack, stack.token(), "slow___echo", {"text": "after"}).meta["dev.cloister/log"]
    assert after["decision"] > first["outcome"]  # the same log continues
    with httpx2.Client() as h:
        checkpoint = h.get(f"{stack.relay_url}/log/attestation", params={"nonce": "11" * 16}).json()["checkpoint"]
    assert int(checkpoint.splitlines()[1]) > after["outcome"]
    # The restarted enclave got the newest bundle (pushed as version 2), not the configured one.
    assert stack.health()["enclave"]["policy_version"] == 2
