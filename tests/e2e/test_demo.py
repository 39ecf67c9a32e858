"""The demo is the main job: `cloister up` with real processes, two agents through the official
MCP client, and an attested audit of every call. It must pass as the README says."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_passes(tmp_path: Path) -> None:
    # The script a newcomer runs, not the module behind it (a stale module path once broke it).
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo"), "--state", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    text = out.stdout
    assert "research-bot sees ['research___deep_search', 'research___web_search']" in text
    assert "payment required" in text and "research-daily-payments" in text
    assert "refund-bot-hourly-refunds" in text and "approvals-need-a-supervisor" in text
    assert "grant refused (missing)" in text
    assert "entries proven against the attested checkpoint" in text
    assert "refunds   nitro verified" in text and "refunds   nitro failed" in text  # redeployed code: quarantined
    assert "replay verified: every entry decodes, the tree matches the signed checkpoint" in text
    # The attested refunds server signed every result; the replay checked each signature again.
    signatures = next(line for line in text.splitlines() if "upstream response signatures:" in line)
    assert " verified (" in signatures and "missing" not in signatures and "invalid" not in signatures, signatures
    assert "Everything behaved as the scenario says" in text
    # Every process `cloister up` started has stopped.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps
