"""Log entries: round trip, one encoding per record, and precise refusals."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister.verify.entries import (
    DecisionEntry,
    KeyEntry,
    OutcomeEntry,
    PolicyEntry,
    ServerEntry,
    dumps_deterministic,
    encode_entry,
    parse_entry,
)
from cloister.verify.errors import DecodeError

ALLOW = DecisionEntry(
    time_ms=1_700_000_000_000,
    agent="refund-bot",
    roles=("refund-agent",),
    issuer="dev",
    server="refunds",
    tool="refund.create",
    args_sha256=b"\x01" * 32,
    decision="allow",
    code="",
    reason="permitted",
    policies=("refund-agent-tools",),
    policy_sha256=b"\x02" * 32,
    policy_version=3,
    request_id="r1",
    grant_nonce=b"\x03" * 16,
    grant_expiry_ms=1_700_000_060_000,
    charges={"refund-cap": "125.50", "refund-rate": "1"},
)
SAMPLES = [
    ALLOW,
    DecisionEntry(
        time_ms=1,
        agent="research-bot",
        roles=(),
        issuer="dev",
        server="refunds",
        tool="customer_lookup",
        args_sha256=b"\x00" * 32,
        decision="deny",
        code="no-permit",
        reason="no policy permits this call",
        policies=(),
        policy_sha256=b"\x02" * 32,
        policy_version=3,
        request_id="",
    ),
    OutcomeEntry(time_ms=2, decision_index=7, result_sha256=b"\x04" * 32, error="", duration_us=1200),
    OutcomeEntry(time_ms=2, decision_index=7, result_sha256=None, error="timeout after 30s", duration_us=30_000_000),
    KeyEntry(time_ms=3, attestation=b"doc", log_key=b"\x05" * 32, grant_key=b"\x06" * 32, log_vkey="x+1+AQ"),
    KeyEntry(
        time_ms=3,
        attestation=b"doc",
        log_key=b"\x05" * 32,
        grant_key=b"\x06" * 32,
        log_vkey="x+1+AQ",
        previous_size=10,
        previous_root=b"\x07" * 32,
    ),
    PolicyEntry(time_ms=4, bundle_sha256=b"\x08" * 32, version=2, signer="admin", mode="enforce"),
    ServerEntry(
        time_ms=5,
        server="refunds",
        kind="nitro",
        status="verified",
        detail="PCR0 ok",
        evidence_sha256=b"\x09" * 32,
        extra={"pcr0": "ab"},
    ),
]


@pytest.mark.parametrize("entry", SAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip(entry: object) -> None:
    data = encode_entry(entry)  # type: ignore[arg-type]
    assert parse_entry(data) == entry
    assert encode_entry(parse_entry(data)) == data


def test_non_deterministic_encoding_refused() -> None:
    m = cbor2.loads(encode_entry(ALLOW))
    # Same map, keys in insertion order rather than sorted: a second encoding of one record.
    reordered = cbor2.dumps(dict(reversed(list(m.items()))))
    with pytest.raises(DecodeError, match="deterministic"):
        parse_entry(reordered)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m.update(t="bogus"), "unknown type 'bogus'"),
        (lambda m: m.update(v=2), "unsupported version 2"),
        (lambda m: m.update(args=b"short"), "'args': expected 32 bytes"),
        (lambda m: m.update(decision="maybe"), "expected allow or deny"),
        (lambda m: m.update(extra_field=1), "unexpected fields \\['extra_field'\\]"),
        (lambda m: m.pop("agent"), "'agent': expected text"),
        (lambda m: m.update(grant_nonce=None), "grant nonce and expiry must be both"),
        (lambda m: m.update(time=-1), "'time': expected an unsigned integer"),
    ],
)
def test_field_errors_name_the_field(mutate: object, match: str) -> None:
    m = cbor2.loads(encode_entry(ALLOW))
    mutate(m)  # type: ignore[operator]
    with pytest.raises(DecodeError, match=match):
        parse_entry(cbor2.dumps(m, canonical=True))


@pytest.mark.parametrize("data", [b"", b"\xff", b"\x01", cbor2.dumps([1, 2]), b"\xa1" + b"\x00" * 5])
def test_garbage_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_entry(data)


def test_oversize_refused() -> None:
    with pytest.raises(DecodeError, match="capped"):
        parse_entry(b"\x00" * 70000)


_cbor = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64) + 1, 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=30), c, max_size=6),
    max_leaves=25,
)


@given(_cbor)
def test_deterministic_encoder_matches_rfc8949_canonical_ordering(value: object) -> None:
    # cbor2's canonical mode implements RFC 8949 §4.2.1 ordering for text keys; ours must agree.
    assert dumps_deterministic(value) == cbor2.dumps(value, canonical=True)
