"""The enclave's configuration, which is part of its measured image.

In production the file is baked into the EIF, so PCR0 covers it; in mock mode
`cloister.dev.measure` hashes it into the mock PCR0 together with the code. It pins what the
enclave must never take from the parent: the log origin, the admin keys that may sign
policy bundles, the attestation trust root, and which images may have run the log before.

    origin = "cloister.example.com/log/prod-1"
    admin_keys = ["<64 hex chars or a PEM file name>", ...]
    trust_root = "aws"              # or "mock:<path to root.pem>" (mock NSM only)
    predecessor_pcr0 = ["<hex>"]    # other images whose checkpoints this one may continue
    allow_debug = false             # accept debug-mode (PCR0 all zero) documents

The trust root must match the NSM the enclave runs on, which the caller states (`mock_nsm`): the
image's entry point (`cloister.enclave.__main__`, real `/dev/nsm`) refuses a `mock:` root, whose
holder could mint attestation documents for any PCRs; the development launcher
(`cloister.dev.enclave`, mock NSM) refuses `aws`, since a mock NSM's documents never chain to it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.verify.attestation import TrustRoot
from cloister.verify.bundle import admin_key_id, load_admin_key, origin_problem
from cloister.verify.errors import DecodeError


@dataclass(frozen=True)
class EnclaveConfig:
    origin: str
    admin_keys: Mapping[str, ed25519.Ed25519PublicKey]
    trust_root: TrustRoot
    predecessor_pcr0: frozenset[bytes]
    allow_debug: bool
    raw: bytes  # the file as measured


def load_config(path: Path, *, mock_nsm: bool) -> EnclaveConfig:
    """The config at `path`, for an enclave on the mock NSM (`mock_nsm`) or on `/dev/nsm`."""
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise DecodeError(f"enclave config {path}: cannot read: {exc.strerror}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DecodeError(f"enclave config {path}: {exc}") from exc
    origin = data.get("origin")
    problem = origin_problem(origin)
    if problem is not None or not isinstance(origin, str):
        raise DecodeError(f"enclave config {path}: origin: {problem}")
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for item in data.get("admin_keys", []):
        if not isinstance(item, str):
            raise DecodeError(f"enclave config {path}: admin_keys must be strings")
        blob = item.encode() if len(item) == 64 else (path.parent / item).read_bytes()
        key = load_admin_key(blob)
        keys[admin_key_id(key)] = key
    if not keys:
        raise DecodeError(f"enclave config {path}: no admin_keys; no policy bundle could ever be loaded")
    root = _trust_root(path, data.get("trust_root", "aws"), mock_nsm=mock_nsm)
    try:
        preds = frozenset(bytes.fromhex(h) for h in data.get("predecessor_pcr0", []))
    except ValueError as exc:
        raise DecodeError(f"enclave config {path}: predecessor_pcr0 must be hex strings") from exc
    return EnclaveConfig(
        origin=origin,
        admin_keys=keys,
        trust_root=root,
        predecessor_pcr0=preds,
        allow_debug=bool(data.get("allow_debug", False)),
        raw=raw,
    )


def _trust_root(path: Path, spec: object, *, mock_nsm: bool) -> TrustRoot:
    if spec == "aws":
        if mock_nsm:
            raise DecodeError(
                f"enclave config {path}: trust_root 'aws' with the mock NSM, whose documents never chain to "
                'AWS\'s root; development configs use trust_root = "mock:<root.pem>"'
            )
        return TrustRoot.aws()
    if isinstance(spec, str) and spec.startswith("mock:"):
        if not mock_nsm:
            raise DecodeError(
                f"enclave config {path}: trust_root {spec!r} is a mock root, refused on the real NSM "
                '(whoever holds a mock root\'s key can attest any PCRs); use trust_root = "aws"'
            )
        return TrustRoot.from_pem((path.parent / spec[5:]).read_bytes(), name="mock NSM root")
    raise DecodeError(f"enclave config {path}: trust_root must be 'aws' or 'mock:<root.pem>'")
