"""Grant verification: the signature steps auditors share with upstreams, then the call steps."""

from __future__ import annotations

import re

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.verify.canonical import canonical_sha256
from cloister.verify.cose import encode_cose_sign1
from cloister.verify.entries import dumps_deterministic
from cloister.verify.grant import (
    VERSION,
    GrantClaims,
    GrantError,
    MemoryNonceStore,
    ReplayGuard,
    encode_grant,
    grant_key_id,
    parse_grant_claims,
    read_grant,
    verify_grant,
    verify_grant_signature,
)
from tests.world import epoch_ms

NOW_MS = epoch_ms()
ARGS = {"customer_id": "cus_1001"}


def _key() -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _claims(**change: object) -> GrantClaims:
    fields: dict[str, object] = {
        "agent": "refund-bot",
        "server": "refunds",
        "tool": "customer_lookup",
        "args_sha256": canonical_sha256(ARGS),
        "policy_sha256": b"\x02" * 32,
        "log_index": 7,
        "entry_hash": b"\x03" * 32,
        "origin": "cloister.test/log",
        "issued_ms": NOW_MS,
        "expires_ms": NOW_MS + 60_000,
        "nonce": b"\x04" * 16,
    }
    return GrantClaims(**{**fields, **change})  # type: ignore[arg-type]


def test_a_grant_signed_by_a_trusted_key_yields_its_claims() -> None:
    key, public = _key()
    grant = encode_grant(_claims(), key.sign, public)
    keys = {grant_key_id(public): key.public_key()}
    assert verify_grant_signature(grant, keys) == _claims()
    assert (
        verify_grant(grant, grant_keys=keys, server="refunds", tool="customer_lookup", arguments=ARGS, now_ms=NOW_MS)
        == _claims()
    )


def test_signature_step_reasons() -> None:
    key, public = _key()
    kid = grant_key_id(public)
    keys = {kid: key.public_key()}
    good = encode_grant(_claims(), key.sign, public)

    def reason(grant: bytes, trusted: dict[bytes, ed25519.Ed25519PublicKey] = keys) -> str:
        with pytest.raises(GrantError) as info:
            verify_grant_signature(grant, trusted)
        return info.value.reason

    assert reason(b"\x00") == "malformed"
    assert reason(good, {}) == "unknown-key"
    other, other_public = _key()
    assert reason(encode_grant(_claims(), other.sign, other_public)) == "unknown-key"
    protected, unprotected, payload, signature = cbor2.loads(good).value
    flipped = cbor2.CBORTag(18, [protected, unprotected, payload, bytes([signature[0] ^ 1]) + signature[1:]])
    assert reason(cbor2.dumps(flipped)) == "bad-signature"
    es256 = encode_cose_sign1({1: -7, 4: kid}, {}, dumps_deterministic(_claims().to_map()), key.sign, tagged=True)
    assert reason(es256) == "malformed"
    bad_payload = encode_cose_sign1({1: -8, 4: kid}, {}, cbor2.dumps({"v": 2}), key.sign, tagged=True)
    assert reason(bad_payload) == "malformed"


def test_call_steps_follow_the_signature_steps() -> None:
    key, public = _key()
    keys = {grant_key_id(public): key.public_key()}
    grant = encode_grant(_claims(), key.sign, public)

    def reason(**call: object) -> str:
        kw: dict[str, object] = {
            "server": "refunds",
            "tool": "customer_lookup",
            "arguments": ARGS,
            "now_ms": NOW_MS,
            **call,
        }
        with pytest.raises(GrantError) as info:
            verify_grant(grant, grant_keys=keys, **kw)  # type: ignore[arg-type]
        return info.value.reason

    assert reason(tool="refund.create") == "wrong-call"
    assert reason(arguments={"customer_id": "cus_2"}) == "wrong-arguments"
    assert reason(now_ms=NOW_MS + 60_000) == "expired"
    assert reason(now_ms=NOW_MS - 60_000) == "not-yet-valid"
    with pytest.raises(GrantError) as info:
        verify_grant(grant, grant_keys={}, server="x", tool="y", arguments=None, now_ms=NOW_MS)
    assert info.value.reason == "unknown-key"  # the signature is checked before anything else


# ---- version 2: the upstream instance and the x402 payment ----------------------------------------------

PAYMENT = {"x402Version": 2, "accepted": {"amount": "50000"}, "payload": {"signature": "0x00"}}


def _grant(**change: object) -> tuple[bytes, dict[bytes, ed25519.Ed25519PublicKey]]:
    key, public = _key()
    return encode_grant(_claims(**change), key.sign, public), {grant_key_id(public): key.public_key()}


def _reason(grant: bytes, keys: dict[bytes, ed25519.Ed25519PublicKey], **call: object) -> str:
    kw: dict[str, object] = {
        "server": "refunds",
        "tool": "customer_lookup",
        "arguments": ARGS,
        "now_ms": NOW_MS,
        **call,
    }
    with pytest.raises(GrantError) as info:
        verify_grant(grant, grant_keys=keys, **kw)  # type: ignore[arg-type]
    return f"{info.value.reason}: {info.value}"


