"""Regression (found by the boundary fuzzer): a bundle TOML file with arrays nested a few thousand
deep made tomllib recurse until RecursionError, which escaped the bundle parser as a crash
instead of a refusal. It is now a BundleError naming the file."""

from __future__ import annotations

import pytest

from cloister.enclave.bundle import BundleError, read_toml


@pytest.mark.parametrize("opening", ["[", "{a="])
def test_deeply_nested_toml_is_refused_not_a_crash(opening: str) -> None:
    text = "x = " + opening * 5000
    with pytest.raises(BundleError, match=r"limits.toml: arrays or tables nested too deeply"):
        read_toml({"limits.toml": text.encode()}, "limits.toml", required=True)
