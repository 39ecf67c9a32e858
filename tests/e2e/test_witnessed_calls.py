"""Witnessed calls end to end (issue 10, decision 0015), with real processes: the enclave, the relay,
two `cloister witness serve`, and a stdio upstream behind a real GrantGuard pinned to the log and
its witnesses (tests/e2e/guarded_server.py).

- Nothing is granted until the witnesses cosign the enclave's start.
- The upstream takes a call only with the key evidence the relay carries; with `wait_for_witness`
  the relay forwards a call only once its decision is cosigned, and the guard checks that too.
- Witnesses gone: after the bound the enclave pauses granting (fail closed), and a waiting call is
  not forwarded; witnesses back: calls flow again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from cloister.dev.mcp_http import mcp_http_client
from cloister.dev.measure import mock_pcrs
from cloister.dev.state import DevState, ensure_state, free_port
from cloister.enclave.config import load_config
from cloister.relay.codes import ENCLAVE_UNAVAILABLE, UPSTREAM_FAILED
from cloister.verify.key_evidence import DECISION_EVIDENCE_META_KEY, KEY_EVIDENCE_META_KEY
from tests.e2e.procs import start_enclave, start_relay, stop, wait_for, write_relay_config
from tests.e2e.test_witnessing import _health
from tests.world import decision_bundle

HERE = Path(__file__).parent
MAX_UNWITNESSED = 6


def _bundle(dst: Path) -> Path:
    decision_bundle(dst)
    entities = (dst / "entities.toml").read_text()
    (dst / "entities.toml").write_text(
        entities.replace("[roles]\n", "[roles]\ntester = {}\n")
        + '\n[agents.test-bot]\nroles = ["tester"]\nregion = "eu"\n\n'
        '[servers.guarded]\nregion = "eu"\ntools = ["echo"]\n'
    )
    (dst / "policies" / "test.cedar").write_text(
        '@id("tester-guarded")\npermit (principal in Cloister::Role::"tester", action, '
        'resource == Cloister::Server::"guarded");\n'
    )
    return dst


@dataclass
class WitnessedStack:
    state: DevState
    url: str
    tmp: Path
    witness_ports: list[int]
    witnesses: list[subprocess.Popen[bytes]]
    logs_file: Path
    enclave: subprocess.Popen[bytes] | None = None
    sock: Path | None = None

    def start_witnesses(self) -> None:
        self.witnesses = []
        for i, ((_n, directory, _v), port) in enumerate(
            zip(self.state.ensure_witnesses(), self.witness_ports, strict=True)
        ):
            argv = [sys.executable, "-m", "cloister.cli", "witness", "serve", "--state", str(directory)]
            argv += ["--listen", f"127.0.0.1:{port}", "--logs", str(self.logs_file)]
            log = (self.tmp / f"witness-{i}.log").open("ab")
            self.witnesses.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def stop_witnesses(self) -> None:
        for w in self.witnesses:
            stop(w)

    def calls(self) -> list[dict[str, Any]]:
        path = self.tmp / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def _echo(url: str, token: str, tool: str, text: str) -> Any:
    http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with Client(streamable_http_client(f"{url}/mcp", http_client=http), cache=None) as c:
        return await c.call_tool(tool, {"text": text})


def echo(s: WitnessedStack, text: str, tool: str = "guarded___echo") -> Any:
    try:
        return anyio.run(_echo, s.url, s.state.mint_token("test-bot", ["tester"]), tool, text)
    except BaseExceptionGroup as group:  # the client's task groups wrap the JSON-RPC error
        errors: list[MCPError] = []
        pending: list[BaseException] = [group]
        while pending:
            e = pending.pop()
            if isinstance(e, BaseExceptionGroup):
                pending.extend(e.exceptions)
            elif isinstance(e, MCPError):
                errors.append(e)
        if len(errors) == 1:
            raise errors[0] from None
        raise


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WitnessedStack]:
    tmp = tmp_path_factory.mktemp("witnessed")
    state = ensure_state(tmp / "state", bundle_source=_bundle(tmp / "bundle"))
    # A small bound, so the test reaches it quickly (measured: changes PCR0 like any config line).
    state.enclave_config.write_text(
        state.enclave_config.read_text() + f"max_unwitnessed_entries = {MAX_UNWITNESSED}\nmax_unwitnessed_s = 60\n"
    )
    config = load_config(state.enclave_config, mock_nsm=True)
    witness_ports = [free_port(), free_port()]
    witness_tables = "".join(
        f'\n[[witnesses]]\nname = "{name}"\nurl = "http://127.0.0.1:{port}"\nvkey = "{vkey}"\n'
        for (name, _d, vkey), port in zip(state.ensure_witnesses(), witness_ports, strict=True)
    )
    sock, port = tmp / "enclave.vsock", free_port()
    py = json.dumps(sys.executable)
    relay_config = write_relay_config(
        tmp / "relay.toml",
        port=port,
        sock=sock,
        extra="witness_quorum = 2\n",
        upstreams=f"""
