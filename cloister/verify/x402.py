"""x402 payment payloads: parsed per scheme, matched to what a server accepts, priced exactly.

An agent pays an upstream that answered -32402 by retrying with the payload in the request's
`_meta["x402/payment"]` (the x402 MCP transport). Two versions of the payload exist:

- x402 version 1: `{"x402Version": 1, "scheme", "network", "payload"}`; the network is a name
  ("base-sepolia"), and the asset is not in the payload (the server's requirements name it);
- x402 version 2: `{"x402Version": 2, "accepted": {"scheme", "network", "amount", "asset",
  "payTo", ...}, "payload", "resource"?, "extensions"?}`; the network is a CAIP-2 id
  ("eip155:84532") and `accepted` repeats the requirements the client chose.

The one scheme read here is `exact` on EVM networks with an EIP-3009 authorisation:
`payload = {"signature", "authorization": {"from", "to", "value", "validAfter", "validBefore",
"nonce"}}`, where `value` is in the asset's atomic units. Integers are decimal strings, or hex
with a "0x" prefix, as the scheme's encoding rules allow. Anything else (another scheme, another
transfer method such as Permit2, unknown members where a decoy could hide) is refused: an amount
is charged only when it is the amount the payment actually transfers.

What a server accepts (`AcceptedPayment`: scheme, network, asset contract, its decimals, and the
address it is paid at) comes from the policy bundle, never from the payment: the amount charged
is `value / 10**decimals` of that asset, exactly. `payment_sha256` is the SHA-256 of the payload's
RFC 8785 canonical JSON, which the enclave binds into the grant and the upstream recomputes from
the `_meta` it receives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from cloister.verify.canonical import canonical_sha256, parse_json
from cloister.verify.errors import DecodeError

X402_META_KEY: Final = "x402/payment"  # the x402 MCP transport's key in a request's _meta
MAX_PAYMENT_BYTES: Final = 32 * 1024
SCHEMES: Final = ("exact",)
MAX_DECIMALS: Final = 18
MAX_UINT256: Final = (1 << 256) - 1

# x402 version 1 names EVM networks; version 2 uses CAIP-2 ids. Both are compared as CAIP-2.
NETWORK_ALIASES: Final = {
    "base": "eip155:8453",
    "base-sepolia": "eip155:84532",
    "avalanche": "eip155:43114",
    "avalanche-fuji": "eip155:43113",
    "polygon": "eip155:137",
    "polygon-amoy": "eip155:80002",
}
_EVM_NETWORK = re.compile(r"eip155:[1-9][0-9]{0,19}", re.ASCII)
_NETWORK = re.compile(r"[-a-z0-9]{1,32}(:[-_a-zA-Z0-9]{1,64})?", re.ASCII)
_ADDRESS = re.compile(r"0[xX][0-9a-fA-F]{40}", re.ASCII)
_SIGNATURE = re.compile(r"0[xX](?:[0-9a-fA-F]{2}){1,4096}", re.ASCII)
_DECIMAL_INT = re.compile(r"[0-9]{1,80}", re.ASCII)
_HEX_INT = re.compile(r"0[xX][0-9a-fA-F]{1,64}", re.ASCII)

_V1_MEMBERS: Final = frozenset({"x402Version", "scheme", "network", "payload"})
_V2_MEMBERS: Final = frozenset({"x402Version", "accepted", "payload", "resource", "extensions"})
_V2_ACCEPTED: Final = frozenset({"scheme", "network", "amount", "asset", "payTo", "maxTimeoutSeconds", "extra"})
_EIP3009_PAYLOAD: Final = frozenset({"signature", "authorization"})
_EIP3009_AUTHORIZATION: Final = frozenset({"from", "to", "value", "validAfter", "validBefore", "nonce"})


class PaymentError(DecodeError):
    """An x402 payment is malformed, unsupported, or not one the server accepts.

    `reason`: "malformed", "unsupported" (a version, scheme or transfer method not read here),
    "not-accepted" (not a payment the server accepts), "ambiguous", "expired"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AcceptedPayment:
    """One payment a server accepts, as the policy bundle names it."""

    scheme: str
    network: str  # CAIP-2 (eip155:<chain id>)
    asset: str  # the token contract, lowercase 0x-hex
    decimals: int  # the asset's decimals: amount = value / 10**decimals
    pay_to: str  # the server's address, lowercase 0x-hex


@dataclass(frozen=True)
class Payment:
    """An x402 `exact` EVM payment as parsed (nothing here is verified on chain)."""

    x402_version: int
    scheme: str
    network: str  # CAIP-2 where the name is known, else as given
    asset: str | None  # lowercase; version 2 names it, version 1 does not
    payer: str  # authorization.from, lowercase
    pay_to: str  # authorization.to, lowercase
    value: int  # atomic units
    valid_after: int  # Unix seconds
    valid_before: int  # Unix seconds
    sha256: bytes  # SHA-256 of the payload's RFC 8785 canonical JSON


