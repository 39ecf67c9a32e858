"""A test upstream MCP server (stdio): echoes, sleeps, or crashes, and records every call it gets.

Every tools/call that reaches it is appended to $CALLS_FILE, so tests can prove that nothing
was forwarded without an allow.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from mcp.server.mcpserver import MCPServer

mcp = MCPServer("slow")


def _record(tool: str, args: dict[str, Any]) -> None:
    path = os.environ.get("CALLS_FILE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"tool": tool, "args": args}) + "\n")


@mcp.tool(description="Echo the text back.")
def echo(text: str) -> str:
    _record("echo", {"text": text})
    return text


@mcp.tool(description="Sleep, then answer.")
def sleep(seconds: float) -> str:
    _record("sleep", {"seconds": seconds})
    time.sleep(seconds)
    return "awake"


@mcp.tool(description="Exit the process without answering.")
def crash() -> str:
    _record("crash", {})
    os._exit(3)


if __name__ == "__main__":
    mcp.run("stdio")
