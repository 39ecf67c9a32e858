"""The committed gRPC stubs must be exactly what scripts/gen-proto produces from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("enclave_pb2.py", "enclave_pb2.pyi", "enclave_pb2_grpc.py")


def test_stubs_match_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "proto/cloister/wire/enclave.proto",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    for name in STUBS:
        fresh = (tmp_path / "cloister" / "wire" / name).read_bytes()
        committed = (ROOT / "cloister" / "wire" / name).read_bytes()
        assert fresh == committed, f"cloister/wire/{name} drifted from the .proto: run scripts/gen-proto"


def test_drift_is_detected(tmp_path: Path) -> None:
    # The check above must be able to fail: a changed .proto yields different stubs.
    proto = (ROOT / "proto" / "cloister" / "wire" / "enclave.proto").read_text()
    changed = tmp_path / "in" / "cloister" / "wire"
    changed.mkdir(parents=True)
    (changed / "enclave.proto").write_text(proto.replace("bool ready = 10;", "bool ready = 10;\n  bool x = 11;"))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp_path / 'in'}",
            f"--python_out={out}",
            "cloister/wire/enclave.proto",
        ],
        check=True,
        capture_output=True,
    )
    assert (out / "cloister" / "wire" / "enclave_pb2.py").read_bytes() != (
        ROOT / "cloister" / "wire" / "enclave_pb2.py"
    ).read_bytes()
