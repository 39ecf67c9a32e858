"""Command-line choices shared by everything that verifies attestation: the trust root and PCRs.

    --root / --trust-root  aws | mock | PEM_PATH
    --expect-pcr           I=HEX (repeatable)

`aws` is the AWS Nitro Enclaves Root-G1 shipped (and pinned) in `cloister.verify`; `mock` is the
mock NSM's root at `$CLOISTER_STATE/mock-nsm/root.pem` (state directory `.cloister` by
default), for CI and laptops; anything else is a path to one PEM certificate.

Errors are `TrustRootError` (a ValueError): the caller reports them as unusable arguments.
Only `cloister.verify` is imported, lazily, so command registration stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloister.verify.attestation import TrustRoot

__all__ = ["MOCK_ROOT", "TrustRootError", "load_trust_root", "parse_pcr_spec", "state_dir"]

MOCK_ROOT = Path("mock-nsm") / "root.pem"  # under the state directory
MAX_ROOT_FILE = 64 * 1024  # one PEM certificate is a few kB


class TrustRootError(ValueError):
    """The trust-root or PCR argument cannot be used (exit status 2 in the CLIs)."""


def state_dir() -> Path:
    """`$CLOISTER_STATE`, or `.cloister` in the current directory."""
    return Path(os.environ.get("CLOISTER_STATE", ".cloister"))


def load_trust_root(choice: str) -> TrustRoot:
    """`aws`, `mock` or a PEM path -> the TrustRoot whose certificate cabundle[0] must equal."""
    from cloister.verify.attestation import TrustRoot
    from cloister.verify.errors import DecodeError

    if choice == "aws":
        return TrustRoot.aws()
    if choice == "mock":
        path = state_dir() / MOCK_ROOT
        if not path.is_file():
            raise TrustRootError(
                f"no mock root at {path}: start the enclave with the mock NSM first, or pass a PEM file"
            )
        name = f"mock NSM root ({path})"
    else:
        path, name = Path(choice), f"root from {choice}"
    try:
        with path.open("rb") as f:
            pem = f.read(MAX_ROOT_FILE + 1)
    except OSError as exc:
        raise TrustRootError(f"cannot read the root {path}: {exc.strerror or exc}") from exc
    if len(pem) > MAX_ROOT_FILE:
        raise TrustRootError(f"{path}: more than {MAX_ROOT_FILE} bytes, not one PEM certificate")
    try:
        return TrustRoot.from_pem(pem, name=name)
    except DecodeError as exc:
        raise TrustRootError(f"{path}: {exc}") from exc


def parse_pcr_spec(spec: str, flag: str = "--expect-pcr") -> tuple[int, bytes]:
    """`I=HEX` -> (I, bytes); PCRs are SHA-384 (48 bytes) on Nitro, 32/64 are accepted too."""
    index, sep, value = spec.partition("=")
    if not sep or not index.strip().isdigit() or not 0 <= int(index) < 32:
        raise TrustRootError(f"{flag}: {spec!r} is not I=HEX with I in [0, 32)")
    try:
        digest = bytes.fromhex(value.strip())
    except ValueError as exc:
        raise TrustRootError(f"{flag}: {value.strip()[:100]!r} is not hex") from exc
    if len(digest) not in (32, 48, 64):
        raise TrustRootError(f"{flag}: PCR{int(index)} value is {len(digest)} bytes, expected 48 (or 32/64)")
    return int(index), digest
