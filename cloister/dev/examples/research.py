"""The example `research` upstream: web search over a small offline corpus, a paid deep search,
and a scratch DB.

It runs over stdio, launched by the relay (`command = ["python", "-m", "cloister.dev.examples.research"]`).
It does not verify grants: it shows a server that relies on the relay alone. `deep_search` is
paid with x402: without a payment in `_meta["x402/payment"]` it answers JSON-RPC error -32402
with its payment requirements (the x402 MCP transport); the mock payment check only compares
amounts, where a real server would verify the payment with a facilitator.
"""

from __future__ import annotations

import sys
from decimal import Decimal, InvalidOperation
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

DEEP_SEARCH_PRICE = Decimal("0.05")
REQUIREMENTS = {
    "x402Version": 1,
    "error": "payment required",
    "accepts": [
        {
            "scheme": "exact",
            "network": "mock",
            "maxAmountRequired": str(DEEP_SEARCH_PRICE),
            "asset": "USDC",
            "payTo": "research.example",
            "resource": "mcp://research/deep_search",
            "description": f"Deep search, {DEEP_SEARCH_PRICE} USDC per query",
        }
    ],
}


async def require_payment(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    params = ctx.params or {}
    if ctx.method == "tools/call" and params.get("name") == "deep_search":
        payment = (params.get("_meta") or {}).get("x402/payment")
        body = payment.get("payload") if isinstance(payment, dict) else None
        try:
            paid = Decimal(str(body.get("amount"))) if isinstance(body, dict) else Decimal(0)
        except InvalidOperation:
            paid = Decimal(0)
        if paid < DEEP_SEARCH_PRICE:
            raise MCPError(-32402, f"payment required: {DEEP_SEARCH_PRICE} USDC", data=REQUIREMENTS)
    return await call_next(ctx)


CORPUS = [
    ("Model Context Protocol", "MCP is an open protocol that connects AI agents to tools and data sources."),
    ("AWS Nitro Enclaves", "Nitro Enclaves are isolated compute environments with cryptographic attestation."),
    ("Certificate Transparency", "RFC 9162 defines Merkle-tree logs with inclusion and consistency proofs."),
    ("Cedar", "Cedar is a policy language for authorization, with permit and forbid policies."),
]


def build_server() -> MCPServer:
    mcp = MCPServer("research", instructions="Offline web search and a scratch database.", middleware=[require_payment])
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


def main() -> int:
    build_server().run("stdio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
