"""The stack the protocol tests share (test_protocol*.py): an unwitnessed dev state with the
test's bundle, a real enclave on a UNIX socket standing in for vsock, and a real relay whose
upstreams (server-everything over stdio, and the test's own servers) the test names in relay TOML.
Also what a test reads back from the stopped relay's storage."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from cloister.dev.state import DevState, ensure_state, free_port
from cloister.relay.storage import LocalBackend, LogWriter
from cloister.verify.entries import parse_entry
from tests.audit.clirun import cli
from tests.e2e.conftest import ADMIN_TOKEN, Stack
from tests.e2e.procs import (
    let_server_everything_ask_for_roots,
    start_enclave,
    start_relay,
    stop,
    wait_for,
    write_relay_config,
)

ROOT = Path(__file__).resolve().parents[2]
EVERYTHING = ROOT / "tests/node/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
EVERYTHING_UPSTREAM = f"""
[[upstreams]]
name = "everything"
command = ["node", {json.dumps(str(EVERYTHING))}, "stdio"]
timeout_s = 20
"""


@contextmanager
def protocol_stack(
    tmp: Path, bundle: Path, upstreams: str, names: Sequence[str], calls_file: Path | None = None
) -> Iterator[Stack]:
    """Up, with each upstream in `names` connected (and server-everything's startup roots ask
    past, when it is one of them); stopped afterwards, the relay's log tail printed."""
    state: DevState = ensure_state(tmp / "state", bundle_source=bundle, witnessed=False)
    sock = tmp / "enclave.vsock"
    enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp / "enclave.log")
    port = free_port()
    (tmp / "admin.token").write_text(ADMIN_TOKEN)
    config = write_relay_config(
        tmp / "relay.toml",
        port=port,
        sock=sock,
        extra='enclave_timeout_s = 5\nadmin_token_file = "admin.token"\n',
        upstreams=upstreams,
    )
    relay = start_relay(config, tmp / "relay.log")
    s = Stack(state, f"http://127.0.0.1:{port}", calls_file or tmp / "none", enclave, relay, sock, tmp)
    try:
        wait_for(lambda: relay.poll() is not None or s.health().get("ready") is True, 60, "the relay to be ready")
        if relay.poll() is not None:
            raise RuntimeError((tmp / "relay.log").read_text()[-3000:])
        for name in names:
            wait_for(lambda n=name: s.health()["upstreams"].get(n, {}).get("state") == "up", 60, name)
        if "everything" in names:
            let_server_everything_ask_for_roots()
        yield s
    finally:
        stop(relay)
        stop(s.enclave)
        print((tmp / "relay.log").read_text()[-4000:], file=sys.stderr)


def stored_entries(log_dir: Path) -> list[Any]:
    """Every entry in a (stopped) relay's log storage, parsed."""

    async def read() -> list[Any]:
        writer = await LogWriter.open(LocalBackend(str(log_dir)))
        try:
            return [parse_entry(e) for e in await writer.read_entries(0, writer.persisted_size)]
        finally:
            await writer.close()

    return anyio.run(read)


def replayed(log: str, state_dir: Path) -> dict[str, Any]:
    """`cloister audit replay --json` of `log` (the relay's URL or its storage directory) as an
    auditor runs it, with the mock trust root; asserts it verified (exit 0) and returns its
    summary. The caller sets CLOISTER_STATE to the stack's state (monkeypatch)."""
    r = cli(
        "audit", "replay", "--log", log, "--trust-root", "mock", "--state", str(state_dir), "--no-progress", "--json"
    )
    assert r.code == 0, r.err
    summary: dict[str, Any] = json.loads(r.out)
    return summary
