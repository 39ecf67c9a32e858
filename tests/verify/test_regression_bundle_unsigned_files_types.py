"""Regression found by the fuzzer (cloister/dev/fuzz.py): `unsigned_files` converted what it read.

A bundle whose payload mapped a file name to text raised TypeError ("string argument without an
encoding"), and one that mapped it to an integer N returned N zero bytes: five bytes of CBOR could
make `cloister policy diff` or `validate` allocate gigabytes. The file map is now checked like
`verify_bundle` checks it.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from cloister.verify.bundle import FORMAT, unsigned_files
from cloister.verify.cose import encode_cose_sign1
from cloister.verify.errors import DecodeError


def bundle_with(files: Any) -> bytes:
    payload = cbor2.dumps({"format": FORMAT, "version": 1, "files": files})
    return encode_cose_sign1({1: -8}, {}, payload, lambda _: b"s" * 64, tagged=True)


@pytest.mark.parametrize("files", [{"a": "text"}, {"a": 4_294_967_296}, {1: b"x"}, {"a": [b"x"]}, {"a": None}])
def test_a_file_map_that_is_not_names_to_bytes_is_a_decode_error(files: Any) -> None:
    with pytest.raises(DecodeError, match="bundle payload 'files' must map names to bytes"):
        unsigned_files(bundle_with(files))


def test_well_formed_files_are_returned_as_they_are() -> None:
    assert unsigned_files(bundle_with({"bundle.toml": b"[bundle]\n", "policies/a.cedar": b""})) == {
        "bundle.toml": b"[bundle]\n",
        "policies/a.cedar": b"",
    }
