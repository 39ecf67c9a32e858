"""The enclave image, validated without Docker: it holds exactly the TCB listed in
`cloister.tcb`, and that code imports nothing else.

Docker cannot build here, so the image's file tree is laid out from the Dockerfile's COPY lines
and the enclave is imported from it alone, in a fresh interpreter.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from cloister.tcb import (
    ENCLAVE_CONFIG,
    ENCLAVE_MODULE,
    ENCLAVE_PORT,
    TCB_DISTRIBUTIONS,
    TCB_PATHS,
    hand_written_lines,
    tcb_files,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile.enclave").read_text()
IMAGE = "/opt/cloister/"


def copies() -> list[tuple[str, str]]:
    return re.findall(r"^COPY (\S+) (\S+)$", DOCKERFILE, re.M)


def code_copies() -> list[tuple[str, str]]:
    return [(src, dst) for src, dst in copies() if src.startswith("cloister")]


def test_dockerfile_copies_exactly_the_tcb_list() -> None:
    assert [src for src, _ in code_copies()] == list(TCB_PATHS)
    for src, dst in code_copies():
        assert dst == IMAGE + src, f"{src} is copied to {dst}, not to its own path under {IMAGE}"
    others = {src for src, _ in copies()} - set(TCB_PATHS)
    # Besides the TCB: the lock file, the config, and the build stage's normalizer (not in the image).
    assert others == {"eif/requirements-enclave.txt", ENCLAVE_CONFIG, "eif/rootfs.py"}, others
    assert f'CMD ["python", "-m", "{ENCLAVE_MODULE}", "--listen", "vsock:{ENCLAVE_PORT}"' in DOCKERFILE
    assert "9000" not in re.findall(r"vsock:(\d+)", DOCKERFILE)


def test_tcb_holds_no_development_or_untrusted_code() -> None:
    for path in tcb_files():
        rel = path.relative_to(ROOT).as_posix()
        assert path.exists(), f"{rel} is listed in cloister/tcb.py but does not exist"
        assert not rel.startswith(
            (
                "cloister/dev/",
                "cloister/relay/",
                "cloister/cli/",
                "cloister/audit/",
                "cloister/policytools/",
                "cloister/upstream/",
                "tests/",
                "scripts/",
            )
        ), rel
        assert "mock" not in path.name, f"{rel}: mock code must not enter the image"


def test_pinned_dependencies_match_the_project() -> None:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    # The image's file is a hash lock: `name==version \` lines, each followed by its --hash lines.
    lock = (ROOT / "eif/requirements-enclave.txt").read_text()
    wanted = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", lock, re.M)
    for name, version in wanted:
        assert pins.get(name.lower().replace("_", "-")) == version, f"{name}=={version} differs from constraints.txt"
    names = {name.lower() for name, _ in wanted}
    assert set(TCB_DISTRIBUTIONS) <= names, f"{set(TCB_DISTRIBUTIONS) - names} are not pinned for the image"


def lay_out_image(dst: Path) -> None:
    for src, target in code_copies():
        out = dst / target.removeprefix(IMAGE)
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, out, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / src, out)


def test_image_code_imports_nothing_else_and_everything_listed_is_used(tmp_path: Path) -> None:
    # Lay out the image's files, then import the enclave's entry point and every module of its
    # package with only them and the pinned libraries on the path: no relay, no mcp, no dev code.
    lay_out_image(tmp_path)
    allowed = {
        "cbor2",
        "cedarpy",
        "cryptography",
        "cffi",
        "grpc",
        "google",
        "typing_extensions",
        "_cffi_backend",
        # grpcio probes for grpc_tools (runtime .proto loading) when it is installed, as it is
        # in the dev venv; the image does not install it and nothing of ours needs it.
        "grpc_tools",
    }
    probe = f"""
import sys, importlib, pkgutil
sys.path = [{str(tmp_path)!r}, *{[p for p in sys.path if p]!r}]
import cloister.enclave
for m in pkgutil.walk_packages(cloister.enclave.__path__, "cloister.enclave."):
    importlib.import_module(m.name)
importlib.import_module("{ENCLAVE_MODULE}.__main__")
third = sorted({{n.split(".")[0] for n, mod in sys.modules.items()
                 if getattr(mod, "__file__", None) and "site-packages" in mod.__file__}})
local = sorted({{mod.__file__ for mod in sys.modules.values()
                 if (getattr(mod, "__file__", None) or "").startswith({str(tmp_path)!r})}})
print(" ".join(third)); print(" ".join(local))
"""
    # -S: no site processing, so no .pth hooks (editable installs) leak into the probe.
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    third, local = (line.split() for line in out.stdout.strip().splitlines())
    assert set(third) <= allowed, f"the enclave imports {sorted(set(third) - allowed)}"
    imported = {Path(f).relative_to(tmp_path).as_posix() for f in local}
    shipped = {p.relative_to(ROOT).as_posix() for p in tcb_files() if p.suffix == ".py"}
    assert shipped - imported == set(), f"the image ships modules the enclave never imports: {shipped - imported}"
    assert imported <= shipped


def test_the_image_has_no_mock_nsm(tmp_path: Path) -> None:
    # The image's entry point refuses --mock-nsm: the mock lives in cloister.dev, outside the image.
    lay_out_image(tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path = [{str(tmp_path)!r}, *{[p for p in sys.path if p]!r}]\n"
            "from cloister.enclave.__main__ import main\n"
            "sys.exit(main(['--listen', 'unix:/nonexistent/x', '--config', 'x', '--mock-nsm', 'd']))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "unrecognized arguments: --mock-nsm" in out.stderr, out.stderr
    assert not (tmp_path / "cloister" / "dev").exists()


def test_readme_reports_the_image_size() -> None:
    lines, _ = hand_written_lines()
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"The enclave image holds ([\d,]+) lines of Python written by hand", readme)
    assert m, "README.md must state the image's code size (python -m cloister.tcb)"
    assert abs(int(m.group(1).replace(",", "")) - lines) <= lines // 50, (
        f"README says {m.group(1)} lines; python -m cloister.tcb counts {lines}: update the README"
    )


def test_every_shipped_module_is_reachable_from_the_entry_point(tmp_path: Path) -> None:
    # Importing every module (above) proves the image is self-contained; this proves each module is
    # used: it is in the static import closure of the image's entry point, function-level imports
    # included (modulefinder reads the bytecode), so nothing ships that the enclave never runs.
    lay_out_image(tmp_path)
    probe = f"""
import modulefinder, sys
finder = modulefinder.ModuleFinder(path=[{str(tmp_path)!r}])
finder.run_script({str(tmp_path / "cloister" / "enclave" / "__main__.py")!r})
print(" ".join(sorted(m.__file__ for m in finder.modules.values() if m.__file__)))
"""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    reached = {Path(f).relative_to(tmp_path).as_posix() for f in out.stdout.split()}
    shipped = {p.relative_to(ROOT).as_posix() for p in tcb_files() if p.suffix == ".py"}
    assert shipped - reached == set(), f"the image ships modules its entry point never imports: {shipped - reached}"
