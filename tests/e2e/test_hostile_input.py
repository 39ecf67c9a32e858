"""Hostile input through the real relay (issue 9, item 1): an unauthenticated request whose token
claims are thousands of characters long, long unknown names, a flood of anonymous requests. The
log they leave must replay (`cloister audit replay`), and the enclave must restart on it."""

from __future__ import annotations

import base64
import json
import signal
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from tests.audit.clirun import cli
from tests.e2e.conftest import Stack, stack  # noqa: F401 (the module-scoped fixture)
from tests.e2e.procs import stop, wait_for
from tests.e2e.test_relay import call, denied


def _b64(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode("ascii")


def unsigned(header: object, claims: object) -> str:
    return f"{_b64(header)}.{_b64(claims)}.{_b64('not a signature')}"


def _works(s: Stack) -> bool:
    try:
        return bool(call(s, s.token(), "slow___echo", {"text": "after"}).content[0].text == "after")
    except MCPError:
        return False


def _replay(s: Stack, auditor: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for log in (s.relay_url, str(s.state.log_dir)):  # over HTTP, and the storage directory itself
        r = cli("audit", "replay", "--log", log, "--trust-root", "mock", *auditor, "--no-progress", "--json")
        assert r.code == 0, r.err
        out = json.loads(r.out)
    return out


def test_long_token_claims_leave_a_log_that_replays_and_restarts(
    stack: Stack,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLOISTER_STATE", str(stack.state.root))  # --trust-root mock: the stack's mock CA
    auditor = ["--state", str(tmp_path / "auditor")]
    hostile = [
        unsigned({"alg": "EdDSA"}, {"iss": "x" * 5000}),
        unsigned({"alg": "EdDSA", "kid": "k" * 4000}, {"iss": "cloister-dev"}),
        unsigned({"alg": "EdDSA"}, {"iss": "cloister-dev", "aud": ["a" * 2000] * 2, "sub": "é" * 1000}),
    ]
    for token in hostile:
        err = denied(stack, token, "slow___echo", {"text": "x"})
        assert err.code == -32003 and len(err.message) < 5000
    # An agent's long unknown tool name, and a flood of anonymous requests beyond the enclave's
    # budget of individual entries: every one is denied, nothing is forwarded.
    assert denied(stack, stack.token(), "slow___" + "t" * 3000, {}).code == -32001
    for i in range(15):
        assert denied(stack, f"garbage-{i}", "slow___echo", {"text": "x"}).code == -32003
    assert _works(stack)
    summary = _replay(stack, auditor)
    denials = summary["denials_by_code"]
    assert isinstance(denials, dict) and denials["unknown-tool"] == 1 and denials["unauthenticated"] >= 10

    # The enclave dies; a new one resumes the same stored log (its resume scan parses every entry).
    stop(stack.enclave, signal.SIGKILL)
    stack.restart_enclave()
    wait_for(lambda: stack.health().get("ready") is True, 30, "the relay to re-initialise the enclave")
    wait_for(lambda: _works(stack), 30, "calls to succeed after the enclave restart")
    summary = _replay(stack, auditor)
    keys = summary["key_introductions"]
    assert isinstance(keys, list) and [k["verified"] for k in keys] == [True, True]
