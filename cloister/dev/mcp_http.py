"""The HTTP client the demo, the benchmark and the tests give the official MCP client.

The SDK builds the same client in a private module (`mcp.shared._httpx_utils`); we do not import
private names, so this is its public equivalent: 30 s for connect/write/pool, a long read
timeout for response streams, no redirects (the MCP transports handle those themselves).
"""

from __future__ import annotations

import httpx2

CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 300.0


def mcp_http_client(headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        headers=headers or {}, timeout=timeout or httpx2.Timeout(CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S)
    )
