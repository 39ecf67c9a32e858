"""Grants: the enclave's signed permission for exactly one tools/call, at one upstream instance.

A grant is a tagged COSE_Sign1 (RFC 9052 §4.2) signed with the enclave's grant key, alg EdDSA
(-8), `kid` = the first 8 bytes of SHA-256 over the raw grant public key. The payload is
deterministic CBOR (RFC 8949 §4.2.1):

    {"v": 2, "agent": text, "server": text, "tool": text,
     "args": SHA-256 of the RFC 8785 canonical JSON of the arguments,
     "policy": SHA-256 of the policy bundle, "log": index of the decision entry,
     "entry": leaf hash (RFC 9162) of the decision entry, "origin": the log's origin line,
     "iat": ms, "exp": ms, "nonce": 16 bytes,
     "aud": the upstream instance the grant is for (the bundle's `instance` of the server;
            "" when the bundle names none),
     and, for a call that carries an x402 payment, both of
     "pay": SHA-256 of the payment payload's RFC 8785 canonical JSON,
     "amount": the amount the enclave charged for it, a decimal string in the asset's units}

Version 1 grants (the same map with "v": 1 and no "aud", "pay" or "amount") still decode, so
an auditor can read old grants, but `verify_grant` refuses them for calls: they name no
upstream instance and bind no payment (docs/decisions/0010-grant-audience-and-payment.md).

The relay forwards the grant to the upstream server in the request's `_meta` under
GRANT_META_KEY, with the enclave's attestation document under ATTESTATION_META_KEY. An
upstream that verifies grants accepts a call only for exactly those arguments and that
payment, at the instance named, before `exp`, once per nonce store (`NonceStore`).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.verify.canonical import canonical_sha256
from cloister.verify.cose import decode_cbor, encode_cose_sign1, parse_cose_sign1, sig_structure
from cloister.verify.entries import dumps_deterministic
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.x402 import payment_sha256

GRANT_META_KEY = "dev.cloister/grant"
ATTESTATION_META_KEY = "dev.cloister/attestation"
MAX_GRANT_BYTES = 4096
# A grant's server-side name is at most this long: a longer one (a long resource URI) is kept as a
# prefix and its hash (`cloister.verify.entries.bounded`), by the enclave and by GrantGuard alike.
GRANT_NAME_BOUND = 256
ALG_EDDSA = -8
VERSION = 2
VERSIONS = (1, 2)  # decoded; only VERSION is accepted for a call
MAX_AUDIENCE = 256
MAX_AMOUNT = 64


class GrantError(VerificationError):
    """A grant was refused. `reason` is a short machine-readable class."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def grant_key_id(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()[:8]


@dataclass(frozen=True)
class GrantClaims:
    agent: str
    server: str
    tool: str
    args_sha256: bytes
    policy_sha256: bytes
    log_index: int
    entry_hash: bytes
    origin: str
    issued_ms: int
    expires_ms: int
    nonce: bytes
    # Version 2: the upstream instance the grant is for ("" when the bundle names none), and the
    # x402 payment the call carries (its canonical SHA-256 and the amount charged), if any.
    audience: str = ""
    payment_sha256: bytes | None = None
    payment_amount: str = ""
    version: int = VERSION

    def to_map(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "v": self.version,
            "agent": self.agent,
            "server": self.server,
            "tool": self.tool,
            "args": self.args_sha256,
            "policy": self.policy_sha256,
            "log": self.log_index,
            "entry": self.entry_hash,
            "origin": self.origin,
            "iat": self.issued_ms,
            "exp": self.expires_ms,
            "nonce": self.nonce,
        }
        if self.version >= 2:
            m["aud"] = self.audience
            if self.payment_sha256 is not None:
                m["pay"] = self.payment_sha256
                m["amount"] = self.payment_amount
        return m


def encode_grant(claims: GrantClaims, sign: Callable[[bytes], bytes], public_key: bytes) -> bytes:
    payload = dumps_deterministic(claims.to_map())
    return encode_cose_sign1({1: ALG_EDDSA, 4: grant_key_id(public_key)}, {}, payload, sign, tagged=True)


def _field(m: Mapping[str, Any], key: str, kind: type, size: int | None = None) -> Any:
    v = m.get(key)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise GrantError("malformed", f"grant field {key!r} is missing or not {kind.__name__}")
    if size is not None and isinstance(v, bytes) and len(v) != size:
        raise GrantError("malformed", f"grant field {key!r} must be {size} bytes")
    return v


def _amount(m: Mapping[str, Any]) -> str:
    text: str = _field(m, "amount", str)
    try:
        ok = 0 < len(text) <= MAX_AMOUNT and all(c in "0123456789." for c in text) and Decimal(text) > 0
    except InvalidOperation:
        ok = False
    if not ok:
        raise GrantError("malformed", "grant field 'amount' must be a positive decimal string")
    return text


