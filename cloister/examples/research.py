"""The example `research` upstream: web search over a small offline corpus, and a scratch DB.

It runs over stdio, launched by the relay (`command = ["python", "-m", "cloister.examples.research"]`).
It does not verify grants: it shows a server that relies on the relay alone.
"""

from __future__ import annotations

import sys
from typing import Any

from mcp.server.mcpserver import MCPServer

CORPUS = [
    ("Model Context Protocol", "MCP is an open protocol that connects AI agents to tools and data sources."),
    ("AWS Nitro Enclaves", "Nitro Enclaves are isolated compute environments with cryptographic attestation."),
    ("Certificate Transparency", "RFC 9162 defines Merkle-tree logs with inclusion and consistency proofs."),
    ("Cedar", "Cedar is a policy language for authorization, with permit and forbid policies."),
]


def build_server() -> MCPServer:
    mcp = MCPServer("research", instructions="Offline web search and a scratch database.")
    db: dict[str, Any] = {}

    @mcp.tool(description="Search the web (offline corpus) for a query.")
    def web_search(query: str, limit: int = 3) -> dict[str, Any]:
        words = {w.lower() for w in query.split()}
        hits = [{"title": t, "snippet": s} for t, s in CORPUS
                if words & {w.lower().strip(".,") for w in (t + " " + s).split()}]
        return {"query": query, "results": hits[: max(0, limit)]}

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