@dataclass(frozen=True)
class Charge:
    """A parsed payment, the accepted payment it matches, and its exact amount in that asset."""

    payment: Payment
    accepted: AcceptedPayment
    amount: Decimal


def canonical_network(name: str) -> str:
    return NETWORK_ALIASES.get(name, name)


def payment_sha256(payment: Any) -> bytes:
    """The SHA-256 of a payment payload's RFC 8785 canonical JSON (a JSON value, e.g. from `_meta`)."""
    return canonical_sha256(payment)


def accepted_payment(scheme: Any, network: Any, asset: Any, decimals: Any, pay_to: Any) -> AcceptedPayment:
    """An AcceptedPayment from configuration values; raises PaymentError naming the bad one."""
    if scheme not in SCHEMES:
        raise PaymentError("unsupported", f"scheme {scheme!r} is not supported (supported: {', '.join(SCHEMES)})")
    if not isinstance(network, str) or not _EVM_NETWORK.fullmatch(canonical_network(network)):
        known = ", ".join(sorted(NETWORK_ALIASES))
        raise PaymentError(
            "unsupported", f"network {network!r} must be an EVM network: eip155:<chain id>, or one of {known}"
        )
    if not isinstance(decimals, int) or isinstance(decimals, bool) or not 0 <= decimals <= MAX_DECIMALS:
        raise PaymentError("malformed", f"decimals {decimals!r} must be an integer from 0 to {MAX_DECIMALS}")
    return AcceptedPayment(
        scheme=scheme,
        network=canonical_network(network),
        asset=_address("asset", asset),
        decimals=decimals,
        pay_to=_address("pay_to", pay_to),
    )


def parse_payment(data: bytes | Mapping[str, Any]) -> Payment:
    """Parse an x402 payment payload (JSON text, or the JSON object already decoded).

    Raises PaymentError for anything but a well-formed `exact` EVM (EIP-3009) payment of
    x402 version 1 or 2."""
    if isinstance(data, bytes | bytearray):
        try:
            value = parse_json(bytes(data), what="x402 payment", max_bytes=MAX_PAYMENT_BYTES)
        except PaymentError:
            raise
        except DecodeError as exc:
            raise PaymentError("malformed", str(exc)) from exc
    else:
        value = data
    if not isinstance(value, Mapping):
        raise PaymentError("malformed", "x402 payment: must be a JSON object")
    version = value.get("x402Version")
    if version == 1 and not isinstance(version, bool):
        _only(value, _V1_MEMBERS, "the payment")
        scheme, network, asset = value.get("scheme"), value.get("network"), None
    elif version == 2 and not isinstance(version, bool):
        _only(value, _V2_MEMBERS, "the payment")
        accepted = _object(value.get("accepted"), "accepted")
        _only(accepted, _V2_ACCEPTED, "accepted")
        scheme, network = accepted.get("scheme"), accepted.get("network")
        asset = _address("accepted.asset", accepted.get("asset"))
        _transfer_method(accepted.get("extra"))
        for member in ("resource", "extensions"):
            if member in value:
                _object(value[member], member)
    else:
        raise PaymentError("unsupported", f"x402 payment: x402Version {version!r} is not 1 or 2")
    if scheme not in SCHEMES:
        raise PaymentError("unsupported", f"x402 payment: scheme {scheme!r} is not supported (only 'exact')")
    if not isinstance(network, str) or not _NETWORK.fullmatch(network):
        raise PaymentError("malformed", f"x402 payment: network {str(network)[:80]!r} is not a network name")
    payment = _exact_evm(value, version, scheme, canonical_network(network), asset)
    if version == 2:
        _consistent(value["accepted"], payment)
    return payment


def _exact_evm(value: Mapping[str, Any], version: int, scheme: str, network: str, asset: str | None) -> Payment:
    body = _object(value.get("payload"), "payload")
    _only(body, _EIP3009_PAYLOAD, "payload (the exact scheme's EIP-3009 payload)")
    if not isinstance(body.get("signature"), str) or not _SIGNATURE.fullmatch(body["signature"]):
        raise PaymentError("malformed", "x402 payment: payload.signature must be 0x-prefixed hex")
    auth = _object(body.get("authorization"), "payload.authorization")
    _only(auth, _EIP3009_AUTHORIZATION, "payload.authorization")
    missing = sorted(_EIP3009_AUTHORIZATION - set(auth))
    if missing:
        raise PaymentError("malformed", f"x402 payment: payload.authorization lacks {', '.join(missing)}")
    payment = Payment(
        x402_version=version,
        scheme=scheme,
        network=network,
        asset=asset,
        payer=_address("payload.authorization.from", auth["from"]),
        pay_to=_address("payload.authorization.to", auth["to"]),
        value=_uint("payload.authorization.value", auth["value"]),
        valid_after=_uint("payload.authorization.validAfter", auth["validAfter"]),
        valid_before=_uint("payload.authorization.validBefore", auth["validBefore"]),
        sha256=payment_sha256(value),
    )
    _uint("payload.authorization.nonce", auth["nonce"])
    if payment.value == 0:
        raise PaymentError("malformed", "x402 payment: payload.authorization.value is zero")
    if payment.valid_after >= payment.valid_before:
        raise PaymentError("malformed", "x402 payment: validAfter is not before validBefore (never valid)")
    return payment


