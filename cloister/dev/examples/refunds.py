"""The example `refunds` upstream: a payments-flavoured MCP server that verifies grants.

    python -m cloister.dev.examples.refunds --port 8441 --trust-root .cloister/mock-nsm/root.pem \
        --expect-pcr0 <hex> [--mock-nsm .cloister/mock-nsm] [--instance refunds-eu-1] [--nonces DIR]

It serves streamable HTTP at /mcp and refuses every tools/call that does not carry a valid,
single-use grant for this instance (`--instance`, the example bundle's `refunds-eu-1`) from an
enclave whose attestation verifies (see cloister.upstream.guard). Replicas on one host that share
`--instance` share `--nonces DIR`, so each grant is honoured once among them. With
--mock-nsm it also runs "in an enclave": it presents an attestation (cloister.attested_server)
whose PCR0 measures this file and the Cloister code it runs, so changing its code changes PCR0,
and signs every result it returns with the response key that attestation binds (decision 0017).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer

from cloister.upstream.guard import FileNonceStore, GrantGuard
from cloister.verify.attestation import TrustRoot

MEASURED = ("upstream/guard.py", "upstream/attested_server.py", "verify/response_sig.py")  # in cloister/

CUSTOMERS: dict[str, dict[str, Any]] = {
    "cus_1001": {"name": "Ada Lovelace", "email": "ada@example.com", "country": "GB", "tier": "gold"},
    "cus_1002": {"name": "Grace Hopper", "email": "grace@example.com", "country": "US", "tier": "silver"},
    "cus_1003": {"name": "Margaret Hamilton", "email": "margaret@example.com", "country": "US", "tier": "gold"},
}
TRANSACTIONS: dict[str, list[dict[str, Any]]] = {
    "cus_1001": [
        {"id": "txn_501", "amount": 1299.00, "currency": "USD", "item": "Analytical Engine (refurb)"},
        {"id": "txn_502", "amount": 49.50, "currency": "USD", "item": "Punch cards x500"},
    ],
    "cus_1002": [{"id": "txn_601", "amount": 310.25, "currency": "USD", "item": "COBOL manual"}],
    "cus_1003": [{"id": "txn_701", "amount": 8800.00, "currency": "USD", "item": "Guidance computer"}],
}
APPROVAL_THRESHOLD = 5000
INSTANCE = "refunds-eu-1"  # the example bundle's `instance` for refunds


def build_server(guard: GrantGuard | None) -> MCPServer:
    mcp = MCPServer("refunds", instructions="Customer lookups and refunds.", middleware=[guard] if guard else [])
    refunds: dict[str, dict[str, Any]] = {}
    ids = itertools.count(1)

    @mcp.tool(description="Look up a customer's profile by id (e.g. cus_1001).")
    def customer_lookup(customer_id: str) -> dict[str, Any]:
        if customer_id not in CUSTOMERS:
            raise ValueError(f"no customer {customer_id!r}")
        return {"customer_id": customer_id, **CUSTOMERS[customer_id]}

    @mcp.tool(description="A customer's recent transactions.")
    def transaction_history(customer_id: str, limit: int = 10) -> dict[str, Any]:
        return {"customer_id": customer_id, "transactions": TRANSACTIONS.get(customer_id, [])[: max(0, limit)]}

    @mcp.tool(name="refund.create", description="Create a refund of `amount` dollars for a customer.")
    def refund_create(customer_id: str, amount: float, reason: str = "") -> dict[str, Any]:
        if amount <= 0:
            raise ValueError("amount must be positive")
        refund_id = f"re_{next(ids):04d}"
        status = "pending_approval" if amount > APPROVAL_THRESHOLD else "succeeded"
        refunds[refund_id] = {"customer_id": customer_id, "amount": amount, "reason": reason, "status": status}
        return {"refund_id": refund_id, **refunds[refund_id]}

    @mcp.tool(
        name="refund.approve_above_threshold",
        description=f"Approve a refund above ${APPROVAL_THRESHOLD} that is pending approval.",
    )
    def refund_approve(refund_id: str) -> dict[str, Any]:
        refund = refunds.get(refund_id)
        if refund is None:
            raise ValueError(f"no refund {refund_id!r}")
        refund["status"] = "succeeded"
        return {"refund_id": refund_id, **refund}

    return mcp


def measured_files(script: Path) -> list[Path]:
    """The code a mock PCR0 of this server covers: the script that runs and the guard it uses."""
    import cloister

    package = Path(cloister.__file__).resolve().parent
    return [script.resolve(), *(package / name for name in MEASURED)]


def expected_pcr0(script: Path | None = None) -> bytes:
    from cloister.dev.measure import measure_files

    return measure_files(measured_files(script or Path(__file__)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cloister.dev.examples.refunds")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8441)
    p.add_argument("--trust-root", type=Path, help="PEM root for enclave attestations (default: AWS Root-G1)")
    p.add_argument("--expect-pcr0", help="the enclave image's PCR0 (hex) that grants must come from")
    p.add_argument(
        "--mock-nsm",
        type=Path,
        metavar="DIR",
        help="present a mock-NSM attestation (PCR0 measures this code), signed by the mock CA in DIR",
    )
    p.add_argument("--instance", default=INSTANCE, help=f"this upstream's instance id (default {INSTANCE})")
    p.add_argument("--nonces", type=Path, help="a directory of redeemed grant nonces shared with replicas")
    p.add_argument(
        "--unsafe-no-grants",
        action="store_true",
        help="accept calls without grants (UNSAFE: for the benchmark's direct baseline only)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s refunds %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("mcp", "uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    guard = None
    if args.unsafe_no_grants:
        logging.getLogger("refunds").warning("UNSAFE: --unsafe-no-grants accepts calls that no enclave authorised")
    else:
        root = TrustRoot.from_pem(args.trust_root.read_bytes()) if args.trust_root else TrustRoot.aws()
        pcrs = {0: bytes.fromhex(args.expect_pcr0)} if args.expect_pcr0 else {}
        nonces = FileNonceStore(args.nonces) if args.nonces else None
        guard = GrantGuard("refunds", trust_root=root, expected_pcrs=pcrs, instance=args.instance, nonces=nonces)
    server = build_server(guard)
    if args.mock_nsm is not None:
        from cloister.dev.mock_nsm import MockNsm
        from cloister.upstream.attested_server import serve_attestation

        pcr0 = expected_pcr0(Path(sys.modules["__main__"].__file__ or __file__))
        logging.getLogger("refunds").info("mock enclave: PCR0 %s", pcr0.hex())
        serve_attestation(server, MockNsm(args.mock_nsm, {0: pcr0}), guard=guard)
    server.run("streamable-http", host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
