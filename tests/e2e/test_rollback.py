"""The rollback attack of issue 10, end to end with real processes: `cloister up` (KMS stand-in,
enclave, relay, two `cloister witness serve`), a copy of the log storage kept by the host, more
calls, the copy put back, and a restart. The restored log is validly signed and resumes, but the
witnesses have cosigned more: the enclave grants nothing on it and `up` says why. Putting the
newest storage back recovers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from cloister.dev.mcp_http import mcp_http_client
from tests.e2e.procs import stop, wait_for
from tests.e2e.test_witnessing import _health


async def _calls(mcp_url: str, token: str, n: int) -> None:
    http = mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with Client(streamable_http_client(mcp_url, http_client=http), cache=None) as c:
        for i in range(n):
            r = await c.call_tool("research___web_search", {"query": f"rollback {i}"})
            assert not r.is_error, r


def _up(state: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cloister.cli", "up", "--state", str(state), "--port", "0"],
        stdout=out.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _run_calls(state: Path, out: Path, n: int) -> int:
    """`up`, `n` calls, wait until both witnesses cosigned everything, stop. The log's size then."""
    proc = _up(state, out)
    try:
        wait_for(lambda: proc.poll() is not None or "Press Ctrl-C" in out.read_text(), 120, "cloister up")
        assert proc.poll() is None, out.read_text()[-3000:]
        up = json.loads((state / "up.json").read_text())
        anyio.run(_calls, up["mcp_url"], Path(up["tokens"]["research-bot"]).read_text().strip(), n)
        relay = up["log_url"].removesuffix("/log")

        def cosigned() -> bool:
            h = _health(relay)
            sizes = [w["witnessed_size"] for w in h.get("witnessing", {}).get("witnesses", {}).values()]
            return len(sizes) == 2 and all(s == h["log_size"] for s in sizes)

        wait_for(cosigned, 30, "both witnesses to cosign the whole log")
        size: int = _health(relay)["log_size"]
        return size
    finally:
        stop(proc)


def test_a_restored_copy_of_storage_is_refused_and_the_newest_recovers(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old_size = _run_calls(state, tmp_path / "up1.out", 2)
    copy = tmp_path / "host-copy"
    shutil.copytree(state / "log", copy)  # the host keeps a copy of the storage
    new_size = _run_calls(state, tmp_path / "up2.out", 3)
    newest = tmp_path / "newest"
    shutil.copytree(state / "log", newest)
    assert new_size >= old_size + 3

    # The host puts the old copy back and restarts everything.
    shutil.rmtree(state / "log")
    shutil.copytree(copy, state / "log")
    out = tmp_path / "up3.out"
    proc = _up(state, out)
    try:
        assert proc.wait(timeout=120) == 1, out.read_text()[-3000:]
    finally:
        stop(proc)
    printed = out.read_text()
    assert "refusing to continue this log: the witnesses have cosigned a larger log than storage holds" in printed
    assert "Press Ctrl-C" not in printed
    assert f"at size {new_size}" in printed  # what the witnesses had cosigned

    # The newest storage back: the witnesses see it extend what they cosigned, and calls flow.
    shutil.rmtree(state / "log")
    shutil.copytree(newest, state / "log")
    assert _run_calls(state, tmp_path / "up4.out", 1) > new_size
