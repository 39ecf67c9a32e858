"""eif/build.sh refuses a config that must not be baked into a production image (issue 9 item 6).

The check is eif/check-config.sh, which build.sh runs before Docker; the tests run it alone, and
run build.sh itself with stand-ins for docker and nitro-cli that record being called.
"""

from __future__ import annotations

import hashlib
import json
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


DIGEST = "sha256:" + "ab" * 32
PCR = {0: "a0" * 48, 1: "b1" * 48, 2: "c2" * 48}
BASE_ENV = f"BASE_IMAGE=python:3.11-slim-bookworm\nBASE_DIGEST={DIGEST}\n"


def build(
    tmp: Path, config: str, *, base_env: str = BASE_ENV, env: dict[str, str] | None = None, pcr0s: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """build.sh in a copy of eif/ whose enclave.toml is `config`; docker and nitro-cli are stubs.

    The nitro-cli stub prints measurements as nitro-cli does: PCR0 is the n-th of `pcr0s` on its
    n-th run (default: the same each time), and PCR8 appears when it is given a signing key.
    """
    eif = tmp / "repo" / "eif"
    eif.mkdir(parents=True)
    for name in ("build.sh", "check-config.sh"):
        shutil.copy2(ROOT / "eif" / name, eif / name)
    (eif / "enclave.toml").write_text(config)
    (eif / "base-image.env").write_text(base_env)
    (eif / "requirements-enclave.txt").write_text("cbor2==6.3.0\n")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    calls = tmp / "calls"
    (bin_dir / "docker").write_text(f'#!/usr/bin/env bash\necho "docker $*" >> "{calls}"\n')
    runs = tmp / "nitro-runs"
    script = f"""#!/usr/bin/env bash
echo "nitro-cli $*" >> "{calls}"
n=$(( $(cat "{runs}" 2>/dev/null || echo 0) + 1 )); echo $n > "{runs}"
pcr0s=({" ".join(pcr0s or (PCR[0],))})
pcr0=${{pcr0s[$(( (n - 1) % ${{#pcr0s[@]}} ))]}}
out=""; prev=""
for a in "$@"; do [[ "$prev" == --output-file ]] && out=$a; prev=$a; done
echo eif > "$out"
echo "Start building the Enclave Image..."
printf '{{\n  "Measurements": {{\n    "HashAlgorithm": "Sha384 {{ ... }}",\n    "PCR0": "%s",\n    "PCR1": "{PCR[1]}",\n    "PCR2": "{PCR[2]}"' "$pcr0"
[[ " $* " == *" --private-key "* ]] && printf ',\n    "PCR8": "{"d8" * 48}"'
printf '\n  }}\n}}\n'
"""
    (bin_dir / "nitro-cli").write_text(script)
    for tool in ("docker", "nitro-cli"):
        (bin_dir / tool).chmod(0o755)
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SOURCE_DATE_EPOCH": "1700000000",
        **(env or {}),
    }
    r = subprocess.run(["bash", str(eif / "build.sh")], capture_output=True, text=True, timeout=60, env=full_env)
    return r, calls


def test_build_script_refuses_mock_root(tmp_path: Path) -> None:
    r, calls = build(tmp_path, GOOD.replace('"aws"', '"mock:mock-nsm/root.pem"'))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and 'trust_root must be "aws" in an enclave image' in r.stderr, r.stderr
    assert not calls.exists(), "docker ran"
    # The same script with the AWS root goes on to docker and nitro-cli.
    ok, calls = build(tmp_path / "ok", GOOD)
    assert ok.returncode == 0, ok.stderr
    assert calls.read_text().splitlines()[0].startswith("docker build --no-cache -f Dockerfile.enclave")


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


def test_build_builds_twice_from_scratch_and_writes_measurements(tmp_path: Path) -> None:
    r, calls = build(tmp_path, GOOD)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    docker = [c for c in lines if c.startswith("docker build")]
    assert len(docker) == 2 and all("--no-cache" in c for c in docker), lines
    for c in docker:
        assert f"--build-arg BASE_DIGEST={DIGEST}" in c and "--build-arg SOURCE_DATE_EPOCH=1700000000" in c, c
    assert len([c for c in lines if c.startswith("nitro-cli build-enclave")]) == 2
    out = tmp_path / "repo" / "eif"
    m = json.loads((out / "measurements.json").read_text())
    assert (m["PCR0"], m["PCR1"], m["PCR2"]) == (PCR[0], PCR[1], PCR[2]) and "PCR8" not in m
    assert m["base_image"] == f"python:3.11-slim-bookworm@{DIGEST}" and m["source_date_epoch"] == 1700000000
    assert m["requirements_sha256"] == hashlib.sha256(b"cbor2==6.3.0\n").hexdigest()
    assert json.loads(r.stdout) == m
    assert (out / "cloister.eif").exists() and not (out / "cloister-build2.eif").exists()


def test_build_refuses_when_the_two_builds_measure_differently(tmp_path: Path) -> None:
    r, _ = build(tmp_path, GOOD, pcr0s=(PCR[0], "e0" * 48))
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "the two builds measure differently" in r.stderr
    out = tmp_path / "repo" / "eif"
    assert not (out / "measurements.json").exists() and not list(out.glob("*.eif"))


@pytest.mark.parametrize(
    ("base_env", "env", "message"),
    [
        (BASE_ENV.replace(DIGEST, "REPLACE-ME-sha256"), {}, "BASE_DIGEST 'REPLACE-ME-sha256' is not sha256:<64 hex>"),
        (BASE_ENV.replace(DIGEST, DIGEST[:-1]), {}, "pin the base image first"),
        (BASE_ENV.replace(DIGEST, "latest"), {}, "is not sha256"),
        (BASE_ENV, {"SIGNING_CERT": "cert.pem"}, "give both SIGNING_CERT and SIGNING_KEY"),
        (BASE_ENV, {"SOURCE_DATE_EPOCH": "yesterday"}, "is not a number of seconds"),
    ],
)
def test_build_refuses_unpinned_or_partial_inputs_before_docker(
    tmp_path: Path, base_env: str, env: dict[str, str], message: str
) -> None:
    r, calls = build(tmp_path, GOOD, base_env=base_env, env=env)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not calls.exists(), "docker ran"


def test_build_signs_the_eif_when_asked(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("cert")
    r, calls = build(tmp_path, GOOD, env={"SIGNING_CERT": str(cert), "SIGNING_KEY": "key.pem"})
    assert r.returncode == 0, r.stderr
    nitro = [c for c in calls.read_text().splitlines() if c.startswith("nitro-cli")]
    assert all(f"--signing-certificate {cert} --private-key key.pem" in c for c in nitro), nitro
    assert json.loads((tmp_path / "repo" / "eif" / "measurements.json").read_text())["PCR8"] == "d8" * 48