def parse_grant_claims(payload: bytes) -> GrantClaims:
    m = decode_cbor(payload, what="grant payload")
    version = m.get("v") if isinstance(m, dict) else None
    if not isinstance(m, dict) or isinstance(version, bool) or version not in VERSIONS:
        raise GrantError("malformed", f"grant payload is not a grant of version {' or '.join(map(str, VERSIONS))}")
    extra: dict[str, Any] = {}
    if version >= 2:
        extra["audience"] = _field(m, "aud", str)
        if len(extra["audience"]) > MAX_AUDIENCE:
            raise GrantError("malformed", f"grant field 'aud' is longer than {MAX_AUDIENCE} characters")
        if "pay" in m or "amount" in m:
            extra["payment_sha256"] = _field(m, "pay", bytes, 32)
            extra["payment_amount"] = _amount(m)
    claims = GrantClaims(
        agent=_field(m, "agent", str),
        server=_field(m, "server", str),
        tool=_field(m, "tool", str),
        args_sha256=_field(m, "args", bytes, 32),
        policy_sha256=_field(m, "policy", bytes, 32),
        log_index=_field(m, "log", int),
        entry_hash=_field(m, "entry", bytes, 32),
        origin=_field(m, "origin", str),
        issued_ms=_field(m, "iat", int),
        expires_ms=_field(m, "exp", int),
        nonce=_field(m, "nonce", bytes, 16),
        version=version,
        **extra,
    )
    if set(m) != set(claims.to_map()):
        raise GrantError("malformed", f"grant payload has unexpected fields {sorted(set(m) - set(claims.to_map()))}")
    return claims


def read_grant(grant: bytes) -> GrantClaims:
    """The claims of a grant without verifying its signature (for audits that check it elsewhere)."""
    try:
        return parse_grant_claims(parse_cose_sign1(grant, max_size=MAX_GRANT_BYTES).payload)
    except DecodeError as exc:
        raise GrantError("malformed", f"grant is malformed: {exc}") from exc


def verify_grant_signature(grant: bytes, grant_keys: Mapping[bytes, ed25519.Ed25519PublicKey]) -> GrantClaims:
    """Steps 1 to 4 of `verify_grant`: the grant is signed by one of `grant_keys`. Returns its
    claims, now authenticated, without judging them against any call; or raises GrantError.

    Auditors use this alone: a logged grant is checked against its decision entry, not a call.
    Reasons: "malformed", "unknown-key" (no key in `grant_keys` has its kid), "bad-signature".
    """
    # 1. Parse the COSE_Sign1 envelope (RFC 9052 §4.2), capped in size.
    try:
        msg = parse_cose_sign1(grant, max_size=MAX_GRANT_BYTES)
    except DecodeError as exc:
        raise GrantError("malformed", f"grant is malformed: {exc}") from exc
    # 2. The protected header names EdDSA and a key we trust.
    if msg.protected_map.get(1) != ALG_EDDSA:
        raise GrantError("malformed", "grant algorithm is not EdDSA (-8)")
    kid = msg.protected_map.get(4)
    key = grant_keys.get(kid) if isinstance(kid, bytes) else None
    if key is None:
        raise GrantError("unknown-key", "grant is signed by a key that no verified enclave attestation binds")
    # 3. The signature over Sig_structure (RFC 9052 §4.4).
    try:
        key.verify(msg.signature, sig_structure(msg.protected, msg.payload))
    except InvalidSignature as exc:
        raise GrantError("bad-signature", "grant signature does not verify with the enclave grant key") from exc
    # 4. The authenticated payload.
    try:
        return parse_grant_claims(msg.payload)
    except DecodeError as exc:
        raise GrantError("malformed", f"grant payload is malformed: {exc}") from exc


