"""`cloister up` on a dev log written before the sealed log key (issue 10): one clear line, no start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cloister.cli.up import unsealable_log
from cloister.relay.lifecycle import SEALED_SEED_OBJECT


def _old_log(log_dir: Path) -> None:
    """The layout a log of per-start keys left: WAL frames and meta, no kms/sealed-seed."""
    (log_dir / "wal").mkdir(parents=True)
    (log_dir / "wal" / "00000000000000000000").write_bytes(b"frame")
    (log_dir / "meta").mkdir()


def test_a_log_without_a_sealed_seed_is_named_with_how_to_start_fresh(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    _old_log(log_dir)
    why = unsealable_log(log_dir)
    assert why is not None and "cannot be resumed" in why and f"mv {log_dir}" in why and "\n" not in why


def test_an_empty_log_or_one_with_its_sealed_seed_is_fine(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    assert unsealable_log(log_dir) is None
    (log_dir / "wal").mkdir(parents=True)
    assert unsealable_log(log_dir) is None  # a directory made by ensure_state, nothing stored
    _old_log(tmp_path / "sealed")
    (tmp_path / "sealed" / SEALED_SEED_OBJECT).parent.mkdir()
    (tmp_path / "sealed" / SEALED_SEED_OBJECT).write_bytes(b"blob")
    assert unsealable_log(tmp_path / "sealed") is None


def test_cloister_up_says_so_in_one_line_and_starts_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _old_log(state / "log")
    proc = subprocess.run(
        [sys.executable, "-m", "cloister.cli", "up", "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CLOISTER_STATE": str(state)},
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cloister up: the log in ") and "cannot be resumed" in lines[0]
    assert not (state / "logs").exists()  # no process was started
