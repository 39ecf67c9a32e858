"""x402 payments through the relay's call path and the enclave: the amount charged against a cap
is the amount the payment transfers, parsed per its scheme and priced in the asset the bundle says
the server accepts (the example: research takes USDC, 6 decimals, on Base Sepolia; research-bot
may pay 0.10 a day).

The payloads are written out here, not built by the example's helpers, so that this file reads the
same against any version of the code."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from cloister.relay.call_path import DENIALS_META_KEY
from cloister.verify.grant import GRANT_META_KEY, read_grant
from cloister.wire.contract import X402_META_KEY
from tests.relay.test_call_path import Rig, research_bot, run
from tests.world import epoch_ms

NOW = epoch_ms() // 1000  # the world's clock
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
SEARCH = "research___deep_search"


def eip3009(value: str, nonce: str) -> dict[str, Any]:
    """An `exact` EVM payment (x402 version 2) transferring `value` atomic units of USDC to research."""
    return {
        "x402Version": 2,
        "accepted": {
            "scheme": "exact",
            "network": "eip155:84532",
            "amount": value,
            "asset": USDC,
            "payTo": PAY_TO,
            "maxTimeoutSeconds": 60,
        },
        "payload": {
            "signature": "0x" + "2d" * 65,
            "authorization": {
                "from": PAYER,
                "to": PAY_TO,
                "value": value,
                "validAfter": str(NOW - 60),
                "validBefore": str(NOW + 600),
                "nonce": "0x" + nonce * 32,
            },
        },
    }


def permit2_with_decoy(value: str, decoy: str) -> dict[str, Any]:
    """An `exact` payment by Permit2 (x402 version 2) transferring `value` atomic units of USDC, with a
    decoy `payload.amount` that no facilitator reads and the old relay did."""
    return {
        "x402Version": 2,
        "accepted": {
            "scheme": "exact",
            "network": "eip155:84532",
            "amount": value,
            "asset": USDC,
            "payTo": PAY_TO,
            "maxTimeoutSeconds": 60,
            "extra": {"assetTransferMethod": "permit2"},
        },
        "payload": {
            "signature": "0x" + "2d" * 65,
            "permit2Authorization": {
                "from": PAYER,
                "permitted": {"token": USDC, "amount": value},
                "spender": "0x4020615294c913F045dc10f0a5cdEbd86c280001",
                "nonce": "7",
                "deadline": str(NOW + 600),
                "witness": {"to": PAY_TO, "validAfter": str(NOW - 60), "extra": "0x"},
            },
            "amount": decoy,
        },
    }


async def denied(rig: Rig, payment: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(MCPError) as refused:  # denials as errors (decision 0018's opt-out), to read their data
        await rig.call(research_bot(rig), SEARCH, {"query": "q"}, {X402_META_KEY: payment, DENIALS_META_KEY: "error"})
    data = refused.value.error.data
    assert isinstance(data, dict), refused.value.error
    return data


def test_payment_over_the_cap_with_a_misread_amount_is_refused(tmp_path: Path) -> None:
    """The relay used to read the amount with a heuristic (`payload.authorization.value`, else
    `payload.amount`) that ignored the scheme, the asset and its units. A Permit2 payment of 0.25
    USDC carrying `payload.amount: "0.05"` was charged 0.05 against the 0.10 daily cap, and paid
    0.25: twice. An EIP-3009 payment of 0.25 (value 250000, in atomic units) was charged 250000."""

    async def scenario(rig: Rig) -> None:
        for _ in range(2):
            decoy = await denied(rig, permit2_with_decoy("250000", "0.05"))
            assert decoy["code"] == "bad-arguments" and "'permit2' is not supported" in decoy["reason"]
        assert rig.forwarded() == []
        # The same 0.25 paid as the scheme the bundle accepts is charged exactly 0.25: over the cap.
        over = await denied(rig, eip3009("250000", "a1"))
        assert over["code"] == "limit" and "research-daily-payments" in over["reason"]
        assert re.search(r"this call needs 0\.25, 0\.10? remains", over["reason"]), over["reason"]
        # What fits is charged exactly, in USDC: 0.05, then 0.06 is 0.01 too much.
        paid = await rig.call(research_bot(rig), SEARCH, {"query": "q"}, {X402_META_KEY: eip3009("50000", "b2")})
        assert not paid.is_error
        [forwarded] = rig.forwarded()
        grant = read_grant(base64.b64decode(forwarded.meta[GRANT_META_KEY]))
        assert grant.payment_amount == "0.05" and grant.payment_sha256 is not None
        more = await denied(rig, eip3009("60000", "c3"))
        assert more["code"] == "limit" and "this call needs 0.06, 0.05 remains" in more["reason"]

    run(tmp_path, scenario)


def test_a_payment_research_does_not_accept_is_refused_with_the_reason(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        cases = [
            ({**eip3009("50000", "d4"), "accepted": {**eip3009("50000", "d4")["accepted"], "network": "eip155:8453"}},
             "does not accept 'exact' payments on 'eip155:8453'"),
            (
                {
                    **eip3009("50000", "e5"),
                    "accepted": {**eip3009("50000", "e5")["accepted"], "asset": "0x" + "ee" * 20},
                },
                "is not one server 'research' accepts",
            ),
        ]  # fmt: skip
        for payment, why in cases:
            data = await denied(rig, payment)
            assert data["code"] == "bad-arguments" and why in data["reason"], data["reason"]
        assert rig.forwarded() == []

    run(tmp_path, scenario)
