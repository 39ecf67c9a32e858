"""Agent bearer tokens: each refusal names its reason; no algorithm confusion."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cloister.verify.jwt import TokenError, encode_jwt, peek_issuer, verify_jwt

NOW = 1_800_000_000
ED = ed25519.Ed25519PrivateKey.generate()
EC = ec.generate_private_key(ec.SECP256R1())
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def claims(**over: object) -> dict[str, object]:
    c: dict[str, object] = {
        "iss": "dev",
        "aud": "cloister",
        "sub": "refund-bot",
        "iat": NOW,
        "exp": NOW + 600,
        "roles": ["refund-agent"],
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def verify(token: str, key: object = None, **kw: object) -> object:
    pub = (key or ED).public_key()  # type: ignore[attr-defined]
    args: dict[str, object] = {"issuer": "dev", "audience": "cloister", "now": NOW}
    args.update(kw)
    return verify_jwt(token, [(None, pub)], **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [ED, EC, RSA], ids=["EdDSA", "ES256", "RS256"])
def test_good_tokens(key: object) -> None:
    tok = encode_jwt(claims(), key)  # type: ignore[arg-type]
    v = verify(tok, key)
    assert v.subject == "refund-bot" and v.claims["roles"] == ["refund-agent"]  # type: ignore[attr-defined]
    assert peek_issuer(tok) == "dev"


def _b64(d: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (encode_jwt(claims(exp=NOW - 100), ED), "expired"),
        (encode_jwt(claims(iat=NOW + 600, exp=NOW + 900), ED), "not-yet-valid"),
        (encode_jwt(claims(iss="other"), ED), "wrong-issuer"),
        (encode_jwt(claims(aud="someone-else"), ED), "wrong-audience"),
        (encode_jwt(claims(exp=NOW + 10 * 86400), ED), "too-long-lived"),
        (encode_jwt(claims(), ed25519.Ed25519PrivateKey.generate()), "bad-signature"),
        (encode_jwt(claims(), EC), "bad-signature"),  # ES256 token, Ed25519 issuer key
        (_b64({"alg": "none"}) + "." + _b64(claims()) + ".", "bad-signature"),
        (_b64({"alg": "HS256"}) + "." + _b64(claims()) + ".c2ln", "bad-signature"),
        ("not-a-token", "malformed"),
        ("a.b", "malformed"),
        ("x" * 9000, "malformed"),
        (encode_jwt(claims(sub=None), ED), "malformed"),
        (encode_jwt(claims(exp="soon"), ED), "malformed"),
    ],
)
def test_refusals(token: str, reason: str) -> None:
    with pytest.raises(TokenError) as err:
        verify(token)
    assert err.value.reason == reason, str(err.value)


def test_tampered_payload() -> None:
    h, _, s = encode_jwt(claims(), ED).split(".")
    forged = h + "." + _b64(claims(sub="admin-bot")) + "." + s
    with pytest.raises(TokenError, match="does not verify"):
        verify(forged)


def test_kid_selects_key() -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    tok = encode_jwt(claims(), ED, kid="k2")
    keys = [("k1", other.public_key()), ("k2", ED.public_key())]
    assert verify_jwt(tok, keys, issuer="dev", audience="cloister", now=NOW).subject == "refund-bot"
    with pytest.raises(TokenError, match="key id 'k2'"):
        verify_jwt(tok, keys[:1], issuer="dev", audience="cloister", now=NOW)


def test_a_token_without_iat_is_bounded_by_the_lifetime_too() -> None:
    """Regression (issue 9): without `iat`, `exp - iat` could not be checked, so a token valid for
    years passed max_lifetime_s. The time left (`exp - now`) is bounded as well."""
    with pytest.raises(TokenError) as err:
        verify(encode_jwt(claims(iat=None, exp=NOW + 10 * 365 * 86400), ED), max_lifetime_s=3600)
    assert err.value.reason == "too-long-lived"
    with pytest.raises(TokenError) as err:  # an iat in the future does not help either
        verify(encode_jwt(claims(iat=NOW + 20, nbf=NOW, exp=NOW + 20 + 3600), ED), max_lifetime_s=3600, leeway_s=0)
    assert err.value.reason == "too-long-lived"
    assert verify(encode_jwt(claims(iat=None, exp=NOW + 3600), ED), max_lifetime_s=3600)
    assert verify(encode_jwt(claims(iat=None, exp=NOW + 3620), ED), max_lifetime_s=3600)  # within the leeway


@pytest.mark.parametrize("name", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("value", [-(10**4000), 10**4000, -1, 2**53 + 1, 1.5, "1", True])
def test_numeric_dates_are_whole_seconds_in_range(name: str, value: object) -> None:
    with pytest.raises(TokenError) as err:
        verify(encode_jwt(claims(**{name: value}), ED))
    assert err.value.reason == "malformed" and len(str(err.value)) < 200


@pytest.mark.parametrize(
    "token",
    [
        encode_jwt(claims(iss="i" * 4000), ED),
        encode_jwt(claims(aud=["a" * 2000, "b" * 2000]), ED),
        encode_jwt(claims(), ED, kid="k" * 4000),
        _b64({"alg": "x" * 4000}) + "." + _b64(claims()) + ".AAAA",
    ],
    ids=["iss", "aud", "kid", "alg"],
)
def test_refusals_quote_claims_briefly(token: str) -> None:
    """Regression (issue 9): messages quoted whole claims, and the enclave logged the message."""
    with pytest.raises(TokenError) as err:
        verify_jwt(token, [("k1", ED.public_key())], issuer="dev", audience="cloister", now=NOW)
    assert len(str(err.value)) < 400 and "chars)" in str(err.value)
