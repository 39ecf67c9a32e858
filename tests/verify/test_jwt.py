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
