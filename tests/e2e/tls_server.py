"""A test MCP server on HTTPS: `python tls_server.py PORT CERT KEY`."""

from __future__ import annotations

import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

mcp = MCPServer("secure")


@mcp.tool(description="Charge a card.")
def charge(amount: int) -> str:
    return f"charged {amount}"


if __name__ == "__main__":
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    uvicorn.run(
        mcp.streamable_http_app(), host="127.0.0.1", port=port, ssl_certfile=cert, ssl_keyfile=key, log_level="warning"
    )
