"""x402 payments in the example: what the `research` server charges and accepts, and payments
an example agent makes (development only: the signatures are not real, nothing settles on chain).

The example bundle (`bundle/entities.toml`) names the same accepted payment for `research`: the
`exact` scheme on Base Sepolia (eip155:84532), in USDC (6 decimals), paid to `PAY_TO`. The
enclave prices a payment from that entry, never from the payment: `value` atomic units are
`value / 10**6` USDC.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Any

NETWORK = "eip155:84532"  # Base Sepolia (x402 version 1 calls it "base-sepolia")
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"  # USDC on Base Sepolia
USDC_DECIMALS = 6
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"  # the research server's (example) address
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"  # research-bot's (example) wallet
DEEP_SEARCH_PRICE = Decimal("0.05")  # USDC per query


def atomic(amount: Decimal | str) -> int:
    """`amount` USDC in atomic units (exact; more than 6 decimal places is an error)."""
    value = Decimal(amount) * 10**USDC_DECIMALS
    if value != value.to_integral_value():
        raise ValueError(f"{amount} USDC has more than {USDC_DECIMALS} decimal places")
    return int(value)


def requirements(resource: str = "mcp://research/deep_search") -> dict[str, Any]:
    """The x402 (version 2) payment requirements `research` answers -32402 with."""
    return {
        "x402Version": 2,
        "error": "payment required",
        "resource": {"url": resource, "description": f"Deep search, {DEEP_SEARCH_PRICE} USDC per query"},
        "accepts": [
            {
                "scheme": "exact",
                "network": NETWORK,
                "amount": str(atomic(DEEP_SEARCH_PRICE)),
                "asset": USDC,
                "payTo": PAY_TO,
                "maxTimeoutSeconds": 60,
                "extra": {"name": "USDC", "version": "2"},
            }
        ],
    }


def payment(
    amount: Decimal | str = DEEP_SEARCH_PRICE,
    *,
    now_s: int,
    nonce: str = "1",
    version: int = 2,
    value: str | None = None,
    pay_to: str = PAY_TO,
    asset: str = USDC,
) -> dict[str, Any]:
    """An `exact` EVM payment payload for `amount` USDC (or `value`, the atomic units as written),
    valid for ten minutes from `now_s`. `nonce` makes each payment distinct."""
    authorization = {
        "from": PAYER,
        "to": pay_to,
        "value": value if value is not None else str(atomic(amount)),
        "validAfter": str(now_s - 60),
        "validBefore": str(now_s + 600),
        "nonce": "0x" + hashlib.sha256(nonce.encode()).hexdigest(),
    }
    signature = "0x" + hashlib.sha256(b"sig" + nonce.encode()).hexdigest() * 2 + "1b"  # 65 bytes, not a real one
    body = {"signature": signature, "authorization": authorization}
    if version == 1:
        return {"x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": body}
    accepted = {
        "scheme": "exact",
        "network": NETWORK,
        "amount": authorization["value"],
        "asset": asset,
        "payTo": pay_to,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }
    return {"x402Version": 2, "accepted": accepted, "payload": body}


def paid_enough(payload: Any, price: Decimal = DEEP_SEARCH_PRICE) -> bool:
    """The example server's mock check: an `exact` payment of at least `price` USDC, to `PAY_TO`.
    A real server verifies and settles the payment with an x402 facilitator instead."""
    from cloister.verify.x402 import PaymentError, parse_payment

    try:
        p = parse_payment(payload)
    except PaymentError:
        return False
    asset_ok = p.asset is None or p.asset == USDC.lower()
    return p.network == NETWORK and asset_ok and p.pay_to == PAY_TO.lower() and p.value >= atomic(price)
