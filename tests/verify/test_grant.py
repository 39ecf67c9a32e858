"""Grant verification: the signature steps auditors share with upstreams, then the call steps."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.verify.canonical import canonical_sha256
from cloister.verify.cose import encode_cose_sign1
from cloister.verify.entries import dumps_deterministic
from cloister.verify.grant import (
    GrantClaims,
    GrantError,
    encode_grant,
    grant_key_id,
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
