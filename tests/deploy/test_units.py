"""deploy/systemd units verify with `systemd-analyze verify`, and the helpers they run behave.

The units are verified in a scratch root holding the system's own unit files, a stand-in for
nitro-enclaves-allocator.service (shipped by aws-nitro-enclaves-cli, absent here) and stub
executables at the paths the units name; any warning fails the test. The enclave runner and the
readiness wait are run as real processes against a stub nitro-cli and a real HTTP server.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
SYSTEM_UNITS = Path("/lib/systemd/system")


def unit_root(tmp: Path) -> Path:
    root = tmp / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system/nitro-enclaves-allocator.service").write_text(
        "[Unit]\nDescription=stand-in\n[Service]\nType=oneshot\nExecStart=/usr/bin/nitro-cli\n"
    )
    for unit in UNITS:
        text = unit.read_text()
        (root / "etc/systemd/system" / unit.name).write_text(text)
        for exe in re.findall(r"^Exec\w+=[-@!+]*(/\S+)", text, re.M):
            stub = root / exe.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None or not SYSTEM_UNITS.is_dir():
        pytest.skip("systemd-analyze is not available here")
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *(u.name for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_units_verify(tmp_path: Path) -> None:
    r = verify(unit_root(tmp_path))
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", r.stdout + r.stderr


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (("Restart=always", "Restart=sometimes"), "Failed to parse service restart specifier"),
        (("[Install]", "Bogus=1\n[Install]"), "Unknown key"),
        (
            ("ExecStart=/opt/cloister/venv/bin/cloister relay", "ExecStart=/nonexistent/cloister relay"),
            "not executable",
        ),
    ],
)
def test_verify_catches_broken_units(tmp_path: Path, edit: tuple[str, str], complaint: str) -> None:
    root = unit_root(tmp_path)
    relay = root / "etc/systemd/system/cloister-relay.service"
    relay.write_text(relay.read_text().replace(*edit, 1))
    r = verify(root)
    assert complaint in r.stderr, r.stderr


def settings(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (ROOT / "deploy/systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_units_wire_restart_readiness_and_credentials() -> None:
    enclave, relay, witness = (settings(f"cloister-{n}.service") for n in ("enclave", "relay", "witness"))
    assert enclave["Restart"] == ["always"] and enclave["Upholds"] == ["cloister-relay.service"]
    assert enclave["SupplementaryGroups"] == ["ne"] and enclave["User"] == ["cloister"]
    assert relay["BindsTo"] == ["cloister-enclave.service"] and "cloister-enclave.service" in relay["After"][0]
    assert relay["ExecStartPost"] == ["/opt/cloister/src/deploy/bin/wait-ready http://127.0.0.1:8440 180"]
    assert relay["LoadCredential"] == [
        "admin.token:/etc/cloister/secrets/admin.token",
        "auditor.token:/etc/cloister/secrets/auditor.token",
    ]
    relay_toml = (ROOT / "deploy/relay.toml").read_text()
    for name in ("admin.token", "auditor.token"):
        assert f'"/run/credentials/cloister-relay.service/{name}"' in relay_toml
    assert "127.0.0.1:8440" in relay_toml
    assert witness["StateDirectoryMode"] == ["0700"] and witness["Restart"] == ["always"]


# --- deploy/bin/cloister-enclave-run ------------------------------------------------------------


def stub_nitro(tmp: Path, states: list[str]) -> Path:
    """A nitro-cli that records its calls and reports the enclave's state from `states`, in turn."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (tmp / "states").write_text("\n".join(states) + "\n")
    (bin_dir / "nitro-cli").write_text(
        f"""#!/usr/bin/env bash
echo "$*" >> "{tmp}/calls"
if [[ "$1" == describe-enclaves ]]; then
  state=$(head -n 1 "{tmp}/states"); [[ $(wc -l < "{tmp}/states") -gt 1 ]] && sed -i 1d "{tmp}/states"
  if [[ "$state" == absent ]]; then echo "[]"; else
  echo "[{{\\"EnclaveName\\": \\"cloister\\", \\"EnclaveCID\\": 16, \\"State\\": \\"$state\\", \\"Flags\\": \\"NONE\\"}}]"; fi
fi
"""
    )
    (bin_dir / "nitro-cli").chmod(0o755)
    return bin_dir


