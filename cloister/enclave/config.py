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
    witnesses = ["<C2SP vkey>", ...]  # cosignature/v1 keys of the witnesses (decision 0015)
    witness_quorum = 2              # how many must cosign (default: all of them)
    max_unwitnessed_entries = 1000  # stop granting when the log runs this far ahead of them
    max_unwitnessed_s = 10          # ... or has had an uncosigned checkpoint this long
    unsafe_unwitnessed = false      # no witnesses: rollback and shadow enclaves go undetected

A config must name witnesses or say `unsafe_unwitnessed = true`; the unsafe mode is logged at
start and reported by Health, and exists for tests of other things and single-machine trials.

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
from cloister.verify.cosignature import CosignaturePolicy
from cloister.verify.errors import DecodeError

DEFAULT_MAX_UNWITNESSED_ENTRIES = 1000
DEFAULT_MAX_UNWITNESSED_S = 10
# Upper bounds a config may set: a larger bound is a larger stretch a rollback could erase.
MAX_UNWITNESSED_ENTRIES_CAP = 100_000
MAX_UNWITNESSED_S_CAP = 3600
MAX_WITNESSES = 16


@dataclass(frozen=True)
class WitnessRequirement:
    """What the enclave needs from witnesses to keep granting (cloister.enclave.freshness).

    `cosignatures` None is the unsafe unwitnessed mode."""

    cosignatures: CosignaturePolicy | None
    max_entries: int = DEFAULT_MAX_UNWITNESSED_ENTRIES
    max_ms: int = DEFAULT_MAX_UNWITNESSED_S * 1000

    @property
    def unsafe(self) -> bool:
        return self.cosignatures is None


@dataclass(frozen=True)
class EnclaveConfig:
    origin: str
    admin_keys: Mapping[str, ed25519.Ed25519PublicKey]
    trust_root: TrustRoot
    predecessor_pcr0: frozenset[bytes]
    allow_debug: bool
    raw: bytes  # the file as measured
    witnessing: WitnessRequirement = WitnessRequirement(None)


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
        witnessing=_witnessing(path, data),
    )


def _bounded_int(path: Path, data: dict[str, object], key: str, default: int, cap: int) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= cap:
        raise DecodeError(f"enclave config {path}: {key} must be a whole number from 1 to {cap}")
    return value


def _witnessing(path: Path, data: dict[str, object]) -> WitnessRequirement:
    vkeys = data.get("witnesses", [])
    unsafe = data.get("unsafe_unwitnessed", False)
    if not isinstance(unsafe, bool):
        raise DecodeError(f"enclave config {path}: unsafe_unwitnessed must be true or false")
    if not isinstance(vkeys, list) or not all(isinstance(v, str) for v in vkeys) or len(vkeys) > MAX_WITNESSES:
        raise DecodeError(f"enclave config {path}: witnesses must be a list of at most {MAX_WITNESSES} C2SP vkeys")
    if not vkeys:
        if not unsafe:
            raise DecodeError(
                f"enclave config {path}: no witnesses; name the C2SP witnesses whose cosignatures the log needs "
                '(witnesses = ["<vkey>", ...]), or accept running without rollback protection with '
                "unsafe_unwitnessed = true"
            )
        return WitnessRequirement(None)
    if unsafe:
        raise DecodeError(f"enclave config {path}: unsafe_unwitnessed = true together with witnesses")
    quorum = _bounded_int(path, data, "witness_quorum", len(vkeys), len(vkeys))
    try:
        policy = CosignaturePolicy.from_vkeys(vkeys, quorum)
    except (DecodeError, ValueError) as exc:
        raise DecodeError(f"enclave config {path}: witnesses: {exc}") from exc
    return WitnessRequirement(
        cosignatures=policy,
        max_entries=_bounded_int(
            path, data, "max_unwitnessed_entries", DEFAULT_MAX_UNWITNESSED_ENTRIES, MAX_UNWITNESSED_ENTRIES_CAP
        ),
        max_ms=_bounded_int(path, data, "max_unwitnessed_s", DEFAULT_MAX_UNWITNESSED_S, MAX_UNWITNESSED_S_CAP) * 1000,
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