[[upstreams]]
name = "guarded"
command = [{py}, "{HERE / "guarded_server.py"}"]
env = {{ CALLS_FILE = "{tmp / "calls.jsonl"}", PINS_FILE = "{tmp / "pins.json"}" }}
timeout_s = 10
wait_for_witness = true
witness_wait_s = 2
{witness_tables}""",
    )
    enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp / "enclave.log")
    relay = start_relay(relay_config, tmp / "relay.log")
    s = WitnessedStack(state, f"http://127.0.0.1:{port}", tmp, witness_ports, [], tmp / "logs.toml", enclave, sock)
    try:
        wait_for(lambda: relay.poll() is not None or _health(s.url).get("ready") is True, 90, "the relay")
        assert relay.poll() is None, (tmp / "relay.log").read_text()[-3000:]
        health = _health(s.url)
        assert (
            health["granting"] is False and "have not cosigned this enclave's start" in health["witness_gate"]["reason"]
        )
        with pytest.raises(MCPError) as refused:
            echo(s, "before the witnesses")
        assert refused.value.error.code == ENCLAVE_UNAVAILABLE and "calls are paused" in refused.value.error.message
        enclave_info = health["enclave"]
        s.logs_file.write_text(
            f'[[log]]\norigin = "{enclave_info["origin"]}"\nvkeys = ["{enclave_info["log_verifier_key"]}"]\n'
        )
        (tmp / "pins.json").write_text(
            json.dumps(
                {
                    "trust_root": str(state.mock_root),
                    "pcr0": mock_pcrs(config.raw)[0].hex(),
                    "origin": enclave_info["origin"],
                    "log_vkey": enclave_info["log_verifier_key"],
                    "witnesses": [v for _n, _d, v in state.ensure_witnesses()],
                    "quorum": 2,
                    "witnessed_decisions": True,
                }
            )
        )
        s.start_witnesses()
        wait_for(lambda: _health(s.url).get("granting") is True, 30, "the witnesses to cosign the start")
        yield s
    finally:
        s.stop_witnesses()
        stop(relay)
        if s.enclave is not None:
            stop(s.enclave)


def test_calls_carry_witness_evidence_and_the_guard_accepts_them(stack: WitnessedStack) -> None:
    started = time.monotonic()
    result = echo(stack, "hello")
    took = time.monotonic() - started
    assert not result.is_error and result.content[0].text == "hello"
    forwarded = stack.calls()[-1]
    assert KEY_EVIDENCE_META_KEY in forwarded["meta"] and DECISION_EVIDENCE_META_KEY in forwarded["meta"]
    assert took < 5, f"a witnessed call took {took:.2f}s"


def test_witnesses_gone_pauses_granting_and_their_return_resumes_it(stack: WitnessedStack) -> None:
    stack.stop_witnesses()
    before = len(stack.calls())
    # The waiting upstream: the decision is never cosigned, so the call is not forwarded.
    with pytest.raises(MCPError) as waited:
        echo(stack, "unwitnessed")
    assert waited.value.error.code == UPSTREAM_FAILED and "did not cosign decision" in waited.value.error.message
    assert len(stack.calls()) == before
    # Each call adds entries the witnesses never see: within the bound the enclave stops granting.
    codes = []
    for i in range(MAX_UNWITNESSED):
        try:
            echo(stack, f"more {i}")
        except MCPError as e:
            codes.append(e.error.code)
    assert codes[-1] == ENCLAVE_UNAVAILABLE, codes
    health = _health(stack.url)
    assert (
        health["granting"] is False
        and "entries ahead of its newest witnessed checkpoint" in (health["witness_gate"]["reason"])
    )
    assert len(stack.calls()) == before  # nothing reached the upstream meanwhile
    stack.start_witnesses()
    wait_for(lambda: _health(stack.url).get("granting") is True, 30, "granting to resume with the witnesses back")
    assert echo(stack, "back").content[0].text == "back"
    assert len(stack.calls()) == before + 1


def test_a_restarted_enclave_is_witnessed_again_and_its_new_key_accepted(stack: WitnessedStack) -> None:
    """The enclave dies and a new one starts behind the same relay: it resumes the log (a new key
    entry, a new grant key), grants nothing until the witnesses cosign that start, and the guard
    accepts its grants once the relay carries the new key's evidence."""
    assert stack.enclave is not None and stack.sock is not None
    before = _health(stack.url)["witness_gate"]["start_size"]
    stop(stack.enclave)
    stack.enclave, _ = start_enclave(stack.state.root, f"unix:{stack.sock}", log=stack.tmp / "enclave.log")

    def regranting() -> bool:
        gate = _health(stack.url).get("witness_gate") or {}
        return gate.get("start_size", before) > before and gate.get("granting") is True

    wait_for(regranting, 60, "the relay to resume the new enclave and the witnesses to cosign its start")
    calls = len(stack.calls())
    assert echo(stack, "after the restart").content[0].text == "after the restart"
    assert len(stack.calls()) == calls + 1
