"""Log entries: round trip, one encoding per record, and precise refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from decimal import Context, Decimal
from typing import cast

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister.verify.entries import (
    MIN_BOUND,
    DecisionEntry,
    DenialsEntry,
    Entry,
    Field,
    KeyEntry,
    OutcomeEntry,
    PolicyEntry,
    ServerEntry,
    bounded,
    decimal_text,
    dumps_deterministic,
    encode_entry,
    parse_entry,
    quoted,
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
SAMPLES: list[Entry] = [
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
    # Decision 0017: a signed response, checked; and an unsigned one from a server that must sign.
    OutcomeEntry(
        time_ms=2,
        decision_index=7,
        result_sha256=b"\x04" * 32,
        error="",
        duration_us=1200,
        response="verified",
        response_sig=b"\x0a" * 64,
        response_key=b"\x0b" * 32,
    ),
    OutcomeEntry(time_ms=2, decision_index=7, result_sha256=b"\x04" * 32, error="", duration_us=9, response="missing"),
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
    ServerEntry(time_ms=5, server="refunds", kind="nitro", status="verified", detail="ok", response_key=b"\x0c" * 32),
    DenialsEntry(
        time_ms=9,
        first_ms=6,
        last_ms=8,
        count=5,
        codes={"unauthenticated": 4, "bad-arguments": 1},
        sample_sha256=b"\x0a" * 32,
    ),
]


@pytest.mark.parametrize("entry", SAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip(entry: object) -> None:
    data = encode_entry(entry)  # type: ignore[arg-type]
    assert parse_entry(data) == entry
    assert encode_entry(parse_entry(data)) == data


def test_fields_added_later_are_absent_not_null() -> None:
    """Decision 0017's fields are left out when unset, so an outcome or server entry written before
    them has the same bytes now; a null in their place is a second encoding, refused."""
    old = cast(OutcomeEntry, SAMPLES[2])
    m = cbor2.loads(encode_entry(old))
    assert not {"response", "rsig", "rkey"} & set(m)
    for key in ("response", "rsig", "rkey"):
        with pytest.raises(DecodeError, match="unexpected fields"):
            parse_entry(dumps_deterministic({**m, key: None}))
    server = cbor2.loads(encode_entry(SAMPLES[9]))
    assert "rkey" not in server
    with pytest.raises(DecodeError, match="unexpected fields"):
        parse_entry(dumps_deterministic({**server, "rkey": None}))


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


# ---- The table of field limits: what the parser refuses cannot be built --------------------------


def _too_much(f: Field) -> list[object]:
    """Values just outside what field `f` may hold (and a few of the wrong type)."""
    if f.kind == "uint":
        return [-1, True, "1", None] if not f.optional else [-1, True, "1"]
    if f.kind == "text":
        return ["x" * (f.max_len + 1), "\ud800", 1, *([] if f.optional else [None]), *(["bogus"] if f.choices else [])]
    if f.kind == "bytes":
        wrong = [b"\x00" * (f.size + 1)] if f.size is not None else [b"\x00" * (f.max_len + 1)]
        return [*wrong, "text", *([] if f.optional else [None])]
    if f.kind == "texts":
        return [("x" * (f.item_len + 1),), ("r",) * (f.max_len + 1), ("\udc00",), (1,), "abc"]
    if f.kind == "text_map":
        return [
            {"k": "v" * (f.value_len + 1)},
            {"k" * (f.item_len + 1): "v"},
            {str(i): "1" for i in range(f.max_len + 1)},
        ]
    return [{"k": -1}, {"k": True}, {str(i): 1 for i in range(f.max_len + 1)}]


_CASES = [(e, name, bad) for e in SAMPLES for name, f in e.FIELDS.items() for bad in _too_much(f)]


@pytest.mark.parametrize(
    ("entry", "name", "bad"),
    _CASES,
    ids=lambda v: (
        str(v)[:24]
        if not isinstance(v, DecisionEntry | OutcomeEntry | KeyEntry | PolicyEntry | ServerEntry | DenialsEntry)
        else type(v).__name__
    ),
)
def test_what_the_parser_refuses_cannot_be_constructed(entry: Entry, name: str, bad: object) -> None:
    """One table of field limits: a value the parser refuses in a field is refused when an entry
    is built with it, by the same check and with the same message."""
    f = entry.FIELDS[name]
    with pytest.raises(DecodeError, match=f"entry field {f.key!r}") as built:
        dataclasses.replace(entry, **{name: bad})  # type: ignore[arg-type]
    m = cbor2.loads(encode_entry(entry))
    m[f.key] = list(bad) if isinstance(bad, tuple) else bad
    try:
        data = dumps_deterministic(m)
    except (UnicodeEncodeError, DecodeError):
        return  # not even encodable: no log can hold it
    with pytest.raises(DecodeError, match=f"entry field {f.key!r}") as parsed:
        parse_entry(data)
    assert str(parsed.value) == str(built.value)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: dataclasses.replace(ALLOW, grant_nonce=None), "grant nonce and expiry must be both"),
        (lambda: dataclasses.replace(ALLOW, grant_nonce=None, grant_expiry_ms=None), "an allow must carry"),
        (
            lambda: dataclasses.replace(cast(DecisionEntry, SAMPLES[1]), grant_nonce=b"\x00" * 16, grant_expiry_ms=5),
            "enforced deny cannot",
        ),
        (lambda: dataclasses.replace(cast(KeyEntry, SAMPLES[6]), previous_size=3), "prev_size and prev_root"),
        (lambda: dataclasses.replace(cast(OutcomeEntry, SAMPLES[4]), response=None), "without a response status"),
        (lambda: dataclasses.replace(cast(OutcomeEntry, SAMPLES[4]), response_key=None), "verified response must"),
        (lambda: dataclasses.replace(cast(OutcomeEntry, SAMPLES[4]), result_sha256=None), "verified response must"),
        (lambda: dataclasses.replace(cast(DenialsEntry, SAMPLES[-1]), count=6), "add up to a positive count"),
        (lambda: dataclasses.replace(cast(DenialsEntry, SAMPLES[-1]), last_ms=10), "first <= last <= time"),
    ],
)
def test_cross_field_rules_hold_at_construction(build: object, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        build()  # type: ignore[operator]


def test_encode_refuses_an_entry_over_the_cap() -> None:
    big = dataclasses.replace(ALLOW, policies=tuple("\U0001f600" * 256 for _ in range(64)))
    with pytest.raises(DecodeError, match="capped at 65535"):
        encode_entry(big)


_any_text = st.one_of(
    st.text(st.characters(codec=None, categories=None), max_size=300),
    st.builds(
        lambda c, n: c * n,
        st.text(st.characters(codec=None, categories=None), min_size=1, max_size=2),
        st.integers(0, 5000),
    ),
)


@given(_any_text, st.integers(MIN_BOUND, 5000))
def test_bounded_text_always_fits_and_names_what_it_cut(text: str, limit: int) -> None:
    out = bounded(text, limit)
    assert len(out) <= limit
    out.encode("utf-8")  # valid Unicode, whatever came in
    if len(text) <= limit and out == text:
        return
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    assert out.endswith(f"…({len(text)} chars, sha256:{digest})")
    # It fits every text field of an entry whose cap is at least `limit`.
    entry = dataclasses.replace(ALLOW, reason=bounded(text, 4096), request_id=bounded(text, 1024))
    assert parse_entry(encode_entry(entry)) == entry


def test_bounded_refuses_a_limit_too_small_for_its_mark() -> None:
    with pytest.raises(ValueError, match="at least"):
        bounded("x" * 100, MIN_BOUND - 1)


@given(st.one_of(_any_text, st.integers(), st.lists(st.text(max_size=2000), max_size=3)))
def test_quoted_values_stay_short(value: object) -> None:
    assert len(quoted(value)) <= 64 * 10 + 40  # a repr escapes a character in at most 10


@given(st.decimals(allow_nan=False, allow_infinity=False, min_value=0))
def test_decimal_text_is_plain_and_normalised(amount: Decimal) -> None:
    try:
        text = decimal_text(amount)
    except ValueError:
        plain = format(amount.normalize(Context(prec=10_000)), "f")
        assert len(plain) > 64
        return
    assert Decimal(text) == amount and len(text) <= 64
    assert re.fullmatch(r"(0|[1-9]\d*)(\.\d*[1-9])?", text), text


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        ("1E+3", "1000"),
        ("100.5000", "100.5"),
        ("0E-7", "0"),
        ("0.000000000001", "0.000000000001"),
        ("1e15", "1" + "0" * 15),
    ],
)
def test_decimal_text_examples(amount: str, text: str) -> None:
    assert decimal_text(Decimal(amount)) == text


@pytest.mark.parametrize("amount", ["-1", "NaN", "Infinity", "1E+100", "1E-100", "9" * 65, "1E+999999999"])
def test_decimal_text_refuses(amount: str) -> None:
    with pytest.raises(ValueError):
        decimal_text(Decimal(amount))
