"""The example `research` upstream: web search over a small offline corpus, a paid deep search,
and a scratch DB.

It runs over stdio, launched by the relay (`command = ["python", "-m", "cloister.dev.examples.research"]`),
or over streamable HTTP with `--port`. By default it does not verify grants: it shows a server
that relies on the relay alone. With `--trust-root` (and `--expect-pcr0`) it verifies them with
`GrantGuard` as instance `--instance` (the example bundle's `research-us-1`), so a call whose x402
payment is not the one the enclave charged and bound into the grant is refused.

`deep_search` is paid with x402: without a payment in `_meta["x402/payment"]` it answers JSON-RPC
error -32402 with its payment requirements (the x402 MCP transport; `payments.requirements()`);
the mock payment check (`payments.paid_enough`) reads the payment as the `exact` scheme defines
it, where a real server would verify and settle it with a facilitator.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

from cloister.dev.examples.payments import DEEP_SEARCH_PRICE, paid_enough, requirements
from cloister.upstream.guard import FileNonceStore, GrantGuard
from cloister.verify.attestation import TrustRoot

INSTANCE = "research-us-1"  # the example bundle's `instance` for research


async def require_payment(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    params = ctx.params or {}
    if ctx.method == "tools/call" and params.get("name") == "deep_search":
        payment = (params.get("_meta") or {}).get("x402/payment")
        if not paid_enough(payment):
            raise MCPError(-32402, f"payment required: {DEEP_SEARCH_PRICE} USDC", data=requirements())
    return await call_next(ctx)


CORPUS = [
    ("Model Context Protocol", "MCP is an open protocol that connects AI agents to tools and data sources."),
    ("AWS Nitro Enclaves", "Nitro Enclaves are isolated compute environments with cryptographic attestation."),
    ("Certificate Transparency", "RFC 9162 defines Merkle-tree logs with inclusion and consistency proofs."),
    ("Cedar", "Cedar is a policy language for authorization, with permit and forbid policies."),
]


def build_server(guard: GrantGuard | None = None) -> MCPServer:
    middleware: list[Any] = [guard, require_payment] if guard is not None else [require_payment]
    mcp = MCPServer("research", instructions="Offline web search and a scratch database.", middleware=middleware)
    db: dict[str, Any] = {}

    @mcp.tool(description="Search the web (offline corpus) for a query.")
    def web_search(query: str, limit: int = 3) -> dict[str, Any]:
        words = {w.lower() for w in query.split()}
        hits = [
            {"title": t, "snippet": s}
            for t, s in CORPUS
            if words & {w.lower().strip(".,") for w in (t + " " + s).split()}
        ]
        return {"query": query, "results": hits[: max(0, limit)]}

    @mcp.tool(description=f"Deep search with sources (paid: {DEEP_SEARCH_PRICE} USDC per query, x402).")
    def deep_search(query: str) -> dict[str, Any]:
        hits = [
            {"title": t, "snippet": s, "source": f"https://example.org/{t.replace(' ', '-').lower()}"}
            for t, s in CORPUS
            if any(w.lower() in (t + s).lower() for w in query.split())
        ]
        return {"query": query, "results": hits, "paid": str(DEEP_SEARCH_PRICE)}

    @mcp.tool(description="Write a record to the research database.")
    def db_write(key: str, value: str) -> dict[str, Any]:
        db[key] = value
        return {"ok": True, "key": key}

    return mcp


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cloister.dev.examples.research")
    p.add_argument("--port", type=int, help="serve streamable HTTP on this port (default: stdio)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--trust-root", type=Path, help="verify grants: PEM root for enclave attestations")
    p.add_argument("--expect-pcr0", help="the enclave image's PCR0 (hex) that grants must come from")
    p.add_argument("--instance", default=INSTANCE, help=f"this upstream's instance id (default {INSTANCE})")
    p.add_argument("--nonces", type=Path, help="a directory of redeemed grant nonces shared with replicas")
    args = p.parse_args(argv)
    guard = None
    if args.trust_root is not None:
        guard = GrantGuard(
            "research",
            trust_root=TrustRoot.from_pem(args.trust_root.read_bytes()),
            expected_pcrs={0: bytes.fromhex(args.expect_pcr0)} if args.expect_pcr0 else {},
            instance=args.instance,
            nonces=FileNonceStore(args.nonces) if args.nonces else None,
        )
    server = build_server(guard)
    if args.port is None:
        server.run("stdio")
    else:
        server.run("streamable-http", host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
