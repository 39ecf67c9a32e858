"""Regression (found by the boundary fuzzer): a bundle TOML file with arrays nested a few thousand
deep made tomllib recurse until RecursionError, which escaped the bundle parser as a crash
instead of a refusal. It is now a BundleError naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.enclave.bundle import BundleError, parse_bundle_files, read_bundle_dir, read_toml
from tests.world import decision_bundle


@pytest.mark.parametrize("opening", ["[", "{a="])
def test_deeply_nested_toml_is_refused_not_a_crash(opening: str) -> None:
    text = "x = " + opening * 5000
    with pytest.raises(BundleError, match=r"limits.toml: arrays or tables nested too deeply"):
        read_toml({"limits.toml": text.encode()}, "limits.toml", required=True)


def test_a_value_of_the_wrong_type_is_refused_naming_the_file(tmp_path: Path) -> None:
    # Regression (boundary fuzzer): `keys = 5` in issuers.toml raised TypeError ('int' object is
    # not iterable) and `agents = [1]` in entities.toml AttributeError, both out of the parser.
    files = read_bundle_dir(decision_bundle(tmp_path / "b"))
    pem = (
        ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    files["issuers/cloister-dev.pem"] = pem
    parse_bundle_files(files)  # the bundle as it is parses
    issuers = files["issuers.toml"].decode().replace('keys = ["issuers/cloister-dev.pem"]', "keys = 5")
    with pytest.raises(BundleError, match=r"^issuers.toml: a value has the wrong TOML type"):
        parse_bundle_files({**files, "issuers.toml": issuers.encode()})
    with pytest.raises(BundleError, match=r"^entities.toml: a value has the wrong TOML type"):
        parse_bundle_files({**files, "entities.toml": b"agents = [1]\n[roles]\nr = {}\n"})


@pytest.mark.parametrize(
    "condition",
    [
        "(" * 700 + "true" + ")" * 700,  # cedarpy's parser crashed the process (SIGSEGV)
        "true && " * 3000 + "true",  # the JSON form was too deep for json.loads (RecursionError)
    ],
)
def test_deeply_nested_cedar_is_refused_not_a_crash(tmp_path: Path, condition: str) -> None:
    # Regression (boundary fuzzer): a signed bundle whose Cedar condition nests a few hundred deep.
    files = read_bundle_dir(decision_bundle(tmp_path / "b"))
    pem = (
        ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    files["issuers/cloister-dev.pem"] = pem
    policy = f"permit (principal, action, resource) when {{ {condition} }};\n"
    with pytest.raises(BundleError, match=r"^policies/deep.cedar: (brackets nested more than 64 deep|an expression)"):
        parse_bundle_files({**files, "policies/deep.cedar": policy.encode()}, check_references=False)
