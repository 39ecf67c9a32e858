"""A real crash: SIGKILL a process that is persisting, then check every acknowledgment held."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cloister.relay.storage import LocalBackend, LogStore
from tests.relay.storage.conftest import FakeLog, entry

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("acks_before_kill", [3, 40, 150])
def test_kill_9_loses_no_acknowledged_entry(tmp_path: Path, acks_before_kill: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.relay.storage.crash_child", str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    assert child.stdout is not None
    acked = 0
    try:
        for _ in range(acks_before_kill):
            line = child.stdout.readline()
            assert line, "the child stopped early"
            acked = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    store = LogStore.open(LocalBackend(tmp_path), verify="full")
    assert store.durable_size >= acked > 0
    size = store.durable_size
    assert store.read_entries(0, size) == [entry(i, 100) for i in range(size)]
    expected = FakeLog()
    expected.add([entry(i, 100) for i in range(size)])
    assert store.latest_checkpoint() == expected.checkpoint()
    assert store.published_size == size  # materialized on open
    store.close()