def verify_grant(
    grant: bytes,
    *,
    grant_keys: Mapping[bytes, ed25519.Ed25519PublicKey],
    server: str,
    tool: str,
    arguments: Mapping[str, Any] | None,
    now_ms: int,
    audience: str = "",
    payment: Any = None,
    max_lifetime_ms: int = 3_600_000,
    clock_skew_ms: int = 30_000,
) -> GrantClaims:
    """Verify a grant for exactly this call at this upstream instance. Returns its claims or
    raises GrantError.

    `grant_keys` maps key ids to enclave grant keys that the caller trusts because their
    attestation verified. `audience` is this upstream's instance id ("" for an upstream that
    names none: it then accepts only grants the bundle bound to no instance). `payment` is the
    x402 payment payload the call carries (the JSON value of `_meta["x402/payment"]`), None for
    none. Single use is the caller's job (`ReplayGuard` over a `NonceStore`), after this passes.
    """
    # 1 to 4. The envelope, the header, the signature by a trusted key, the payload.
    claims = verify_grant_signature(grant, grant_keys)
    if claims.version != VERSION:
        raise GrantError(
            "old-version",
            f"grant is of version {claims.version}, which names no upstream instance and binds no payment; "
            f"this upstream accepts version {VERSION} grants only (the enclave must be upgraded)",
        )
    # 5. It is for this server and tool, at this instance.
    if claims.server != server or claims.tool != tool:
        raise GrantError("wrong-call", f"grant is for {claims.server}/{claims.tool}, not {server}/{tool}")
    _check_audience(claims.audience, audience)
    # 6. It is for exactly these arguments, and exactly this payment (or none).
    try:
        digest = canonical_sha256(dict(arguments or {}))
    except DecodeError as exc:
        raise GrantError("wrong-arguments", f"arguments cannot be canonicalised: {exc}") from exc
    if digest != claims.args_sha256:
        raise GrantError("wrong-arguments", "grant was issued for different arguments")
    _check_payment(claims, payment)
    # 7. It is current.
    if claims.issued_ms > now_ms + clock_skew_ms:
        raise GrantError("not-yet-valid", "grant is issued in the future")
    if now_ms >= claims.expires_ms:
        raise GrantError("expired", f"grant expired {(now_ms - claims.expires_ms) / 1000:.1f}s ago")
    if claims.expires_ms - claims.issued_ms > max_lifetime_ms:
        raise GrantError("too-long-lived", "grant lifetime exceeds the accepted maximum")
    return claims


def _check_audience(granted: str, audience: str) -> None:
    if granted == audience:
        return
    if not granted:
        raise GrantError(
            "wrong-audience",
            f"grant is bound to no upstream instance and this is instance {audience!r}: the policy bundle must "
            f"name it as the server's `instance`",
        )
    if not audience:
        raise GrantError(
            "wrong-audience",
            f"grant is for upstream instance {granted!r}, and this upstream names no instance "
            "(configure its instance id, e.g. GrantGuard(instance=...), if it is that instance)",
        )
    raise GrantError("wrong-audience", f"grant is for upstream instance {granted!r}, not {audience!r}")


def _check_payment(claims: GrantClaims, payment: Any) -> None:
    if claims.payment_sha256 is None:
        if payment is not None:
            raise GrantError(
                "wrong-payment",
                "the call carries an x402 payment that the grant does not bind: the enclave charged no "
                "payment for this call",
            )
        return
    if payment is None:
        raise GrantError(
            "wrong-payment",
            f"the grant binds an x402 payment (charged {claims.payment_amount}) and the call carries none",
        )
    try:
        digest = payment_sha256(payment)
    except DecodeError as exc:
        raise GrantError("wrong-payment", f"the call's x402 payment cannot be canonicalised: {exc}") from exc
    if digest != claims.payment_sha256:
        raise GrantError(
            "wrong-payment",
            f"the call's x402 payment differs from the one the grant binds (charged {claims.payment_amount})",
        )


class NonceStore(Protocol):
    """Where redeemed grant nonces are kept: a grant is honoured once per store.

    `redeem` records `nonce` as used until `expires_ms` and returns True, or returns False when
    it is already recorded. It must be atomic across everyone sharing the store (threads,
    processes, replicas), remember a nonce at least until `expires_ms`, and fail closed: raise
    GrantError rather than forget a nonce that is still unexpired.
    """

    def redeem(self, nonce: bytes, expires_ms: int, now_ms: int) -> bool: ...


class MemoryNonceStore:
    """This process's memory: single use per process, forgotten at a restart.

    Capped: when full of unexpired nonces it refuses new ones (fail closed) rather than
    forgetting a nonce that could then be replayed.
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        self._seen: dict[bytes, int] = {}
        self._max = max_entries
        self._lock = threading.Lock()

    def redeem(self, nonce: bytes, expires_ms: int, now_ms: int) -> bool:
        with self._lock:
            if nonce in self._seen:
                return False
            if len(self._seen) >= self._max:
                self._seen = {n: exp for n, exp in self._seen.items() if exp > now_ms}
                if len(self._seen) >= self._max:
                    raise GrantError("replay-cache-full", "too many unexpired grants outstanding; try again")
            self._seen[nonce] = expires_ms
            return True


class ReplayGuard:
    """Honours each grant once per `NonceStore` (this process's memory by default)."""

    def __init__(self, store: NonceStore | None = None, *, max_entries: int = 200_000) -> None:
        self.store: NonceStore = store if store is not None else MemoryNonceStore(max_entries)

    def use(self, claims: GrantClaims, now_ms: int) -> None:
        if not self.store.redeem(claims.nonce, claims.expires_ms, now_ms):
            raise GrantError("replayed", "grant was already used")
