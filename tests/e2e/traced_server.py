"""A test upstream MCP server (stdio) that records the W3C trace context each tools/call carried
in `params._meta` ($TRACE_FILE, one JSON line per call)."""

from __future__ import annotations

import json
import os
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer


def _append(line: str) -> None:
    with open(os.environ["TRACE_FILE"], "a") as f:
        f.write(line + "\n")


async def record(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    if ctx.method == "tools/call":
        meta = dict((ctx.params or {}).get("_meta") or {})
        _append(json.dumps({"traceparent": meta.get("traceparent"), "keys": sorted(meta)}))
    return await call_next(ctx)


mcp = MCPServer("traced", middleware=[record])


@mcp.tool(description="Echo the text back.")
def echo(text: str) -> str:
    return text


if __name__ == "__main__":
    mcp.run("stdio")
