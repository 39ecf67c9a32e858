"""Mock-mode measurements: PCRs computed from the enclave code actually loaded.

A real PCR0 is the SHA-384 measurement of the whole enclave image. In mock mode we measure
what the running enclave process executes instead: every source file of the packages it
imports from this project (`enclave`, `cloister.verify`, `cloister.rpc`, in sorted order,
path and content), the measured configuration file, and the runtime (Python and the
versions of the libraries the enclave uses). Changing one byte of enclave code or config
therefore changes the mock PCR0, as rebuilding the EIF would change the real one.

PCR values follow the NSM's extend rule from an all-zero register: PCR = SHA-384(0^48 || m).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from pathlib import Path

MEASURED_PACKAGES = ("enclave", "cloister.verify", "cloister.rpc")
RUNTIME_DISTRIBUTIONS = ("cbor2", "cedarpy", "cryptography", "grpcio", "protobuf")


def _package_dir(name: str) -> Path:
    module = __import__(name, fromlist=["__file__"])
    return Path(module.__file__).parent  # type: ignore[arg-type]


def code_digest() -> bytes:
    h = hashlib.sha384()
    for pkg in MEASURED_PACKAGES:
        root = _package_dir(pkg)
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in (".py", ".pem", ".pyi") and "__pycache__" not in path.parts:
                rel = f"{pkg}/{path.relative_to(root).as_posix()}".encode()
                data = path.read_bytes()
                h.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.digest()


def runtime_digest() -> bytes:
    parts = [f"python {sys.version}"]
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} absent")
    return hashlib.sha384("\n".join(parts).encode()).digest()


def extend(measurement: bytes) -> bytes:
    return hashlib.sha384(bytes(48) + measurement).digest()


def mock_pcrs(config_bytes: bytes) -> dict[int, bytes]:
    """PCR0 = image (code, config, runtime), PCR1 = runtime, PCR2 = code, as in an EIF's split."""
    code, runtime = code_digest(), runtime_digest()
    config = hashlib.sha384(config_bytes).digest()
    image = hashlib.sha384(code + config + runtime).digest()
    return {0: extend(image), 1: extend(runtime), 2: extend(code)}


def measure_files(paths: list[Path], extra: bytes = b"") -> bytes:
    """A mock PCR0 for an upstream server: its code files (path names and contents) and `extra`."""
    h = hashlib.sha384()
    for path in paths:
        data = path.read_bytes()
        name = path.name.encode()
        h.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big") + data)
    h.update(extra)
    return extend(h.digest())