def _consistent(accepted: Mapping[str, Any], payment: Payment) -> None:
    """Version 2 states the requirements twice: `accepted` and the authorisation must agree."""
    if _uint("accepted.amount", accepted.get("amount")) != payment.value:
        raise PaymentError(
            "malformed", "x402 payment: accepted.amount differs from payload.authorization.value (which is paid?)"
        )
    if _address("accepted.payTo", accepted.get("payTo")) != payment.pay_to:
        raise PaymentError("malformed", "x402 payment: accepted.payTo differs from payload.authorization.to")


def _transfer_method(extra: Any) -> None:
    if extra is None:
        return
    extra = _object(extra, "accepted.extra")
    method = extra.get("assetTransferMethod", "eip3009")
    if method != "eip3009":
        raise PaymentError(
            "unsupported",
            f"x402 payment: asset transfer method {str(method)[:40]!r} is not supported (only EIP-3009)",
        )


def match_accepted(
    payment: Payment, accepted: Sequence[AcceptedPayment], server: str = "the server"
) -> AcceptedPayment:
    """The one payment `accepted` allows that this payment is; raises PaymentError saying why not."""
    on_network = [a for a in accepted if a.scheme == payment.scheme and a.network == payment.network]
    if not on_network:
        offered = ", ".join(sorted({f"{a.scheme} on {a.network}" for a in accepted})) or "none"
        raise PaymentError(
            "not-accepted",
            f"x402 payment: {server} does not accept {payment.scheme!r} payments on {payment.network!r} "
            f"(it accepts: {offered})",
        )
    paid_here = [a for a in on_network if a.pay_to == payment.pay_to]
    if not paid_here:
        raise PaymentError("not-accepted", f"x402 payment: pays {payment.pay_to}, which is not where {server} is paid")
    matching = [a for a in paid_here if payment.asset is None or a.asset == payment.asset]
    if not matching:
        raise PaymentError(
            "not-accepted", f"x402 payment: asset {payment.asset} is not one {server} accepts on {payment.network}"
        )
    if len(matching) > 1:
        raise PaymentError(
            "ambiguous",
            f"x402 payment: {server} accepts several assets on {payment.network} and an x402 version 1 payment "
            "does not name its asset; pay with x402 version 2",
        )
    return matching[0]


def amount_of(value: int, decimals: int) -> Decimal:
    """`value` atomic units of an asset with `decimals` decimals, exactly, without an exponent."""
    whole, fraction = divmod(value, 10**decimals)
    if not fraction:
        return Decimal(whole)
    return Decimal(f"{whole}.{str(fraction).rjust(decimals, '0').rstrip('0')}")


def read_payment(
    data: bytes | Mapping[str, Any], accepted: Sequence[AcceptedPayment], *, now_s: int, server: str = "the server"
) -> Charge:
    """Parse a payment, match it to what the server accepts, check it is still valid at `now_s`,
    and price it. Raises PaymentError."""
    payment = parse_payment(data)
    terms = match_accepted(payment, accepted, server)
    if payment.valid_before <= now_s:
        raise PaymentError("expired", "x402 payment: the authorisation expired (validBefore has passed)")
    return Charge(payment, terms, amount_of(payment.value, terms.decimals))


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PaymentError("malformed", f"x402 payment: {what} must be a JSON object")
    return value


def _only(value: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(str(k)[:40] for k in value if k not in allowed)
    if unknown:
        raise PaymentError(
            "malformed", f"x402 payment: {what} has members this scheme does not define: {', '.join(unknown[:5])}"
        )


def _address(what: str, value: Any) -> str:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise PaymentError("malformed", f"x402 payment: {what} must be an EVM address (0x and 40 hex digits)")
    return "0x" + value[2:].lower()


def _uint(what: str, value: Any) -> int:
    """A uint256 as the exact scheme encodes it: a decimal string, or hex after "0x"."""
    if isinstance(value, str) and _DECIMAL_INT.fullmatch(value):
        number = int(value, 10)
    elif isinstance(value, str) and _HEX_INT.fullmatch(value):
        number = int(value[2:], 16)
    else:
        raise PaymentError("malformed", f"x402 payment: {what} must be a string holding a decimal or 0x-hex integer")
    if number > MAX_UINT256:
        raise PaymentError("malformed", f"x402 payment: {what} does not fit in 256 bits")
    return number
