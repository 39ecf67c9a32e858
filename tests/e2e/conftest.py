"""A real stack for relay tests: the enclave process (mock NSM, AF_UNIX for vsock), the relay
process, and stdio upstreams it launches. Agents use the official MCP client."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloister.dev.state import DevState, copy_example_bundle, ensure_state, free_port
from tests.e2e.procs import start_enclave, start_relay, stop, wait_for, write_relay_config

HERE = Path(__file__).parent
ADMIN_TOKEN = "test-admin-token-0123456789"


@dataclass
class Stack:
    state: DevState
    relay_url: str
    calls_file: Path
    enclave: subprocess.Popen[bytes]
    relay: subprocess.Popen[bytes]
    sock: Path
    tmp: Path

    @property
    def mcp_url(self) -> str:
        return f"{self.relay_url}/mcp"

    def token(self, agent: str = "test-bot", roles: list[str] | None = None, ttl: int = 600) -> str:
        return self.state.mint_token(agent, ["tester"] if roles is None else roles, ttl)

    def forwarded(self) -> list[dict[str, Any]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def health(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"{self.relay_url}/healthz", timeout=2) as r:
                body: dict[str, Any] = json.loads(r.read())
                return body
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
            return body
        except OSError:  # not listening yet
            return {"ready": False, "upstreams": {}}

    def restart_enclave(self) -> None:
        self.enclave, _ = start_enclave(self.state.root, f"unix:{self.sock}", log=self.tmp / "enclave.log")


def _bundle(dst: Path) -> Path:
    copy_example_bundle(dst)
    entities = (dst / "entities.toml").read_text()
    (dst / "entities.toml").write_text(
        entities.replace("[roles]\n", "[roles]\ntester = {}\n")
        + '\n[agents.test-bot]\nroles = ["tester"]\nregion = "eu"\n\n'
        '[servers.slow]\nregion = "eu"\ntools = ["echo", "sleep", "crash"]\n'
    )
    (dst / "policies" / "test.cedar").write_text(
        '@id("tester-slow")\npermit (principal in Cloister::Role::"tester", action, '
        'resource == Cloister::Server::"slow");\n'
    )
    (dst / "bundle.toml").write_text('[bundle]\nname = "e2e"\nmax_argument_bytes = 4096\n')
    return dst


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    state = ensure_state(tmp / "state", bundle_source=_bundle(tmp / "bundle"), witnessed=False)
    sock = tmp / "enclave.vsock"
    enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp / "enclave.log")
    port = free_port()
    calls = tmp / "calls.jsonl"
    (tmp / "admin.token").write_text(ADMIN_TOKEN)
    py = json.dumps(sys.executable)
    config = write_relay_config(
        tmp / "relay.toml",
        port=port,
        sock=sock,
        extra='admin_token_file = "admin.token"\nmax_argument_bytes = 65536\nenclave_timeout_s = 3\n',
        upstreams=f"""
[[upstreams]]
name = "slow"
command = [{py}, "{HERE / "slow_server.py"}"]
env = {{ CALLS_FILE = "{calls}" }}
timeout_s = 2
""",
    )
    relay = start_relay(config, tmp / "relay.log")
    s = Stack(
        state=state,
        relay_url=f"http://127.0.0.1:{port}",
        calls_file=calls,
        enclave=enclave,
        relay=relay,
        sock=sock,
        tmp=tmp,
    )
    try:
        wait_for(lambda: relay.poll() is not None or s.health().get("ready") is True, 60, "the relay to be ready")
        if relay.poll() is not None:
            raise RuntimeError((tmp / "relay.log").read_text()[-3000:])
        wait_for(lambda: s.health()["upstreams"].get("slow", {}).get("state") == "up", 30, "the slow upstream")
        yield s
    finally:
        stop(relay)
        stop(s.enclave)
