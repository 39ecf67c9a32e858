"""Regressions found by the fuzzer (cloister/dev/fuzz.py): the JSON inside a token or a JWK Set.

A token whose header or payload was nested ~1000 levels deep made `peek_issuer` and `verify_jwt`
raise RecursionError (the enclave answered INTERNAL instead of denying the call), and a JWK Set
nested that deep did the same to the bundle parser. Non-UTF-8 parts and integers beyond Python's
4300-digit limit were refused, but with the raw text of Python's exceptions ("'utf-8' codec can't
decode byte ...", "Exceeds the limit (4300 digits) ... sys.set_int_max_str_digits()").
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.verify.errors import DecodeError
from cloister.verify.jwt import TokenError, load_jwks, peek_issuer, verify_jwt

KEY = ed25519.Ed25519PrivateKey.generate()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(header: bytes, payload: bytes) -> str:
    return f"{b64(header)}.{b64(payload)}.{b64(b'x' * 64)}"


DEEP = b"[" * 3000 + b"]" * 3000
CASES = [
    (token(b'{"alg":"EdDSA"}', DEEP), "token payload: JSON nested too deeply"),
    (token(DEEP, b'{"iss":"i"}'), "token header: JSON nested too deeply"),
    (token(b'{"alg":"EdDSA"}', b'{"iss":"\xff"}'), "token payload: not UTF-8 (byte 8)"),
    (token(b'{"alg":"EdDSA"}', b'{"exp":' + b"9" * 4301 + b"}"), "token payload: a number has more than 4300 digits"),
    (token(b'{"alg":"EdDSA"', b"{}"), "token header: not JSON (Expecting ',' delimiter at column 15)"),
]


@pytest.mark.parametrize(("text", "message"), CASES)
def test_malformed_json_in_a_token_is_a_malformed_token_with_a_clear_message(text: str, message: str) -> None:
    for check in (
        lambda: peek_issuer(text),
        lambda: verify_jwt(text, [(None, KEY.public_key())], issuer="i", audience="a", now=0),
    ):
        with pytest.raises(TokenError) as info:
            check()
        assert info.value.reason == "malformed"
        assert str(info.value) == f"token is malformed: {message}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"keys":' + DEEP + b"}", "JWK Set: JSON nested too deeply"),
        (b'{"keys":"\xfe"}', "JWK Set: not UTF-8 (byte 9)"),
        (b'{"keys":[' + b"1" * 5000 + b"]}", "JWK Set: a number has more than 4300 digits"),
        (b"\xef\xbb\xbf{}", "JWK Set: not JSON (Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1)"),
    ],
)
def test_malformed_jwk_set_json_is_a_decode_error_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        load_jwks(data)
    assert str(info.value) == message
