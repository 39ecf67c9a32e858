"""Regression found by the fuzzer (cloister/dev/fuzz.py): a signed bundle whose "format" is an array or a map.

The check for payloads of the old format asked `format in OLD_FORMATS` (a frozenset) of whatever the
payload held, and an array or map is unhashable: verify_bundle raised TypeError (in the enclave, a
LoadPolicy answered INTERNAL) instead of refusing the payload as not a cloister-bundle/2.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.verify.bundle import ALG_EDDSA, FORMAT, admin_key_id, verify_bundle
from cloister.verify.cose import encode_cose_sign1
from cloister.verify.errors import DecodeError

KEY = ed25519.Ed25519PrivateKey.generate()
KEYS = {admin_key_id(KEY.public_key()): KEY.public_key()}


def signed(body: dict[str, Any]) -> bytes:
    kid = admin_key_id(KEY.public_key()).encode()
    return encode_cose_sign1({1: ALG_EDDSA, 4: kid}, {}, cbor2.dumps(body), KEY.sign, tagged=True)


@pytest.mark.parametrize("fmt", [[FORMAT], {"f": FORMAT}, ["cloister-bundle/1"], 2, None, b"cloister-bundle/2"])
def test_a_format_that_is_not_text_is_refused_as_not_a_bundle(fmt: object) -> None:
    body = {"format": fmt, "version": 2, "origin": "o", "not_after": 2_000_000_000, "files": {}}
    with pytest.raises(DecodeError, match=f"^bundle payload is not {FORMAT}$"):
        verify_bundle(signed(body), KEYS, origin="o", now_ms=0)
