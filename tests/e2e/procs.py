"""Helpers for end-to-end tests: real processes on real sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cloister.dev.proc import stop_group


def start_enclave(
    state_root: Path, listen: str, *, log: Path, cwd: Path | None = None
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start the enclave (`python -m cloister.dev.enclave`, mock NSM) and wait for its ready line (`cwd`: run that code)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloister.dev.enclave",
            "--listen",
            listen,
            "--config",
            str(state_root / "enclave.toml"),
            "--mock-nsm",
            str(state_root / "mock-nsm"),
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        start_new_session=True,
    )
    ready: dict[str, Any] = {}

    def read() -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line:
            ready.update(json.loads(line))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(60)
    if not ready:
        proc.kill()
        raise RuntimeError(f"enclave did not start; see {log}: {log.read_text()[-2000:]}")
    return proc, ready


def write_relay_config(path: Path, *, port: int, sock: Path, extra: str = "", upstreams: str = "") -> Path:
    """Write a relay config for the dev state next to `path`: `extra` adds `[relay]` keys, `upstreams` tables."""
    path.write_text(f"""[relay]
listen = "127.0.0.1:{port}"
enclave = "unix:{sock}"
bundle = "state/bundle.signed"
storage = "state/log"
run_dir = "run"
{extra}{upstreams}""")
    return path


def start_relay(config: Path, log: Path, *, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `python -m cloister.cli relay` in its own process group (`cwd`: run that code)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cloister.cli", "relay", "--config", str(config)],
        cwd=cwd,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    stop_group(proc, sig, timeout)


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")
