"""deploy/ scripts: shellcheck-clean, and run here against stand-ins for aws, dnf and systemctl.

`bootstrap.sh configure` writes into a scratch root (CLOISTER_ROOT) and its relay
configuration must load with the relay's own parser; `pin-image.sh` is run with a stub `aws`
that records the update it would make. Real AWS calls could not be made here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cloister.relay.config import load_relay_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [
    ROOT / "deploy/bootstrap.sh",
    ROOT / "deploy/pin-image.sh",
    ROOT / "deploy/bin/cloister-enclave-run",
    ROOT / "deploy/bin/wait-ready",
    *sorted((ROOT / "eif").glob("*.sh")),
]
A, B, C = ("a1" * 48, "b2" * 48, "c3" * 48)
KEY_ARN = "arn:aws:kms:eu-west-1:123456789012:key/0b6c1a2e-1111-4222-8333-944445555666"


def test_scripts_parse_and_pass_shellcheck() -> None:
    for script in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (script, r.stderr)
        assert os.access(script, os.X_OK), f"{script} is not executable"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout


# --- bootstrap.sh configure -------------------------------------------------------------------


def configure(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLOISTER_ROOT": str(root), "PUBLIC_HOST": "cloister.example.com"}
    return subprocess.run(
        ["bash", str(ROOT / "deploy/bootstrap.sh"), "configure"], capture_output=True, text=True, timeout=60, env=env
    )


def stack_root(tmp: Path) -> Path:
    root = tmp / "root"
    (root / "etc/cloister").mkdir(parents=True)
    (root / "etc/cloister-stack.env").write_text(
        f"CLOISTER_BUCKET=cloister-log-bucket\nCLOISTER_PREFIX=log\nCLOISTER_KMS_KEY={KEY_ARN}\nCLOISTER_REGION=eu-west-1\n"
    )
    return root


def test_configure_renders_from_the_stack_and_refuses_until_everything_is_there(tmp_path: Path) -> None:
    root = stack_root(tmp_path)
    etc = root / "etc/cloister"
    r = configure(root)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    for missing in ("admin.token", "auditor.token", "body.pub", "bundle.signed", "fullchain.pem", "measurements.json"):
        assert missing in r.stderr
    assert "[[witnesses]]" in r.stderr
    relay = (etc / "relay.toml").read_text()
    assert 'storage = "s3://cloister-log-bucket/log"' in relay and f'key_id = "{KEY_ARN}"' in relay
    assert 'public_url = "https://cloister.example.com"' in relay
    assert not re.search(r"^[^#]*@[A-Z_]+@", relay, re.M), relay
    nginx = (root / "etc/nginx/conf.d/cloister.conf").read_text()
    assert "server_name cloister.example.com;" in nginx

    # The operator puts secrets, certificate, bundle and pinned measurements in place.
    (etc / "secrets").mkdir()
    (etc / "tls").mkdir()
    (etc / "secrets/admin.token").write_text("admin-token-0123456789abcdef\n")
    (etc / "secrets/auditor.token").write_text("auditor-token-0123456789abcdef\n")
    for name in ("bundle.signed", "tls/fullchain.pem", "tls/privkey.pem", "measurements.json"):
        (etc / name).write_text("x")
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    (etc / "body.pub").write_bytes(
        X25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    r = configure(root)
    assert r.returncode == 2 and "the [[witnesses]] of" in r.stderr and "admin.token" not in r.stderr
    from cloister.witness.state import init_state

    vkeys = [init_state(tmp_path / f"w{i}", f"w{i}.example/w").vkey for i in range(3)]
    witnesses = "\n".join(
        f'[[witnesses]]\nname = "w{i}.example/w"\nurl = "https://w{i}.example"\nvkey = "{vkey}"\n'
        for i, vkey in enumerate(vkeys)
    )
    relay = relay[: relay.index("[[witnesses]]")] + witnesses + "\n" + relay[relay.index("[kms]") :]
    (etc / "relay.toml").write_text(relay)
    r = configure(root)
    assert r.returncode == 0, r.stderr
    assert oct((etc / "secrets/admin.token").stat().st_mode & 0o777) == "0o600"

    # The relay's own parser accepts it, with the credentials where systemd would put them.
    creds = tmp_path / "credentials"
    creds.mkdir()
    shutil.copy(etc / "secrets/admin.token", creds / "admin.token")
    shutil.copy(etc / "secrets/auditor.token", creds / "auditor.token")
    text = relay.replace("/run/credentials/cloister-relay.service", str(creds)).replace("/etc/cloister", str(etc))
    (etc / "relay.toml").write_text(text)
    config = load_relay_config(etc / "relay.toml")
    assert (config.host, config.port, config.enclave, config.trust_root) == ("127.0.0.1", 8440, "vsock:16:5005", "aws")
    assert config.storage == "s3://cloister-log-bucket/log" and config.s3_endpoint_url is None
    assert config.kms is not None and (config.kms.key_id, config.kms.region, config.kms.endpoint_url) == (
        KEY_ARN,
        "eu-west-1",
        None,
    )
    assert config.admin_token and config.auditor_token and config.admin_token != config.auditor_token
    assert config.body_public_key is not None and config.witness_quorum == 2 and len(config.witnesses) == 3


def test_configure_refuses_without_the_stack_outputs(tmp_path: Path) -> None:
    r = configure(tmp_path)
    assert r.returncode == 2 and "cloister-stack.env" in r.stderr


# --- pin-image.sh --------------------------------------------------------------------------


def pin(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp / "aws-calls.jsonl"
    (bin_dir / "aws").write_text(
        f"""#!/usr/bin/env python3
