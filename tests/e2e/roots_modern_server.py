"""A test upstream on the Python SDK that negotiates 2026-07-28 with the relay: it gets roots the
modern way, as an input round of its tools/call (`InputRequiredResult`), not as a request of its
own (decision 0027). Every answer it gets is appended to $ROOTS_FILE as a JSON line."""

from __future__ import annotations

import json
import os
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resolve import ListRoots, Resolve
from mcp_types import ListRootsResult

mcp = MCPServer("modern")


def _roots() -> ListRoots:
    return ListRoots()


@mcp.tool(description="The client's roots, asked as an input round of this call.")
def peek(found: Annotated[ListRootsResult, Resolve(_roots)]) -> str:
    uris = [str(r.uri) for r in found.roots]
    path = os.environ.get("ROOTS_FILE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"when": "modern", "roots": uris}) + "\n")
    return json.dumps(uris)


if __name__ == "__main__":
    mcp.run("stdio")
