"""`cloister up` with its two local witnesses: after some calls the relay's checkpoints are
cosigned by both, `cloister audit checkpoint --witness ... --quorum 2` verifies and reports them,
and a wrongly pinned witness key fails the audit."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import anyio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from cloister.dev.mcp_http import mcp_http_client
from cloister.verify.cosignature import Ed25519Cosigner
from tests.e2e.procs import stop, wait_for


def _health(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            body: dict[str, Any] = json.loads(r.read())
            return body
    except OSError:
        return {}


async def _calls(mcp_url: str, token: str, n: int) -> None:
    http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with Client(streamable_http_client(mcp_url, http_client=http), cache=None) as c:
        for i in range(n):
            await c.call_tool("research___web_search", {"query": f"witness {i}"})


def _audit(up: dict[str, Any], tmp: Path, witnesses: list[str], quorum: int) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cloister.cli", "audit", "checkpoint", "--log", up["log_url"]]
    argv += ["--trust-root", up["trust_root"], "--expect-pcr", f"0={up['pcr0']}", "--state", str(tmp / "audit")]
    for w in witnesses:
        argv += ["--witness", w]
    argv += ["--quorum", str(quorum)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_up_witnesses_cosign_and_the_audit_checks_them(tmp_path: Path) -> None:
    state = tmp_path / "state"
    out = (tmp_path / "up.out").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloister.cli", "up", "--state", str(state), "--port", "0"],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or "Press Ctrl-C" in (tmp_path / "up.out").read_text(), 120, "cloister up"
        )
        assert proc.poll() is None, (tmp_path / "up.out").read_text()[-3000:]
        printed = (tmp_path / "up.out").read_text()
        up = json.loads((state / "up.json").read_text())
        assert len(up["witnesses"]) == 2 and up["witness_quorum"] == 2
        pinned = [f"{w['name']}={w['vkey']}" for w in up["witnesses"]]
        for w in up["witnesses"]:
            assert w["vkey"] in printed and f"--witness {w['name']}={w['vkey']}" in printed
            assert not Path(state / "witnesses").is_relative_to(state / "log")
        token = (Path(up["tokens"]["research-bot"]).read_text()).strip()
        anyio.run(_calls, up["mcp_url"], token, 3)
        relay = up["log_url"].removesuffix("/log")

        def cosigned() -> bool:
            h = _health(relay)
            sizes = [w["witnessed_size"] for w in h.get("witnessing", {}).get("witnesses", {}).values()]
            return len(sizes) == 2 and all(s == h["log_size"] for s in sizes) and h["log_size"] >= 9

        wait_for(cosigned, 30, "both witnesses to cosign the log after the calls")

        good = _audit(up, tmp_path, pinned, 2)
        assert good.returncode == 0, good.stdout + good.stderr
        assert "cosigned by 2 of 2 pinned witnesses (quorum 2)" in good.stdout
        for w in up["witnesses"]:
            assert f"    {w['name']}  at 20" in good.stdout  # ISO timestamps

        # A wrong key pinned under the second witness's name: the quorum of 2 is not met.
        name = up["witnesses"][1]["name"]
        impostor = Ed25519Cosigner(name, Ed25519PrivateKey.generate()).vkey
        bad = _audit(up, tmp_path, [pinned[0], f"{name}={impostor}"], 2)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "FAILED: witnesses: checkpoint is cosigned by 1 of the 2 witnesses required" in bad.stderr
        assert f"missing: {name}" in bad.stderr
        # One of them is enough when the auditor asks for one.
        one = _audit(up, tmp_path, [pinned[0], f"{name}={impostor}"], 1)
        assert one.returncode == 0, one.stdout + one.stderr
        assert "cosigned by 1 of 2 pinned witnesses (quorum 1)" in one.stdout
    finally:
        stop(proc)
        out.close()
