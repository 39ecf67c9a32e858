"""`cloister witness init | vkey | serve`, the last one as a real process on 127.0.0.1."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cloister.cli import main
from cloister.verify.cosignature import Ed25519CosignatureVerifier, verify_cosignature_line
from cloister.verify.note import parse_note
from cloister.witness.state import WitnessState

from .harness import TestLog

LOG = TestLog("log.test/a", 1)


def test_init_prints_the_vkey_and_vkey_repeats_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "w"
    assert main(["witness", "init", "--state", str(state), "--name", "witness.test/cli"]) == 0
    vkey = capsys.readouterr().out.strip()
    assert Ed25519CosignatureVerifier.from_vkey(vkey).name == "witness.test/cli"
    assert main(["witness", "vkey", "--state", str(state)]) == 0
    assert capsys.readouterr().out.strip() == vkey
    assert main(["witness", "init", "--state", str(state), "--name", "witness.test/cli"]) == 1
    assert "initialised" in capsys.readouterr().err
    # vkey reads the key without taking the state's lock: it works while a witness serves.
    held = WitnessState.open(state, [])
    try:
        assert main(["witness", "vkey", "--state", str(state)]) == 0
        assert capsys.readouterr().out.strip() == vkey
    finally:
        held.close()


def test_serve_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "w"
    logs = tmp_path / "logs.toml"
    logs.write_text(f'[[log]]\norigin = "{LOG.origin}"\nvkeys = ["{LOG.vkey}"]\n')
    serve = ["witness", "serve", "--state", str(state), "--logs", str(logs), "--listen"]
    assert main([*serve, "127.0.0.1"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main([*serve, "127.0.0.1:0"]) == 1
    assert "run `cloister witness init` first" in capsys.readouterr().err
    assert main(["witness", "init", "--state", str(state), "--name", "witness.test/cli"]) == 0
    logs.write_text("[[log]]\n")
    assert main([*serve, "127.0.0.1:0"]) == 1
    assert "needs origin" in capsys.readouterr().err


def test_serve_cosigns_over_http(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "w"
    assert main(["witness", "init", "--state", str(state), "--name", "witness.test/cli"]) == 0
    witness = Ed25519CosignatureVerifier.from_vkey(capsys.readouterr().out.strip())
    logs = tmp_path / "logs.toml"
    logs.write_text(f'[[log]]\norigin = "{LOG.origin}"\nvkeys = ["{LOG.vkey}"]\n')
    argv = ["witness", "serve", "--state", str(state), "--listen", "127.0.0.1:0", "--logs", str(logs)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloister.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline() if proc.stdout else ""))
        reader.start()
        reader.join(timeout=20)
        assert ready and " listening on http://127.0.0.1:" in ready[0], ready
        assert witness.vkey in ready[0]
        port = int(ready[0].rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/add-checkpoint", body=LOG.body(0, 3))
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200, body
        # The real clock stamped it: any time after this test was written.
        timestamp = verify_cosignature_line(body.decode(), parse_note(LOG.checkpoint(3)).text, witness)
        assert timestamp > 1_700_000_000
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_registering_the_command_loads_no_witness_code() -> None:
    code = "import sys, cloister.cli; cloister.cli.build_parser(); assert 'cloister.witness' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