def run_enclave(tmp: Path, states: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    eif = tmp / "cloister.eif"
    eif.write_text("eif")
    bin_dir = stub_nitro(tmp, states)
    full = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "EIF": str(eif),
        "CPU_COUNT": "2",
        "MEMORY_MIB": "2048",
        "CID": "16",
        "POLL_S": "0.05",
        **env,
    }
    return subprocess.run(
        [str(ROOT / "deploy/bin/cloister-enclave-run")], capture_output=True, text=True, timeout=60, env=full
    )


def test_enclave_runner_exits_when_the_enclave_dies(tmp_path: Path) -> None:
    r = run_enclave(tmp_path, ["RUNNING", "RUNNING", "RUNNING", "absent"])
    assert r.returncode == 1 and "enclave cloister is absent; exiting so systemd restarts it" in r.stderr, r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "terminate-enclave --enclave-name cloister"
    assert (
        calls[1]
        == f"run-enclave --enclave-name cloister --eif-path {tmp_path}/cloister.eif --cpu-count 2 --memory 2048 --enclave-cid 16"
    )
    assert calls.count("describe-enclaves") == 4
    assert not any("--debug-mode" in c for c in calls)


def test_enclave_runner_refuses_without_an_eif(tmp_path: Path) -> None:
    r = run_enclave(tmp_path, ["RUNNING"], EIF=str(tmp_path / "missing.eif"))
    assert r.returncode == 2 and "cannot read the EIF" in r.stderr
    assert not (tmp_path / "calls").exists()


def test_enclave_runner_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    eif = tmp_path / "cloister.eif"
    eif.write_text("eif")
    bin_dir = stub_nitro(tmp_path, ["RUNNING"])
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "EIF": str(eif), "CPU_COUNT": "2"}
    env |= {"MEMORY_MIB": "2048", "CID": "16", "POLL_S": "0.05"}
    proc = subprocess.Popen([str(ROOT / "deploy/bin/cloister-enclave-run")], env=env, stderr=subprocess.PIPE, text=True)
    calls = tmp_path / "calls"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not calls.exists() or calls.read_text().count("describe-enclaves") < 2):
        time.sleep(0.05)
    assert proc.poll() is None, "the runner exited while the enclave was running"
    proc.terminate()
    assert proc.wait(timeout=30) == 0


# --- deploy/bin/wait-ready --------------------------------------------------------------------


class Relay(ThreadingHTTPServer):
    answers: dict[str, list[int]]


class Handler(BaseHTTPRequestHandler):
    server: Relay

    def do_GET(self) -> None:
        codes = self.server.answers.get(self.path, [404])
        code = codes.pop(0) if len(codes) > 1 else codes[0]
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def relay() -> Iterator[Relay]:
    server = Relay(("127.0.0.1", 0), Handler)
    server.answers = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def wait_ready(relay: Relay, timeout: int) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    url = f"http://127.0.0.1:{relay.server_address[1]}"
    return subprocess.run(
        [str(ROOT / "deploy/bin/wait-ready"), url, str(timeout)], capture_output=True, text=True, timeout=60
    )


def test_wait_ready_waits_for_readyz(relay: Relay) -> None:
    relay.answers = {"/readyz": [503, 503, 200]}
    r = wait_ready(relay, 20)
    assert r.returncode == 0 and "/readyz is ready" in r.stdout, r.stderr


def test_wait_ready_falls_back_to_healthz_on_a_relay_without_readyz(relay: Relay) -> None:
    relay.answers = {"/healthz": [503, 200]}
    r = wait_ready(relay, 20)
    assert r.returncode == 0 and "/healthz is ready" in r.stdout, r.stderr


def test_wait_ready_gives_up(relay: Relay) -> None:
    relay.answers = {"/readyz": [503]}
    r = wait_ready(relay, 2)
    assert r.returncode == 1 and "not ready after 2s (last status 503)" in r.stderr, r.stderr
