"""A bundle to read: a directory as written by its authors, or a signed bundle file.

A signed file is read without verifying its signature (diff and explain are local tools; the
enclave verifies on load), and `BundleSource.signed` says so in their output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cloister.enclave.bundle import read_bundle_dir
from cloister.verify.bundle import MAX_BUNDLE_BYTES, read_bundle_header, unsigned_files
from cloister.verify.cose import parse_cose_sign1
from cloister.verify.errors import CloisterError, DecodeError

MAX_SIGNED_BYTES = MAX_BUNDLE_BYTES + 4096


class InputError(CloisterError):
    """A path or argument the user gave cannot be used (missing file, unreadable key...)."""


@dataclass(frozen=True)
class BundleSource:
    path: str
    files: dict[str, bytes]
    signed: bool
    version: int | None = None
    signer: str | None = None  # the admin key id in the signed header (unverified)
    sha256: str | None = None  # of the signed payload: the hash the enclave logs

    def describe(self) -> str:
        if not self.signed:
            return f"{self.path} (directory, unsigned)"
        return f"{self.path} (version {self.version}, signed by key {self.signer}, sha256 {self.sha256})"


def read_signed(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_SIGNED_BYTES:
            raise DecodeError(f"{path}: {size} bytes, more than a bundle may have ({MAX_SIGNED_BYTES})")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc


def load_source(path: str | Path) -> BundleSource:
    """A bundle directory or a signed bundle file. Raises InputError or DecodeError."""
    p = Path(path)
    if p.is_dir():
        try:
            return BundleSource(path=str(p), files=read_bundle_dir(p), signed=False)
        except OSError as exc:
            raise InputError(f"{p}: cannot read: {exc}") from exc
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    data = read_signed(p)
    try:
        version, signer = read_bundle_header(data)
        files = unsigned_files(data)
        payload = parse_cose_sign1(data, max_size=MAX_SIGNED_BYTES).payload
    except DecodeError as exc:
        raise DecodeError(f"{p}: not a signed bundle: {exc}") from exc
    return BundleSource(
        path=str(p),
        files=files,
        signed=True,
        version=version,
        signer=signer,
        sha256=hashlib.sha256(payload).hexdigest(),
    )
