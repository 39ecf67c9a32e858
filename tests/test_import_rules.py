"""The trust boundary as import rules: the contracts in pyproject.toml hold, and they can fail.

`lint-imports` (import-linter) runs in scripts/test on the real tree. Here we show that the
contracts catch what they are meant to catch: a copy of the package with one forbidden import
planted in the TCB (or in the verification library) must break them. A second check, which
ruff's private-name rule cannot make inside one namespace, refuses imports of another
subpackage's private names (`from cloister.enclave.bundle import _x` in the relay).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def run_lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


@pytest.fixture(scope="module")
def copy_of_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "cloister", tree / "cloister", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_real_tree_keeps_every_contract(copy_of_tree: Path) -> None:
    out = run_lint_imports(copy_of_tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("cloister/enclave/planted.py", "import cloister.relay.relay", "The enclave (TCB) imports nothing untrusted"),
        ("cloister/enclave/planted.py", "import cloister.dev.mock_nsm", "The enclave (TCB) imports nothing untrusted"),
        ("cloister/wire/planted.py", "import mcp", "The enclave (TCB) imports nothing untrusted"),
        ("cloister/verify/planted.py", "import grpc", "The verification library imports neither grpc nor mcp"),
        (
            "cloister/relay/planted.py",
            "import cloister.enclave.core",
            "The relay uses the enclave only through the wire",
        ),
        ("cloister/audit/planted.py", "import cloister.wire.enclave_pb2", "Auditors and upstreams need neither"),
    ],
)
def test_a_planted_forbidden_import_breaks_its_contract(
    copy_of_tree: Path, module: str, planted: str, contract: str
) -> None:
    path = copy_of_tree / module
    path.write_text(planted + "\n")
    try:
        out = run_lint_imports(copy_of_tree)
    finally:
        path.unlink()
    assert out.returncode != 0, out.stdout
    assert f"{contract}" in out.stdout and "BROKEN" in out.stdout, out.stdout


def subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def private_imports_across_subpackages(root: Path) -> list[str]:
    found = []
    for path in sorted((root / "cloister").rglob("*.py")):
        if "_pb2" in path.name:
            continue
        here = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cloister.")):
                continue
            if subpackage(node.module) == subpackage(here):
                continue
            found += [
                f"{path.relative_to(root)}:{node.lineno} imports {node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return found


def test_no_subpackage_imports_another_ones_private_names(tmp_path: Path) -> None:
    assert private_imports_across_subpackages(ROOT) == []
    # ... and the check can fail.
    (tmp_path / "cloister" / "relay").mkdir(parents=True)
    (tmp_path / "cloister" / "relay" / "x.py").write_text("from cloister.enclave.core import _PolicyState\n")
    assert private_imports_across_subpackages(tmp_path) == [
        "cloister/relay/x.py:1 imports cloister.enclave.core._PolicyState"
    ]
