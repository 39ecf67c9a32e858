"""`cloister policy keygen` and `sign`: keys that the enclave can pin, bundles that it verifies."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from cloister.enclave.bundle import read_bundle_dir
from cloister.policytools.signing import keygen, load_private_key, sign_dir
from cloister.policytools.source import load_source
from cloister.verify.bundle import admin_key_id, load_admin_key, verify_bundle
from tests.policytools.conftest import cli


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


def test_sign_validates_then_signs_what_the_enclave_verifies(bundle: Path, tmp_path: Path) -> None:
    info = keygen(tmp_path / "admin.key")
    out = tmp_path / "bundle.signed"
    r = cli("sign", str(bundle), "--key", str(info.private_path), "--version", "7", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"admin key:  {info.key_id}" in r.stdout and f'admin_keys = ["{info.public_hex}"]' in r.stdout
    signed = verify_bundle(out.read_bytes(), {info.key_id: load_admin_key(info.public_path.read_bytes())})
    assert signed.version == 7 and signed.files == read_bundle_dir(bundle)
    assert f"sha256:     {signed.sha256.hex()}" in r.stdout
    src = load_source(out)
    assert (src.version, src.signer, src.sha256) == (7, info.key_id, signed.sha256.hex())


def test_sign_refuses_an_invalid_bundle(bundle: Path, tmp_path: Path) -> None:
    info = keygen(tmp_path / "admin.key")
    (bundle / "policies" / "x.cedar").write_text('@id("x")\npermit (principal, action, resource)\nwhen { 1 + };\n')
    out = tmp_path / "bundle.signed"
    r = cli("sign", str(bundle), "--key", str(info.private_path), "--version", "2", "--out", str(out))
    assert r.returncode == 1
    assert "policies/x.cedar:3:" in r.stderr and "not signed:" in r.stderr
    assert not out.exists()
    validation, signed = sign_dir(bundle, load_private_key(info.private_path), 2, out)
    assert signed is None and not validation.ok


def test_sign_usage_errors(bundle: Path, tmp_path: Path) -> None:
    info = keygen(tmp_path / "admin.key")
    out = str(tmp_path / "o")
    assert cli("sign", str(bundle), "--key", str(tmp_path / "nokey"), "--version", "1", "--out", out).returncode == 2
    (tmp_path / "notakey").write_text("hello")
    bad = cli("sign", str(bundle), "--key", str(tmp_path / "notakey"), "--version", "1", "--out", out)
    assert bad.returncode == 2 and "not an unencrypted PEM private key" in bad.stderr
    pub = cli("sign", str(bundle), "--key", str(info.public_path), "--version", "1", "--out", out)
    assert pub.returncode == 2
    zero = cli("sign", str(bundle), "--key", str(info.private_path), "--version", "0", "--out", out)
    assert zero.returncode == 2 and "--version must be a positive integer" in zero.stderr
    nodir = cli("sign", str(tmp_path / "nodir"), "--key", str(info.private_path), "--version", "1", "--out", out)
    assert nodir.returncode == 2 and "not a directory" in nodir.stderr
