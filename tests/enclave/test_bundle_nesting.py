"""Regression (found by the boundary fuzzer): a bundle TOML file with arrays nested a few thousand
deep made tomllib recurse until RecursionError, which escaped the bundle parser as a crash
instead of a refusal. It is now a BundleError naming the file."""

from __future__ import annotations

import base64
import re
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
    with pytest.raises(
        BundleError, match=r"^policies/deep.cedar: (brackets nested more than 64 deep|more than 2048 && and \|\|)"
    ):
        parse_bundle_files({**files, "policies/deep.cedar": policy.encode()}, check_references=False)


def _with_policy(tmp_path: Path, policy: str) -> dict[str, bytes]:
    files = read_bundle_dir(decision_bundle(tmp_path / "b"))
    files["issuers/cloister-dev.pem"] = (
        ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return {**files, "policies/deep.cedar": policy.encode()}


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        # cedarpy crashed the process (SIGSEGV) at about 5,000 (is_authorized), measured here.
        ("if true then " * 5000 + "true" + " else false" * 5000, "more than 256 if-expressions"),
        # ... and on an && chain of about 20,000 terms (policies_to_json_str).
        (" && ".join(["true"] * 20_000), "more than 2048 && and || in one policy file"),
        (" || ".join(["false"] * 2_100), "more than 2048 && and ||"),
    ],
)
def test_long_cedar_chains_are_refused_before_cedar_sees_them(tmp_path: Path, condition: str, message: str) -> None:
    policy = f"permit (principal, action, resource) when {{ {condition} }};\n"
    with pytest.raises(BundleError, match=rf"^policies/deep.cedar: {re.escape(message)}"):
        parse_bundle_files(_with_policy(tmp_path, policy), check_references=False)


def test_operators_inside_strings_do_not_count(tmp_path: Path) -> None:
    words = " && ".join(["if"] * 3000)
    policy = f'permit (principal, action, resource) when {{ context.note == "{words}" }};\n'
    parse_bundle_files(_with_policy(tmp_path, policy), check_references=False)


def test_huge_integers_and_windows_are_refused_naming_the_file(tmp_path: Path) -> None:
    # Regression (boundary fuzzer): tomllib raised ValueError on an integer over Python's 4,300-digit
    # limit, and a window of thousands of digits raised it in _duration.
    with pytest.raises(BundleError, match=r"^limits.toml: .*4300"):
        read_toml({"limits.toml": b"x = " + b"9" * 5000 + b"\n"}, "limits.toml", required=True)
    files = read_bundle_dir(decision_bundle(tmp_path / "b"))
    files["issuers/cloister-dev.pem"] = (
        ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    limits = files["limits.toml"].decode()
    window = re.search(r'window = "[^"]+"', limits)
    assert window is not None
    huge = limits.replace(window.group(0), f'window = "{"9" * 5000}s"', 1)
    with pytest.raises(BundleError, match=r"window .* must look like 30s"):
        parse_bundle_files({**files, "limits.toml": huge.encode()})


def test_a_key_of_an_unknown_algorithm_is_refused(tmp_path: Path) -> None:
    # Regression (boundary fuzzer): a well-formed SubjectPublicKeyInfo with an algorithm OID that
    # cryptography does not know raised UnsupportedAlgorithm out of the parser.
    algorithm = bytes.fromhex("300506032a0304")  # AlgorithmIdentifier { 1.2.3.4 }
    spki = bytes([0x30, len(algorithm) + 7]) + algorithm + bytes.fromhex("03050001020304")
    pem = b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(spki) + b"-----END PUBLIC KEY-----\n"
    files = read_bundle_dir(decision_bundle(tmp_path / "b"))
    files["issuers/cloister-dev.pem"] = pem
    with pytest.raises(BundleError, match=r"^issuers/cloister-dev.pem: a public key of an unsupported algorithm"):
        parse_bundle_files(files)
