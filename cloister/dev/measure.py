"""Mock-mode measurements: PCRs computed from the enclave code actually loaded.

A real PCR0 is the SHA-384 measurement of the whole enclave image. In mock mode we measure
what the image would contain instead: every file `cloister.tcb.TCB_PATHS` lists (in sorted
order, path and content), the measured configuration file, and the runtime (Python and the
versions of `cloister.tcb.TCB_DISTRIBUTIONS`). Changing one byte of a TCB file or of the config
therefore changes the mock PCR0, as rebuilding the EIF would change the real one; changing
anything outside the TCB does not.

PCR values follow the NSM's extend rule from an all-zero register: PCR = SHA-384(0^48 || m).
This module is development code: it never enters the enclave image.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from pathlib import Path

from cloister.tcb import TCB_DISTRIBUTIONS, source_root, tcb_files


def code_digest() -> bytes:
    h = hashlib.sha384()
    root = source_root()
    for path in tcb_files(root):
        rel = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        h.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.digest()


def runtime_digest() -> bytes:
    parts = [f"python {sys.version}"]
    for dist in TCB_DISTRIBUTIONS:
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
