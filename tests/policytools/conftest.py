"""Helpers for `cloister policy` tests: a writable copy of the test bundle, and the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.enclave.bundle import read_bundle_dir
from cloister.policytools.validate import Validation, validate_files
from cloister.verify.bundle import sign_bundle

REPO = Path(__file__).resolve().parents[2]


# The refund scenario as the example bundle had it when these tests were written (no upstream
# identities), kept here so that line numbers in the expectations stay put when the example changes.
BUNDLE = Path(__file__).parent / "bundle"


def make_bundle(dst: Path) -> Path:
    """The test bundle with an issuer key (as `cloister up` adds), ready to validate and sign."""
    shutil.copytree(BUNDLE, dst)
    return add_issuer_key(dst)


def add_issuer_key(dst: Path) -> Path:
    (dst / "issuers").mkdir(exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    (dst / "issuers" / "cloister-dev.pem").write_bytes(
        key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return dst


# For bundles that only the local tools read (diff, explain, push's input checks), which check
# neither origin nor expiry; a bundle a running enclave loads is signed for its origin and clock.
LOCAL_ORIGIN = "cloister.test/policytools"
LOCAL_NOT_AFTER = 4102444800  # 2100-01-01T00:00:00Z


def sign_local(files: dict[str, bytes], version: int, key: ed25519.Ed25519PrivateKey) -> bytes:
    return sign_bundle(files, version, key, origin=LOCAL_ORIGIN, not_after=LOCAL_NOT_AFTER)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


def validate(path: Path, edits: dict[str, str | None] | None = None) -> Validation:
    """Validate `path` with some files replaced ({name: text}; None deletes the file)."""
    files = read_bundle_dir(path)
    for name, text in (edits or {}).items():
        if text is None:
            files.pop(name, None)
        else:
            files[name] = text.encode()
    return validate_files(files)


def messages(v: Validation) -> list[str]:
    return [str(f) for f in v.findings]


def cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloister.cli", "policy", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
    )
