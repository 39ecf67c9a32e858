"""A test upstream MCP server (stdio) behind a real GrantGuard pinned to a witnessed log
(decision 0015): it takes a call only with a grant from the enclave key the witnessed log
introduced and, with witnessed_decisions, only once the witnesses cosigned the call's decision.

The pins (trust root, PCR0, origin, log vkey, witness vkeys, quorum) are read from $PINS_FILE at
the first call: the log key is known only once the relay has unsealed it, after this process
starts. Every call the guard lets through is appended to $CALLS_FILE with the _meta keys it had.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer

from cloister.upstream.guard import GrantGuard, WitnessedLogPolicy
from cloister.verify.attestation import TrustRoot


class LazyGuard:
    def __init__(self) -> None:
        self._guard: GrantGuard | None = None

    def _load(self) -> GrantGuard:
        pins = json.loads(Path(os.environ["PINS_FILE"]).read_text())
        return GrantGuard(
            "guarded",
            trust_root=TrustRoot.from_pem(Path(pins["trust_root"]).read_bytes()),
            expected_pcrs={0: bytes.fromhex(pins["pcr0"])},
            witnessed_log=WitnessedLogPolicy.from_vkeys(
                pins["origin"], pins["log_vkey"], pins["witnesses"], pins["quorum"]
            ),
            witnessed_decisions=bool(pins.get("witnessed_decisions")),
        )

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == "tools/call":
            if self._guard is None:
                self._guard = self._load()
            params = dict(ctx.params or {})
            self._guard.check(params)
            _record(params)
        return await call_next(ctx)


def _record(params: dict[str, Any]) -> None:
    with open(os.environ["CALLS_FILE"], "a") as f:
        f.write(json.dumps({"name": params.get("name"), "meta": sorted(params.get("_meta") or {})}) + "\n")


mcp = MCPServer("guarded", middleware=[LazyGuard()])


@mcp.tool(description="Echo the text back.")
def echo(text: str) -> str:
    return text


if __name__ == "__main__":
    mcp.run("stdio")
