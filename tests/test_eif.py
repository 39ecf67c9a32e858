"""The enclave image, validated without Docker: what it copies, and what that code imports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile.enclave").read_text()


def copies() -> list[tuple[str, str]]:
    return re.findall(r"^COPY (\S+) (\S+)$", DOCKERFILE, re.M)


def test_image_holds_only_the_trusted_code() -> None:
    sources = [src for src, _ in copies()]
    assert sources, "no COPY lines"
    for src in sources:
        assert (ROOT / src).exists(), f"{src} does not exist"
        assert not src.startswith(("parent", "tests", "scripts")), f"{src} must not enter the enclave image"
    assert 'CMD ["python", "-m", "enclave", "--listen", "vsock:5005"' in DOCKERFILE
    assert "9000" not in re.findall(r"vsock:(\d+)", DOCKERFILE)


def test_pinned_dependencies_match_the_project() -> None:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    wanted = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "eif/requirements-enclave.txt").read_text(), re.M)
    for name, version in wanted:
        assert pins.get(name.lower().replace("_", "-")) == version, f"{name}=={version} differs from constraints.txt"


def test_image_code_imports_nothing_else(tmp_path: Path) -> None:
    # Lay out the image's files, then import every enclave module with only them and the
    # pinned libraries on the path: no parent/, no mcp, no starlette, no boto3.
    for src, dst in copies():
        target = tmp_path / dst.removeprefix("/opt/cloister/")
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / src, target)
    allowed = {"cbor2", "cedarpy", "cryptography", "cffi", "grpc", "google", "typing_extensions", "_cffi_backend",
               # grpcio probes for grpc_tools (runtime .proto loading) when it is installed, as it is
               # in the dev venv; the image does not install it and nothing of ours needs it.
               "grpc_tools"}
    probe = f"""
import sys, importlib, pkgutil, sysconfig
sys.path = [{str(tmp_path)!r}, *{[p for p in sys.path if p]!r}]
import enclave
for m in pkgutil.walk_packages(enclave.__path__, "enclave."):
    importlib.import_module(m.name)
importlib.import_module("enclave.__main__")
stdlib = sysconfig.get_paths()["stdlib"]
third = sorted({{n.split(".")[0] for n, mod in sys.modules.items()
                 if getattr(mod, "__file__", None) and "site-packages" in mod.__file__}})
local = sorted({{n.split(".")[0] for n, mod in sys.modules.items()
                 if getattr(mod, "__file__", None) and mod.__file__.startswith({str(tmp_path)!r})}})
print(" ".join(third)); print(" ".join(local))
"""
    # -S: no site processing, so no .pth hooks (editable installs) leak into the probe.
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    third, local = (line.split() for line in out.stdout.strip().splitlines())
    assert set(third) <= allowed, f"the enclave imports {sorted(set(third) - allowed)}"
    assert set(local) == {"enclave", "cloister"}, local
