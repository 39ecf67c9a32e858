"""eif/build.sh refuses a config that must not be baked into a production image (issue 9 item 6).

The check is eif/check-config.sh, which build.sh runs before Docker; the tests run it alone, and
run build.sh itself with stand-ins for docker and nitro-cli that record being called.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY = "9a3c" * 16
WITNESS = "witness.example+7a1d05a2+BLC1GrzHUbVcK5k7djXv8P2G3/Hf8QJqjcFQ5NCRuqPm"
GOOD = (
    f'origin = "cloister.example.com/log/prod-1"\nadmin_keys = ["{KEY}"]\ntrust_root = "aws"\n'
    f'witnesses = ["{WITNESS}"]\n'
)


def check(tmp: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp / "enclave.toml"
    path.write_text(text)
    return subprocess.run(
        ["bash", str(ROOT / "eif" / "check-config.sh"), str(path)], capture_output=True, text=True, timeout=30
    )


def build(tmp: Path, config: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """build.sh in a copy of eif/ whose enclave.toml is `config`; docker and nitro-cli are stubs."""
    eif = tmp / "repo" / "eif"
    eif.mkdir(parents=True)
    for name in ("build.sh", "check-config.sh"):
        shutil.copy2(ROOT / "eif" / name, eif / name)
    (eif / "enclave.toml").write_text(config)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    calls = tmp / "calls"
    for tool in ("docker", "nitro-cli"):
        stub = bin_dir / tool
        stub.write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> "{calls}"\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(eif / "build.sh")], capture_output=True, text=True, timeout=60, env=env)
    return r, calls


def test_build_script_refuses_mock_root(tmp_path: Path) -> None:
    r, calls = build(tmp_path, GOOD.replace('"aws"', '"mock:mock-nsm/root.pem"'))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and 'trust_root must be "aws" in an enclave image' in r.stderr, r.stderr
    assert not calls.exists(), "docker ran"
    # The same script with the AWS root goes on to docker and nitro-cli.
    ok, calls = build(tmp_path / "ok", GOOD)
    assert ok.returncode == 0, ok.stderr
    assert calls.read_text().splitlines()[0].startswith("docker build -f Dockerfile.enclave")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace('"aws"', '"mock:root.pem"'), 'trust_root must be "aws" in an enclave image, not "mock:root.pem"'),
        (GOOD.replace('"aws"', "'mock:root.pem'"), 'trust_root must be "aws"'),
        (GOOD.replace('"aws"', '"""mock:root.pem"""'), 'trust_root must be "aws"'),
        (GOOD.replace("trust_root", '"trust_root"').replace('"aws"', '"mock:x"'), 'trust_root must be "aws"'),
        (GOOD.replace('trust_root = "aws"\n', ""), 'set trust_root = "aws"'),
        (GOOD + 'trust_root = "mock:x"\n', "sets trust_root 2 times"),
        ('[t]\ntrust_root = "aws"\n' + GOOD.replace('trust_root = "aws"\n', ""), "before any [table]"),
        (GOOD + "allow_debug = true\n", "allow_debug = true"),
        (GOOD + "unsafe_unwitnessed = true\n", "unsafe_unwitnessed = true leaves rollback"),
        (GOOD.replace(f'witnesses = ["{WITNESS}"]\n', ""), "names no witnesses"),
        (GOOD.replace(f'witnesses = ["{WITNESS}"]\n', "witnesses = []\n"), "names no witnesses"),
        (GOOD.replace(KEY, "REPLACE-ME-64-hex"), "still has placeholders"),
    ],
)
def test_check_config_refusals(tmp_path: Path, text: str, message: str) -> None:
    r = check(tmp_path, text)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        GOOD.replace('"aws"', "'aws'  # AWS Nitro root"),
        GOOD + "predecessor_pcr0 = []\nallow_debug = false\n",
        '# trust_root = "mock:x" is for development\n' + GOOD,
    ],
)
def test_check_config_accepts_production_configs(tmp_path: Path, text: str) -> None:
    r = check(tmp_path, text)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_the_shipped_config_is_refused_until_its_placeholders_are_filled() -> None:
    r = subprocess.run(["bash", str(ROOT / "eif" / "check-config.sh")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "still has placeholders" in r.stderr
