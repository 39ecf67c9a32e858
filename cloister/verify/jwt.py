"""JSON Web Tokens (RFC 7519) in JWS compact form (RFC 7515), the few algorithms agents use.

Verification runs inside the enclave, never in the parent: the parent only forwards the
bearer token. Supported algorithms: EdDSA (Ed25519, RFC 8037), ES256 (RFC 7518 §3.4) and
RS256 (RFC 7518 §3.3). `none`, HMAC and anything else are refused; the algorithm must match
the key's type, so a public key can never be used as an HMAC secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from cloister.verify.entries import quoted
from cloister.verify.errors import DecodeError, VerificationError

MAX_TOKEN_BYTES = 8192
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class TokenError(VerificationError):
    """A bearer token was refused. `reason` is a short machine-readable class."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedToken:
    issuer: str
    subject: str
    claims: Mapping[str, Any]
    expires_at: int


def _b64url_decode(part: str, what: str) -> bytes:
    if any(c in part for c in "=+/ \n"):
        raise DecodeError(f"token {what}: not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"token {what}: not base64url") from exc


def _json(raw: bytes, what: str) -> Any:
    """JSON text in UTF-8 (RFC 8259 §8.1), or a DecodeError that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what}: not UTF-8 (byte {exc.start})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(f"{what}: not JSON ({exc.msg} at column {exc.colno})") from exc
    except RecursionError as exc:
        raise DecodeError(f"{what}: JSON nested too deeply") from exc
    except ValueError as exc:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise DecodeError(f"{what}: a number has more than {sys.get_int_max_str_digits()} digits") from exc


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


MAX_JWKS_KEYS = 64


def load_jwks(data: bytes) -> list[tuple[str | None, PublicKey]]:
    """The signing keys of a JWK Set (RFC 7517 §5): Ed25519 (OKP, RFC 8037), P-256 (EC), RSA.

    Keys for other curves or uses (`use` other than "sig") are skipped; a malformed set or key is
    a DecodeError naming the key.
    """
    doc = _json(data, "JWK Set")
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys or len(keys) > MAX_JWKS_KEYS:
        raise DecodeError(f"JWK Set needs a 'keys' array of 1 to {MAX_JWKS_KEYS} keys")
    out: list[tuple[str | None, PublicKey]] = []
    for i, jwk in enumerate(keys):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
        try:
            key = _jwk_key(jwk)
        except (DecodeError, ValueError, KeyError, TypeError) as exc:
            raise DecodeError(f"JWK Set key #{i} ({kid or 'no kid'}): {exc}") from exc
        if key is not None:
            out.append((kid, key))
    if not out:
        raise DecodeError("JWK Set has no usable signing key (Ed25519, P-256 or RSA)")
    return out


def _jwk_key(jwk: dict[str, Any]) -> PublicKey | None:
    def num(name: str) -> int:
        return int.from_bytes(_b64url_decode(str(jwk[name]), name), "big")

    kty = jwk.get("kty")
    if kty == "OKP" and jwk.get("crv") == "Ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(_b64url_decode(str(jwk["x"]), "x"))
    if kty == "EC" and jwk.get("crv") == "P-256":
        return ec.EllipticCurvePublicNumbers(num("x"), num("y"), ec.SECP256R1()).public_key()
    if kty == "RSA":
        key = rsa.RSAPublicNumbers(num("e"), num("n")).public_key()
        alg_for_key(key)  # refuses keys under 2048 bits
        return key
    return None


def alg_for_key(key: PublicKey | PrivateKey) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name != "secp256r1":
            raise DecodeError(f"EC keys must be P-256 for ES256, got {key.curve.name}")
        return "ES256"
    if key.key_size < 2048:
        raise DecodeError(f"RSA keys must have at least 2048 bits, got {key.key_size}")
    return "RS256"


def encode_jwt(claims: Mapping[str, Any], key: PrivateKey, *, kid: str | None = None) -> str:
    alg = alg_for_key(key)
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(dict(claims), separators=(",", ":"), sort_keys=True).encode())
    )
    data = signing_input.encode("ascii")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(data)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + _b64url(sig)


def _verify_signature(alg: str, key: PublicKey, data: bytes, sig: bytes) -> None:
    if alg_for_key(key) != alg:
        raise TokenError("bad-signature", f"token algorithm {alg} does not match the issuer key type")
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if len(sig) != 64:
                raise TokenError("bad-signature", "ES256 signature must be 64 bytes")
            der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            key.verify(der, data, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature as exc:
        raise TokenError("bad-signature", "token signature does not verify with the issuer's key") from exc


def peek_issuer(token: str) -> str:
    """The unverified `iss` claim, used only to pick the issuer's keys."""
    payload = _split(token)[1]
    iss = payload.get("iss")
    if not isinstance(iss, str) or not iss:
        raise TokenError("malformed", "token has no 'iss' claim")
    return iss


def _split(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError("malformed", f"token is longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("malformed", "token is not a JWS compact serialisation (header.payload.signature)")
    try:
        header = _json(_b64url_decode(parts[0], "header"), "token header")
        payload = _json(_b64url_decode(parts[1], "payload"), "token payload")
        sig = _b64url_decode(parts[2], "signature")
    except DecodeError as exc:
        raise TokenError("malformed", f"token is malformed: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise TokenError("malformed", "token header and payload must be JSON objects")
    return header, payload, (parts[0] + "." + parts[1]).encode("ascii"), sig


# NumericDate claims (RFC 7519 §2) are whole seconds here, in a range a message can quote.
MAX_NUMERIC_DATE = 2**53


def _numeric_date(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_NUMERIC_DATE


def verify_jwt(
    token: str,
    keys: Sequence[tuple[str | None, PublicKey]],
    *,
    issuer: str,
    audience: str,
    now: int,
    leeway_s: int = 30,
    max_lifetime_s: int = 86400,
) -> VerifiedToken:
    """Verify a bearer token per RFC 7519 §7.2 and return its claims, or raise TokenError.

    `keys` are the issuer's (kid, key) pairs; `now` is Unix seconds, passed in by the caller.
    """
    # 1. Parse the JWS compact serialisation (RFC 7515 §5.2 steps 1-6).
    header, claims, signing_input, sig = _split(token)
    # 2. The algorithm is one we support; never "none" (RFC 8725 §3.1).
    alg = header.get("alg")
    if alg not in ("EdDSA", "ES256", "RS256"):
        raise TokenError("bad-signature", f"token algorithm {quoted(alg)} is not accepted (EdDSA, ES256, RS256)")
    if "crit" in header:
        raise TokenError("malformed", "token header has 'crit' extensions, which are not supported")
    # 3. Pick the key by kid when the token names one, else try each key of the issuer.
    kid = header.get("kid")
    candidates = [k for (k_id, k) in keys if kid is None or k_id is None or k_id == kid]
    if not candidates:
        raise TokenError("unknown-key", f"token key id {quoted(kid)} is not a key of issuer {quoted(issuer)}")
    # 4. Verify the signature (RFC 7515 §5.2 step 8).
    last: TokenError | None = None
    for key in candidates:
        try:
            _verify_signature(alg, key, signing_input, sig)
            break
        except TokenError as exc:
            last = exc
    else:
        assert last is not None
        raise last
    # 5. Registered claims (RFC 7519 §4.1).
    if claims.get("iss") != issuer:
        raise TokenError("wrong-issuer", f"token issuer {quoted(claims.get('iss'))} is not {quoted(issuer)}")
    aud = claims.get("aud")
    if not (aud == audience or (isinstance(aud, list) and audience in aud)):
        raise TokenError("wrong-audience", f"token audience {quoted(aud)} does not include {quoted(audience)}")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenError("malformed", "token has no 'sub' claim")
    exp = claims.get("exp")
    if not _numeric_date(exp):
        raise TokenError("malformed", f"token has no numeric 'exp' claim (whole seconds, 0 to {MAX_NUMERIC_DATE})")
    if now >= exp + leeway_s:
        raise TokenError("expired", f"token expired {now - exp}s ago")
    iat = claims.get("iat")
    nbf = claims.get("nbf", iat)
    if any(v is not None and not _numeric_date(v) for v in (iat, claims.get("nbf"))):
        raise TokenError("malformed", f"token 'nbf'/'iat' must be numeric (whole seconds, 0 to {MAX_NUMERIC_DATE})")
    if isinstance(nbf, int) and now + leeway_s < nbf:
        raise TokenError("not-yet-valid", f"token is not valid for another {nbf - now}s")
    # The lifetime is bounded whether or not the token says when it was issued: a token without
    # `iat` (or with one in the past) may not stay valid longer from now than the issuer allows.
    if isinstance(iat, int) and exp - iat > max_lifetime_s:
        raise TokenError("too-long-lived", f"token lifetime {exp - iat}s exceeds the issuer's {max_lifetime_s}s")
    if exp - now > max_lifetime_s + leeway_s:
        raise TokenError(
            "too-long-lived", f"token is valid for another {exp - now}s, longer than the issuer's {max_lifetime_s}s"
        )
    return VerifiedToken(issuer=issuer, subject=sub, claims=claims, expires_at=exp)
