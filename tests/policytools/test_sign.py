"""`cloister policy keygen` and `sign`: keys that the enclave can pin, bundles that it verifies."""

from __future__ import annotations

import argparse
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from cloister.cli import build_parser
from cloister.cli.policy import _sign  # noqa: PLC2701 (the handler, to run it on a fixed clock)
from cloister.enclave.bundle import read_bundle_dir
from cloister.policytools.signing import DEFAULT_VALIDITY, keygen, load_private_key, resolve_not_after, sign_dir
from cloister.policytools.source import InputError, load_source
from cloister.verify.bundle import admin_key_id, load_admin_key, verify_bundle
from tests.policytools.conftest import cli

ORIGIN = "cloister.example.com/log/prod-1"
NOW = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def test_keygen_writes_a_private_key_0600_and_a_public_key(tmp_path: Path) -> None:
    r = cli("keygen", "--out", str(tmp_path / "admin.key"))
    assert r.returncode == 0, r.stderr
    priv, pub = tmp_path / "admin.key", tmp_path / "admin.key.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key = load_private_key(priv)
    public = load_pem_public_key(pub.read_bytes())
    assert isinstance(public, ed25519.Ed25519PublicKey)
    hex_pin = r.stdout.split('admin_keys = ["')[1].split('"')[0]
    # What it prints is what the enclave's config pins (load_admin_key reads either form).
    assert load_admin_key(hex_pin.encode()) == key.public_key() == load_admin_key(pub.read_bytes())
    assert f"key id:      {admin_key_id(key.public_key())}" in r.stdout
    again = cli("keygen", "--out", str(priv))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_sign_validates_then_signs_what_the_enclave_verifies(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = keygen(tmp_path / "admin.key")
    code, out = _sign_at(
        NOW,
        str(bundle),
        *("--key", str(info.private_path), "--version", "7", "--origin", ORIGIN),
        *("--not-after", "2026-06-01T00:00:00Z", "--out", str(tmp_path / "bundle.signed")),
    )
    assert code == 0
    stdout = capsys.readouterr().out
    assert f"admin key:  {info.key_id}" in stdout and f'admin_keys = ["{info.public_hex}"]' in stdout
    assert f"origin:     {ORIGIN}" in stdout and "not after:  2026-06-01T00:00:00Z" in stdout
    keys = {info.key_id: load_admin_key(info.public_path.read_bytes())}
    signed = verify_bundle(out.read_bytes(), keys, origin=ORIGIN, now_ms=NOW_MS)
    assert signed.version == 7 and signed.files == read_bundle_dir(bundle)
    assert (signed.origin, signed.not_after) == (ORIGIN, int(datetime(2026, 6, 1, tzinfo=UTC).timestamp()))
    assert f"sha256:     {signed.sha256.hex()}" in stdout
    src = load_source(out)
    assert (src.version, src.signer, src.sha256) == (7, info.key_id, signed.sha256.hex())


def test_sign_refuses_an_invalid_bundle(bundle: Path, tmp_path: Path) -> None:
    info = keygen(tmp_path / "admin.key")
    (bundle / "policies" / "x.cedar").write_text('@id("x")\npermit (principal, action, resource)\nwhen { 1 + };\n')
    out = tmp_path / "bundle.signed"
    r = cli(
        "sign", str(bundle), "--key", str(info.private_path), "--version", "2", "--origin", ORIGIN, "--out", str(out)
    )
    assert r.returncode == 1
    assert "policies/x.cedar:3:" in r.stderr and "not signed:" in r.stderr
    assert not out.exists()
    validation, signed = sign_dir(
        bundle, load_private_key(info.private_path), 2, out, origin=ORIGIN, not_after=NOW_MS // 1000 + 60
    )
    assert signed is None and not validation.ok


def test_sign_usage_errors(bundle: Path, tmp_path: Path) -> None:
    info = keygen(tmp_path / "admin.key")
    out = str(tmp_path / "o")
    assert (
        cli(
            "sign", str(bundle), "--key", str(tmp_path / "nokey"), "--version", "1", "--origin", ORIGIN, "--out", out
        ).returncode
        == 2
    )
    (tmp_path / "notakey").write_text("hello")
    bad = cli(
        "sign", str(bundle), "--key", str(tmp_path / "notakey"), "--version", "1", "--origin", ORIGIN, "--out", out
    )
    assert bad.returncode == 2 and "not an unencrypted PEM private key" in bad.stderr
    pub = cli("sign", str(bundle), "--key", str(info.public_path), "--version", "1", "--origin", ORIGIN, "--out", out)
    assert pub.returncode == 2
    zero = cli("sign", str(bundle), "--key", str(info.private_path), "--version", "0", "--origin", ORIGIN, "--out", out)
    assert zero.returncode == 2 and "--version must be a positive integer" in zero.stderr
    nodir = cli(
        "sign",
        str(tmp_path / "nodir"),
        "--key",
        str(info.private_path),
        "--version",
        "1",
        "--origin",
        ORIGIN,
        "--out",
        out,
    )
    assert nodir.returncode == 2 and "not a directory" in nodir.stderr


def test_sign_needs_an_origin(bundle: Path, tmp_path: Path) -> None:
    info = keygen(tmp_path / "admin.key")
    r = cli("sign", str(bundle), "--key", str(info.private_path), "--version", "1", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--origin" in r.stderr
    for bad in ("", " padded ", "two\nlines", "x" * 256):
        with pytest.raises(InputError, match="--origin"):
            sign_dir(bundle, load_private_key(info.private_path), 1, tmp_path / "o", origin=bad, not_after=1 << 31)
    assert not (tmp_path / "o").exists()


def _sign_at(now: datetime, *argv: str) -> tuple[int, Path]:
    """`cloister policy sign` through its handler, on a fixed clock."""
    args = build_parser().parse_args(["policy", "sign", *argv])
    assert isinstance(args, argparse.Namespace)
    return _sign(args, clock=lambda: now), Path(args.out)


def test_not_after_defaults_to_90_days_from_the_clock_and_is_checked(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = keygen(tmp_path / "admin.key")
    keys = {info.key_id: load_admin_key(info.public_path.read_bytes())}
    common = (str(bundle), "--key", str(info.private_path), "--version", "3", "--origin", ORIGIN)
    code, out = _sign_at(NOW, *common, "--out", str(tmp_path / "default"))
    assert code == 0
    assert "not after:  2026-05-31T10:30:00Z" in capsys.readouterr().out
    assert verify_bundle(out.read_bytes(), keys, origin=ORIGIN, now_ms=NOW_MS).not_after == int(
        (NOW + timedelta(days=90)).timestamp()
    )
    # With a zone and in the future, at most 366 days ahead; offsets are converted to UTC.
    code, out = _sign_at(NOW, *common, "--not-after", "2026-04-01T02:00:00+02:00", "--out", str(tmp_path / "o"))
    assert code == 0 and "not after:  2026-04-01T00:00:00Z" in capsys.readouterr().out
    for text, message in (
        ("2026-04-01", "give a date, a time and a zone"),
        ("2026-04-01T00:00:00", "give a date, a time and a zone"),
        ("yesterday", "not an ISO 8601 time"),
        ("2026-03-02T10:29:59Z", "is not in the future"),
        ("2027-03-04T00:00:00Z", "more than 366 days away"),
    ):
        code, out = _sign_at(NOW, *common, "--not-after", text, "--out", str(tmp_path / "refused"))
        assert code == 2 and message in capsys.readouterr().err, text
        assert not out.exists()
    assert resolve_not_after(None, NOW) == int((NOW + DEFAULT_VALIDITY).timestamp())
