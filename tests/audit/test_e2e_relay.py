"""The auditor against the real stack: the enclave process (mock NSM), the relay process and the
storage it writes, through a restart of the enclave (a resumed log with a second key entry)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from tests.audit.clirun import cli
from tests.e2e.conftest import Stack, stack  # noqa: F401 (the module-scoped fixture)
from tests.e2e.procs import stop, wait_for
from tests.e2e.test_relay import call, denied


def _works(s: Stack) -> bool:
    try:
        return bool(call(s, s.token(), "slow___echo", {"text": "after"}).content[0].text == "after")
    except MCPError:
        return False


def test_the_relay_log_verifies_end_to_end(
    stack: Stack,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLOISTER_STATE", str(stack.state.root))  # --trust-root mock: the stack's mock CA
    state = ["--state", str(tmp_path / "state")]
    url = ["--log", stack.relay_url, "--trust-root", "mock", *state]
    first = call(stack, stack.token(), "slow___echo", {"text": "audited"}).meta["dev.cloister/log"]
    denied(stack, stack.token(), "slow___nope", {})

    r = cli("audit", "checkpoint", *url)
    assert r.code == 0, r.err
    r = cli("audit", "inclusion", *url, "--index", str(first["decision"]), "--bodies")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["entry"]["tool"] == "echo"
    # This relay has no auditor token: it serves bodies to no one (tests/e2e/test_bodies.py reads them).
    assert out["bodies"]["args"]["status"] == "not authorized" and "HTTP 403" in out["bodies"]["args"]["detail"]
    r = cli("audit", "receipt", *url, "--index", str(first["outcome"]))
    assert r.code == 0, r.err
    receipt = tmp_path / "receipt"
    receipt.write_bytes(r.raw)

    # The enclave dies; a new one (new keys) resumes the log; the auditor sees one append-only log.
    stop(stack.enclave, signal.SIGKILL)
    stack.restart_enclave()
    wait_for(lambda: stack.health().get("ready") is True, 30, "the relay to re-initialise the enclave")
    wait_for(lambda: _works(stack), 30, "calls to succeed after the enclave restart")
    r = cli("audit", "checkpoint", *url, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["consistency"]["status"] == "extended"

    for log in (stack.relay_url, str(stack.state.log_dir)):  # over HTTP, and the storage directory itself
        r = cli("audit", "replay", "--log", log, "--trust-root", "mock", *state, "--no-progress", "--json")
        assert r.code == 0, r.err
        out = json.loads(r.out)
        assert [k["verified"] for k in out["key_introductions"]] == [True, True]
        assert out["key_introductions"][1]["previous_size"] == out["key_introductions"][1]["index"]
        assert out["calls_by_tool"]["slow/nope"] == 1 and out["denials_by_code"] == {"unknown-tool": 1}

    # The receipt made before the restart still verifies offline, against the first enclave's attestation.
    r = cli("audit", "verify-receipt", str(receipt), "--trust-root", "mock")
    assert r.code == 0, r.err
    assert "receipt verified: entry" in r.out and '"type": "outcome"' in r.out
