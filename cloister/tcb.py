"""The trusted computing base, listed in one place: every file the enclave image contains.

"Does this change alter PCR0?" has a one-hop answer: it does exactly when it touches a path
below (or the pinned libraries in `eif/requirements-enclave.txt`, or the base image).

- `Dockerfile.enclave` copies exactly `TCB_PATHS` and `ENCLAVE_CONFIG` (tests/test_tcb.py).
- The mock PCR0 measures exactly `TCB_PATHS` (`cloister.dev.measure`), so in mock mode a
  change to enclave code changes PCR0 as rebuilding the EIF would.
- tests/test_tcb.py lays the image out from this list and imports the enclave from it alone:
  it must import nothing outside the list but `TCB_DISTRIBUTIONS`, and every listed module
  must be imported (nothing ships that the enclave never runs).
- The README's image size is `python -m cloister.tcb` (lines per path; tests/test_tcb.py checks it).

Paths are relative to the repository root (and to site-packages in an installed wheel).
Files are listed one by one, so a module written but not yet used by the enclave stays out of
the image until something imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

TCB_PATHS: Final = (
    "cloister/__init__.py",
    "cloister/enclave/__init__.py",
    "cloister/enclave/__main__.py",
    "cloister/enclave/anonymous.py",
    "cloister/enclave/bundle.py",
    "cloister/enclave/config.py",
    "cloister/enclave/core.py",
    "cloister/enclave/decide.py",
    "cloister/enclave/freshness.py",
    "cloister/enclave/limits.py",
    "cloister/enclave/nsm.py",
    "cloister/enclave/policy.py",
    "cloister/enclave/resume.py",
    "cloister/enclave/sealing.py",
    "cloister/enclave/sequencer.py",
    "cloister/enclave/server_identity.py",
    "cloister/enclave/servers.py",
    "cloister/enclave/service.py",
    "cloister/wire/__init__.py",
    "cloister/wire/bridge.py",
    "cloister/wire/contract.py",
    "cloister/wire/enclave_pb2.py",
    "cloister/wire/enclave_pb2_grpc.py",
    "cloister/verify/__init__.py",
    "cloister/verify/attestation.py",
    "cloister/verify/aws_nitro_root_g1.pem",
    "cloister/verify/bundle.py",
    "cloister/verify/canonical.py",
    "cloister/verify/checkpoint.py",
    "cloister/verify/cose.py",
    "cloister/verify/cosignature.py",
    "cloister/verify/der.py",
    "cloister/verify/enclave_identity.py",
    "cloister/verify/entries.py",
    "cloister/verify/errors.py",
    "cloister/verify/grant.py",
    "cloister/verify/jwt.py",
    "cloister/verify/merkle.py",
    "cloister/verify/note.py",
    "cloister/verify/response_sig.py",
    "cloister/verify/tools.py",
    "cloister/verify/x402.py",
)
# The measured configuration (origin, pinned admin keys, trust root); copied beside the code.
ENCLAVE_CONFIG: Final = "eif/enclave.toml"
# Third-party distributions the TCB imports (pinned in eif/requirements-enclave.txt).
TCB_DISTRIBUTIONS: Final = ("cbor2", "cedarpy", "cryptography", "grpcio", "protobuf")
# The one entry point the image runs.
ENCLAVE_MODULE: Final = "cloister.enclave"
ENCLAVE_PORT: Final = 5005  # vsock; parent port 9000 is nitro-cli's heartbeat

SOURCE_SUFFIXES: Final = (".py", ".pem")


def source_root() -> Path:
    """The directory that holds the `cloister` package (the repository, or site-packages)."""
    return Path(__file__).resolve().parent.parent


def tcb_files(root: Path | None = None) -> list[Path]:
    """Every file of the TCB under `root`, in a fixed (sorted, path-relative) order."""
    root = root or source_root()
    files: set[Path] = set()
    for entry in TCB_PATHS:
        path = root / entry
        if entry.endswith("/"):
            files.update(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts
            )
        else:
            files.add(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def line_counts(root: Path | None = None) -> dict[str, tuple[int, int]]:
    """Per TCB Python file: (all lines, lines of code: non-blank, not a comment)."""
    root = root or source_root()
    out: dict[str, tuple[int, int]] = {}
    for path in tcb_files(root):
        if path.suffix == ".py":
            lines = path.read_text().splitlines()
            code = sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))
            out[path.relative_to(root).as_posix()] = (len(lines), code)
    return out


def hand_written_lines(root: Path | None = None) -> tuple[int, int]:
    """(all lines, lines of code) of the TCB's Python written by hand (not the gRPC stubs)."""
    counts = [v for k, v in line_counts(root).items() if "_pb2" not in k]
    return sum(v[0] for v in counts), sum(v[1] for v in counts)


def main() -> int:
    counts = line_counts()
    print("  lines    code  file")
    for path, (lines, code) in counts.items():
        print(f"{lines:7d} {code:7d}  {path}")
    lines, code = hand_written_lines()
    total = sum(v[0] for v in counts.values())
    print(f"{lines:7d} {code:7d}  written by hand ({total - lines} more lines are generated gRPC stubs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
