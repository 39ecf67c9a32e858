"""The witness is a separate machine: it imports the verification library and nothing else of Cloister.

pyproject.toml's import-linter contracts do not name cloister.witness yet, so this checks the
direct imports here (stdlib, cryptography, starlette/uvicorn if ever needed, cloister.verify).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_THIRD_PARTY = {"cryptography", "starlette", "uvicorn"}
ALLOWED_CLOISTER = ("cloister.verify", "cloister.witness")


def imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def refused(name: str) -> bool:
    top = name.split(".")[0]
    if top == "cloister":
        return not name.startswith(ALLOWED_CLOISTER)
    return top not in sys.stdlib_module_names and top not in ALLOWED_THIRD_PARTY and top != "__future__"


def test_the_witness_imports_only_the_verification_library() -> None:
    files = sorted((ROOT / "cloister" / "witness").glob("*.py"))
    assert files
    bad = {f.name: [n for n in imports(f) if refused(n)] for f in files}
    assert {f: names for f, names in bad.items() if names} == {}


def test_the_check_can_fail() -> None:
    assert refused("cloister.enclave.core")
    assert refused("cloister.relay")
    assert refused("grpc")
    assert not refused("cloister.verify.cosignature")
    assert not refused("http.server")


def test_the_verification_library_does_not_import_the_witness() -> None:
    for f in sorted((ROOT / "cloister" / "verify").glob("*.py")):
        assert not [n for n in imports(f) if n.startswith("cloister.witness")], f.name