def test_a_grant_binds_its_upstream_instance_and_payment() -> None:
    paid = _claims(audience="refunds-eu-1", payment_sha256=canonical_sha256(PAYMENT), payment_amount="0.05")
    key, public = _key()
    grant = encode_grant(paid, key.sign, public)
    assert read_grant(grant) == paid and paid.version == VERSION == 2
    assert set(cbor2.loads(cbor2.loads(grant).value[2])) >= {"aud", "pay", "amount"}
    keys = {grant_key_id(public): key.public_key()}
    # The payment is compared as canonical JSON: the same payment, whatever its member order.
    reordered = dict(reversed(list(PAYMENT.items())))
    claims = verify_grant(
        grant,
        grant_keys=keys,
        server="refunds",
        tool="customer_lookup",
        arguments=ARGS,
        now_ms=NOW_MS,
        audience="refunds-eu-1",
        payment=reordered,
    )
    assert claims.payment_amount == "0.05"


@pytest.mark.parametrize(
    ("granted", "audience", "message"),
    [
        ("refunds-eu-1", "refunds-eu-2", "grant is for upstream instance 'refunds-eu-1', not 'refunds-eu-2'"),
        ("refunds-eu-1", "", "this upstream names no instance"),
        ("", "refunds-eu-1", "bound to no upstream instance and this is instance 'refunds-eu-1'"),
    ],
)
def test_a_grant_for_another_upstream_instance_is_refused(granted: str, audience: str, message: str) -> None:
    grant, keys = _grant(audience=granted)
    got = _reason(grant, keys, audience=audience)
    assert got.startswith("wrong-audience: ") and message in got


def test_a_payment_other_than_the_granted_one_is_refused() -> None:
    paid, keys = _grant(payment_sha256=canonical_sha256(PAYMENT), payment_amount="0.05")
    other = {**PAYMENT, "accepted": {"amount": "250000"}}
    assert _reason(paid, keys, payment=other).startswith("wrong-payment: the call's x402 payment differs")
    assert _reason(paid, keys).startswith("wrong-payment: the grant binds an x402 payment (charged 0.05)")
    assert "cannot be canonicalised" in _reason(paid, keys, payment={"x": float("nan")})
    unpaid, keys = _grant()
    assert _reason(unpaid, keys, payment=PAYMENT).startswith("wrong-payment: the call carries an x402 payment")


def test_a_version_1_grant_still_decodes_but_is_refused_for_a_call() -> None:
    old = _claims(version=1)
    key, public = _key()
    grant = encode_grant(old, key.sign, public)
    assert set(cbor2.loads(cbor2.loads(grant).value[2])) == {
        "v", "agent", "server", "tool", "args", "policy", "log", "entry", "origin", "iat", "exp", "nonce",
    }  # fmt: skip
    keys = {grant_key_id(public): key.public_key()}
    assert read_grant(grant) == old and verify_grant_signature(grant, keys) == old  # auditors can read it
    assert _reason(grant, keys).startswith("old-version: grant is of version 1, which names no upstream instance")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 3}, "not a grant of version 1 or 2"),
        ({"v": True}, "not a grant of version 1 or 2"),
        ({"aud": 7}, "'aud' is missing or not str"),
        ({"aud": "x" * 257}, "'aud' is longer than 256"),
        ({"pay": b"\x01" * 32}, "'amount' is missing"),
        ({"amount": "0.05"}, "'pay' is missing"),
        ({"pay": b"\x01" * 31, "amount": "0.05"}, "'pay' must be 32 bytes"),
        ({"pay": b"\x01" * 32, "amount": "1e5"}, "positive decimal string"),
        ({"pay": b"\x01" * 32, "amount": "0"}, "positive decimal string"),
        ({"pay": b"\x01" * 32, "amount": "."}, "positive decimal string"),
        ({"v": 1, "aud": ""}, "unexpected fields ['aud']"),
        ({"extra": 1}, "unexpected fields ['extra']"),
    ],
)
def test_malformed_version_2_fields_are_refused(change: dict[str, object], message: str) -> None:
    m = {**_claims().to_map(), **change}
    with pytest.raises(GrantError, match=re.escape(message)):
        parse_grant_claims(dumps_deterministic(m))


def test_single_use_is_per_nonce_store() -> None:
    claims = _claims()
    shared = MemoryNonceStore()
    ReplayGuard(shared).use(claims, NOW_MS)
    with pytest.raises(GrantError, match="already used"):
        ReplayGuard(shared).use(claims, NOW_MS)  # another guard over the same store
    ReplayGuard().use(claims, NOW_MS)  # a guard with its own store has not seen it: once per store
    full = MemoryNonceStore(max_entries=1)
    assert full.redeem(b"a" * 16, NOW_MS + 1000, NOW_MS)
    with pytest.raises(GrantError, match="too many unexpired grants"):
        full.redeem(b"b" * 16, NOW_MS + 1000, NOW_MS)
    assert full.redeem(b"b" * 16, NOW_MS + 3000, NOW_MS + 2000)  # the first has expired: room again
