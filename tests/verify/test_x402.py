"""x402 payment payloads: the exact scheme on EVM (EIP-3009), versions 1 and 2, read per the
scheme and priced from what the server accepts; hostile payloads are refused with the reason."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from typing import Any

import pytest

from cloister.verify.canonical import canonical_sha256
from cloister.verify.x402 import (
    MAX_PAYMENT_BYTES,
    AcceptedPayment,
    PaymentError,
    accepted_payment,
    amount_of,
    match_accepted,
    parse_payment,
    read_payment,
)

NOW = 1_772_447_400  # 2026-03-02T10:30:00Z, the test world's epoch
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
EURC = "0x808456652fdb597867f38412077A9182bf77359F"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
ACCEPTS = [accepted_payment("exact", "eip155:84532", USDC, 6, PAY_TO)]


def authorization(value: str = "50000", **change: str) -> dict[str, str]:
    return {
        "from": PAYER,
        "to": PAY_TO,
        "value": value,
        "validAfter": str(NOW - 60),
        "validBefore": str(NOW + 600),
        "nonce": "0x" + "f3" * 32,
        **change,
    }


def v1(value: str = "50000", network: str = "base-sepolia", **change: str) -> dict[str, Any]:
    return {
        "x402Version": 1,
        "scheme": "exact",
        "network": network,
        "payload": {"signature": "0x" + "2d" * 65, "authorization": authorization(value, **change)},
    }


def v2(value: str = "50000", asset: str = USDC, **change: str) -> dict[str, Any]:
    return {
        "x402Version": 2,
        "resource": {"url": "mcp://research/deep_search"},
        "accepted": {
            "scheme": "exact",
            "network": "eip155:84532",
            "amount": value,
            "asset": asset,
            "payTo": PAY_TO,
            "maxTimeoutSeconds": 60,
            "extra": {"name": "USDC", "version": "2"},
        },
        "payload": {"signature": "0x" + "2d" * 65, "authorization": authorization(value, **change)},
        "extensions": {},
    }


def raw(payment: Any) -> bytes:
    return json.dumps(payment).encode()


def refused(payment: Any, reason: str, match: str, accepts: list[AcceptedPayment] = ACCEPTS) -> None:
    with pytest.raises(PaymentError, match=match) as err:
        read_payment(raw(payment), accepts, now_s=NOW)
    assert err.value.reason == reason, err.value


# ---- valid payments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [v1, v2], ids=["x402-v1", "x402-v2"])
def test_an_exact_evm_payment_is_priced_from_the_accepted_asset(make: Any) -> None:
    payment = make("50000")
    charge = read_payment(raw(payment), ACCEPTS, now_s=NOW)
    assert charge.amount == Decimal("0.05") and str(charge.amount) == "0.05"
    assert charge.accepted == ACCEPTS[0]
    p = charge.payment
    assert (p.scheme, p.network, p.value, p.pay_to, p.payer) == (
        "exact",
        "eip155:84532",
        50000,
        PAY_TO.lower(),
        PAYER.lower(),
    )
    # The hash is over the canonical JSON, so the upstream computes it from the _meta it decodes.
    assert p.sha256 == canonical_sha256(payment) == parse_payment(payment).sha256


def test_integers_may_be_hex_as_the_scheme_encodes_them() -> None:
    charge = read_payment(raw(v2("0x3D090")), ACCEPTS, now_s=NOW)
    assert charge.payment.value == 250000 and charge.amount == Decimal("0.25")
    assert read_payment(raw(v1("000250000")), ACCEPTS, now_s=NOW).amount == Decimal("0.25")


@pytest.mark.parametrize(
    ("value", "decimals", "amount"),
    [
        (1, 6, "0.000001"),
        (1_000_000, 6, "1"),
        (1_500_000, 6, "1.5"),
        (7, 0, "7"),
        (10**18, 18, "1"),
        (12, 18, "1.2E-17"),
    ],
)
def test_amounts_are_exact(value: int, decimals: int, amount: str) -> None:
    got = amount_of(value, decimals)
    assert got == Decimal(amount) and "E" not in format(got, "f")


def test_a_version_1_payment_names_no_asset_so_several_on_one_network_are_ambiguous() -> None:
    both = [*ACCEPTS, accepted_payment("exact", "eip155:84532", EURC, 6, PAY_TO)]
    refused(v1(), "ambiguous", "does not name its asset", both)
    assert read_payment(raw(v2(asset=EURC)), both, now_s=NOW).accepted.asset == EURC.lower()


# ---- hostile or unaccepted payments -------------------------------------------------------------------


def _with(payment: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(payment)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    ("payment", "reason", "match"),
    [
        # What the old heuristic read: a decoy amount beside a transfer it did not understand.
        (_with(v1(), "payload.amount", "0.01"), "malformed", "members this scheme does not define: amount"),
        (
            _with(_with(v2("250000"), "accepted.extra", {"assetTransferMethod": "permit2"}), "payload.amount", "0.05"),
            "unsupported",
            "transfer method 'permit2' is not supported",
        ),
        (_with(v1(), "scheme", "upto"), "unsupported", "scheme 'upto' is not supported"),
        (_with(v1(), "x402Version", 3), "unsupported", "x402Version 3 is not 1 or 2"),
        (_with(v1(), "x402Version", True), "unsupported", "x402Version True"),
        (_with(v1(), "amount", "0.01"), "malformed", "the payment has members"),
        (_with(v2(), "payload.authorization.value", "0.05"), "malformed", "accepted.amount differs|value must be"),
        (_with(v1(), "payload.authorization.value", "0.05"), "malformed", "value must be a string holding"),
        (_with(v1(), "payload.authorization.value", 50000), "malformed", "value must be a string holding"),
        (_with(v1(), "payload.authorization.value", "-50000"), "malformed", "value must be"),
        (_with(v1(), "payload.authorization.value", "5e4"), "malformed", "value must be"),
        (_with(v1(), "payload.authorization.value", "\u0665\u0660\u0660\u0660\u0660"), "malformed", "value must be"),
        (_with(v1(), "payload.authorization.value", "0"), "malformed", "value is zero"),
        (_with(v1(), "payload.authorization.value", "0x" + "f" * 65), "malformed", "value must be"),
        (_with(v1(), "payload.authorization.value", str(2**256)), "malformed", "does not fit in 256 bits"),
        (_with(v1(), "payload.authorization.to", "research.example"), "malformed", "authorization.to must be"),
        (_with(v1(), "payload.authorization.nonce", _DELETE), "malformed", "lacks nonce"),
        (_with(v1(), "payload.authorization.memo", "x"), "malformed", "payload.authorization has members"),
        (_with(v1(), "payload.signature", "2d" * 65), "malformed", "signature must be 0x-prefixed hex"),
        (_with(v1(), "payload", []), "malformed", "payload must be a JSON object"),
        (_with(v2(), "accepted.amount", "60000"), "malformed", "accepted.amount differs"),
        (_with(v2(), "accepted.payTo", PAYER), "malformed", "accepted.payTo differs"),
        (_with(v2(), "accepted.asset", "USDC"), "malformed", "accepted.asset must be an EVM address"),
        (_with(v2(), "resource", "x"), "malformed", "resource must be a JSON object"),
        # Well formed, but not a payment the server accepts.
        (v1(network="base"), "not-accepted", "does not accept 'exact' payments on 'eip155:8453'"),
        (v1(network="solana"), "not-accepted", "on 'solana'"),
        (v1(to=PAYER), "not-accepted", "which is not where the server is paid"),
        (v2(asset=EURC), "not-accepted", "is not one the server accepts"),
        (v1(validBefore=str(NOW)), "expired", "expired"),
        (v1(validAfter=str(NOW + 700)), "malformed", "never valid"),
    ],
)
def test_hostile_and_unaccepted_payments_are_refused(payment: Any, reason: str, match: str) -> None:
    refused(payment, reason, match)


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b'"x"', b"null", b'{"x402Version": 1, "x402Version": 1}', b"{" * 100, b'{"a": NaN}', b"\xff"],
)
def test_bytes_that_are_not_a_payment_object_are_refused(data: bytes) -> None:
    with pytest.raises(PaymentError) as err:
        parse_payment(data)
    assert err.value.reason == "malformed" and str(err.value).startswith("x402 payment")


def test_a_payment_over_the_size_cap_is_refused() -> None:
    big = _with(v2(), "resource", {"url": "x" * MAX_PAYMENT_BYTES})
    with pytest.raises(PaymentError, match="exceeds the limit"):
        parse_payment(raw(big))


def test_match_names_what_the_server_accepts() -> None:
    p = parse_payment(v1(network="base"))
    with pytest.raises(PaymentError, match=r"server 'research' .*\(it accepts: exact on eip155:84532\)"):
        match_accepted(p, ACCEPTS, "server 'research'")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("upto", "eip155:84532", USDC, 6, PAY_TO), "scheme 'upto'"),
        (("exact", "solana", USDC, 6, PAY_TO), "must be an EVM network"),
        (("exact", "eip155:0", USDC, 6, PAY_TO), "must be an EVM network"),
        (("exact", "eip155:84532", "USDC", 6, PAY_TO), "asset must be an EVM address"),
        (("exact", "eip155:84532", USDC, 19, PAY_TO), "decimals 19"),
        (("exact", "eip155:84532", USDC, True, PAY_TO), "decimals True"),
        (("exact", "eip155:84532", USDC, 6, "research.example"), "pay_to must be"),
    ],
)
def test_accepted_payments_are_checked_where_they_are_configured(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(PaymentError, match=match):
        accepted_payment(*args)
    assert accepted_payment("exact", "base-sepolia", USDC, 6, PAY_TO).network == "eip155:84532"