import json, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:2] == ["cloudformation", "describe-stacks"]:
    query = args[args.index("--query") + 1]
    print("ImageSha384\\tPredecessorImageSha384\\tKeyAdminArn\\tVpcId" if "Parameters" in query else {KEY_ARN!r})
elif args[:2] == ["kms", "get-key-policy"]:
    print("{{}}")
"""
    )
    (bin_dir / "aws").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = subprocess.run(
        ["bash", str(ROOT / "deploy/pin-image.sh"), *args], capture_output=True, text=True, timeout=60, env=env
    )
    recorded = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return r, recorded


def test_pin_image_updates_only_the_pcr0_parameters(tmp_path: Path) -> None:
    measurements = tmp_path / "measurements.json"
    measurements.write_text(json.dumps({"PCR0": A, "PCR1": B}))
    r, calls = pin(
        tmp_path, "--stack", "prod", "--pcr0", A, "--predecessors", f"{B},{C}", "--measurements", str(measurements)
    )
    assert r.returncode == 0, r.stderr
    update = next(c for c in calls if c[:2] == ["cloudformation", "update-stack"])
    assert "--use-previous-template" in update
    params = json.loads(update[update.index("--parameters") + 1])
    assert params == [
        {"ParameterKey": "ImageSha384", "ParameterValue": A},
        {"ParameterKey": "PredecessorImageSha384", "ParameterValue": f"{B},{C}"},
        {"ParameterKey": "KeyAdminArn", "UsePreviousValue": True},
        {"ParameterKey": "VpcId", "UsePreviousValue": True},
    ]
    assert ["kms", "get-key-policy", "--key-id", KEY_ARN, "--policy-name", "default", "--output", "text"] in calls


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stack", "prod", "--pcr0", "0" * 96], "all zeros: that is a debug-mode enclave"),
        (["--stack", "prod", "--pcr0", A.upper()], "96 lower-case hex"),
        (["--stack", "prod", "--pcr0", A, "--predecessors", f"{B};{C}"], "comma-separated"),
        (["--pcr0", A], "give --stack"),
        (["--stack", "prod", "--pcr0", A, "--measurements", "REBUILT"], f"your rebuild measured PCR0 {B}, not {A}"),
    ],
)
def test_pin_image_refuses(tmp_path: Path, args: list[str], message: str) -> None:
    rebuilt = tmp_path / "rebuilt.json"
    rebuilt.write_text(json.dumps({"Measurements": {"PCR0": B}}))
    r, calls = pin(tmp_path, *[str(rebuilt) if a == "REBUILT" else a for a in args])
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert calls == []
