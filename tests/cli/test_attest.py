"""`cloister attest verify`: exit codes, messages and JSON output."""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cloister.cli import attest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nitro"
PROD = FIXTURES / "evervault_cage_cert_san_2023-01-18_nondebug_pcr8.b64"
DEBUG = FIXTURES / "evervault_ga_2023-09-18_debug.b64"
NEGATIVE = FIXTURES / "blocky_nitrite_selfsigned_NEGATIVE.b64"
PCR0 = "d265a83faa7b4fa0d73b82b6d06253e894445922937d0ee5a74fe4891da9817611a71e71b98e5329232902de3cf419af"


def run(*argv: str) -> int:
    """Dispatch like cloister.cli.main, with only this command registered."""
    parser = argparse.ArgumentParser(prog="cloister")
    attest.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["attest", *argv])
    code: int = args.handler(args)
    return code


def stdin_bytes(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_base64_file_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("verify", str(PROD), "--at", "doc") == 0
    out = capsys.readouterr()
    assert "attestation verified" in out.out and "i-0ec0e572c8263d8ff-enc0185c4fd382eeb25" in out.out
    assert out.err == ""


def test_raw_cbor_and_wrapped_base64(tmp_path: Path) -> None:
    raw = base64.b64decode(PROD.read_text())
    (tmp_path / "doc.cbor").write_bytes(raw)
    assert run("verify", str(tmp_path / "doc.cbor"), "--at", "doc") == 0
    wrapped = "\n".join(textwrap.wrap(PROD.read_text().strip(), 76)) + "\n"
    (tmp_path / "doc.pem-ish").write_text(wrapped)
    assert run("verify", str(tmp_path / "doc.pem-ish"), "--at", "doc") == 0


@pytest.mark.parametrize("form", ["base64", "raw"])
def test_stdin(monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    text = PROD.read_bytes()
    stdin_bytes(monkeypatch, text if form == "base64" else base64.b64decode(text))
    assert run("verify", "-", "--at", "doc") == 0


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("verify", str(PROD), "--at", "doc", "--json", "--expect-pcr", f"0={PCR0}") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is True
    assert doc["module_id"] == "i-0ec0e572c8263d8ff-enc0185c4fd382eeb25"
    assert doc["timestamp"] == "2023-01-18T13:07:19.280Z" and doc["timestamp_ms"] == 1674047239280
    assert doc["digest"] == "SHA384"
    assert doc["pcrs"]["0"] == PCR0 and sorted(doc["pcrs"], key=int) == [str(i) for i in range(16)]
    assert doc["public_key"] is None and len(doc["user_data"]) == 240 and len(doc["nonce"]) == 512
    assert [c["role"] for c in doc["certificates"]] == ["root", "intermediate", "intermediate", "intermediate", "leaf"]
    assert doc["certificates"][0]["subject"] == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    assert doc["certificates"][-1]["not_after"] == "2023-01-18T16:07:16.000Z"
    assert doc["root"]["sha256"] == "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
    assert doc["checked_at"] == "document"


def rejected(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert run(*argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("attestation rejected: ") and err.count("\n") == 1
    return err


def test_rejections(capsys: pytest.CaptureFixture[str]) -> None:
    assert "expired-certificate: " in rejected(capsys, "verify", str(PROD))  # default: now
    assert "expired-certificate" in rejected(capsys, "verify", str(PROD), "--at", "2023-01-18T16:30:00Z")
    assert run("verify", str(PROD), "--at", "2023-01-18T14:00:00") == 0  # no offset: UTC
    assert "pcr-mismatch: PCR0" in rejected(
        capsys, "verify", str(PROD), "--at", "doc", "--expect-pcr", "0=" + "00" * 48
    )
    assert "nonce-mismatch" in rejected(capsys, "verify", str(PROD), "--at", "doc", "--nonce", "00")
    assert "stale" in rejected(capsys, "verify", str(PROD), "--at", "doc", "--max-age", "60")
    assert "debug-mode" in rejected(capsys, "verify", str(DEBUG), "--at", "doc")
    assert "malformed: " in rejected(capsys, "verify", str(NEGATIVE), "--at", "doc")
    assert run("verify", str(DEBUG), "--at", "doc", "--allow-debug") == 0


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cloister attest verify: ") and err.count("\n") == 1
    assert "Traceback" not in err
    return err


def test_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "cannot read" in usage_error(capsys, "verify", str(tmp_path / "missing.b64"))
    assert "cannot read" in usage_error(capsys, "verify", str(tmp_path))  # a directory
    (tmp_path / "text").write_text("hello, this is not a document!\n")
    assert "neither base64 nor" in usage_error(capsys, "verify", str(tmp_path / "text"))
    (tmp_path / "bin").write_bytes(bytes(range(256)))
    assert "neither base64 nor" in usage_error(capsys, "verify", str(tmp_path / "bin"))
    (tmp_path / "b64junk").write_text(base64.b64encode(b"\xff\xfe\xfd").decode())
    assert "neither base64 nor" in usage_error(capsys, "verify", str(tmp_path / "b64junk"))
    (tmp_path / "badpad").write_text("abc")
    assert "does not decode" in usage_error(capsys, "verify", str(tmp_path / "badpad"))
    (tmp_path / "empty").write_bytes(b"")
    assert "empty" in usage_error(capsys, "verify", str(tmp_path / "empty"))
    (tmp_path / "huge").write_bytes(b"A" * 100_000)
    assert "more than" in usage_error(capsys, "verify", str(tmp_path / "huge"))
    stdin_bytes(monkeypatch, b"")
    assert "empty" in usage_error(capsys, "verify", "-")


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--expect-pcr" in usage_error(capsys, "verify", str(PROD), "--expect-pcr", "zero=00")
    assert "--expect-pcr" in usage_error(capsys, "verify", str(PROD), "--expect-pcr", "0=zz")
    assert "48" in usage_error(capsys, "verify", str(PROD), "--expect-pcr", "0=00")
    assert "--at" in usage_error(capsys, "verify", str(PROD), "--at", "yesterday")
    assert "--nonce" in usage_error(capsys, "verify", str(PROD), "--nonce", "xyz")
    assert "--max-age" in usage_error(capsys, "verify", str(PROD), "--max-age", "-1")
    assert "cannot read the root" in usage_error(capsys, "verify", str(PROD), "--root", "/nonexistent.pem")
    assert "not a PEM" in usage_error(capsys, "verify", str(PROD), "--root", str(PROD))


def test_mock_root(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloister.dev.mock_nsm import MockNsm

    monkeypatch.setenv("CLOISTER_STATE", str(tmp_path / "state"))
    assert "no mock root at" in usage_error(capsys, "verify", str(PROD), "--root", "mock")
    mock = MockNsm(tmp_path / "state" / "mock-nsm", {0: b"\x42" * 48})
    (tmp_path / "mock.b64").write_bytes(base64.b64encode(mock.attestation(nonce=b"\x01\x02")))
    assert run("verify", str(tmp_path / "mock.b64"), "--root", "mock", "--nonce", "0102", "--max-age", "300") == 0
    assert "mock NSM root" in capsys.readouterr().out
    pem = tmp_path / "state" / "mock-nsm" / "root.pem"
    assert run("verify", str(tmp_path / "mock.b64"), "--root", str(pem), "--expect-pcr", "0=" + "42" * 48) == 0
    assert "wrong-root" in rejected(capsys, "verify", str(tmp_path / "mock.b64"))  # default root: AWS
    assert "wrong-root" in rejected(capsys, "verify", str(PROD), "--root", "mock", "--at", "doc")
    monkeypatch.delenv("CLOISTER_STATE")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".cloister").symlink_to(tmp_path / "state")
    assert run("verify", str(tmp_path / "mock.b64"), "--root", "mock") == 0


def test_through_the_real_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    from cloister.cli import main

    assert main(["attest", "verify", str(PROD), "--at", "doc"]) == 0
    assert main(["attest", "verify", str(PROD)]) == 1
    assert "expired-certificate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["attest"])  # a verb is required
    assert info.value.code == 2


def test_registration_is_cheap() -> None:
    code = (
        "import argparse, sys\n"
        "from cloister.cli import attest\n"
        "p = argparse.ArgumentParser()\n"
        "attest.register(p.add_subparsers())\n"
        "names = ('cryptography', 'cbor2', 'cloister.verify.attestation', 'grpc', 'mcp')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
