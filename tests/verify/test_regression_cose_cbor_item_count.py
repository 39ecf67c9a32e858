"""Regression found by the fuzzer (cloister/dev/fuzz.py): CBOR that decodes into millions of objects.

`decode_cbor` decoded whatever it was given before anyone looked at the result: 8 MiB of one-byte
integers inside an indefinite-length array (the size a bundle may have) became a list of 8 million
Python objects, about 300 MiB and 1.5 s, before parse_cose_sign1 found that it was not a COSE_Sign1.
The enclave parses a pushed bundle's envelope before its signature, and anyone may push. The items
are now counted on the wire first (at most MAX_CBOR_ITEMS), without building them.
"""

from __future__ import annotations

import tracemalloc

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.verify.bundle import MAX_BUNDLE_BYTES, admin_key_id, read_bundle_header, sign_bundle, verify_bundle
from cloister.verify.cose import MAX_CBOR_ITEMS, decode_cbor, encode_cose_sign1, parse_cose_sign1
from cloister.verify.errors import DecodeError

MANY = (8 << 20) - 16
ORIGIN = "regression.test/log"
NOT_AFTER = 2_000_000_000


def peak_bytes_of(fn: object) -> int:
    tracemalloc.start()
    try:
        assert callable(fn)
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_envelope_of_millions_of_tiny_items_is_refused_before_it_is_decoded() -> None:
    data = b"\xd2\x9f" + b"\x2e" * MANY + b"\xff"  # tag 18, an indefinite array of 8 Mi integers

    def parse() -> None:
        with pytest.raises(DecodeError, match=f"^COSE_Sign1: more than {MAX_CBOR_ITEMS} CBOR data items$"):
            parse_cose_sign1(data, max_size=MAX_BUNDLE_BYTES + 4096)

    assert peak_bytes_of(parse) < 16 << 20


def test_an_unverified_bundle_payload_of_millions_of_items_is_refused_before_it_is_decoded() -> None:
    payload = b"\x9b" + (MANY).to_bytes(8, "big") + b"\xf6" * MANY  # a definite array of 8 Mi nulls
    data = encode_cose_sign1({1: -8}, {}, payload, lambda _: b"s" * 64, tagged=True)
    key = ed25519.Ed25519PrivateKey.generate()

    def read() -> None:
        with pytest.raises(DecodeError, match="bundle payload: more than"):
            read_bundle_header(data)
        with pytest.raises(Exception, match="bundle has no key id in its protected header"):
            verify_bundle(data, {admin_key_id(key.public_key()): key.public_key()}, origin=ORIGIN, now_ms=0)

    assert peak_bytes_of(read) < 48 << 20


def test_up_to_the_limit_everything_decodes_as_cbor2_decodes_it() -> None:
    for data in (
        b"\x9f" + b"\x01" * (MAX_CBOR_ITEMS - 1) + b"\xff",
        b"\x5f\x41a\x41b\xff",
        b"\xbf\x01\x9f\xff\xff",
        cbor2.dumps({"files": {f"f{i}": b"x" * i for i in range(512)}, "v": [1, -2, 2**64 - 1, 1.5, None]}),
    ):
        assert decode_cbor(data, what="x") == cbor2.loads(data)
    with pytest.raises(DecodeError, match="more than"):
        decode_cbor(b"\x9f" + b"\x01" * MAX_CBOR_ITEMS + b"\xff", what="x")


def test_a_bundle_of_the_most_files_allowed_still_verifies() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    files = {f"policies/p{i}.cedar": b"permit(principal, action, resource);" for i in range(512)}
    bundle = sign_bundle(files, 3, key, origin=ORIGIN, not_after=NOT_AFTER)
    signed = verify_bundle(bundle, {admin_key_id(key.public_key()): key.public_key()}, origin=ORIGIN, now_ms=0)
    assert signed.version == 3 and len(signed.files) == 512
