"""For MCP servers that run in a Nitro Enclave (or under the mock NSM): present attestation.

    from cloister.upstream.attested_server import serve_attestation
    serve_attestation(mcp, DevNsm.open())          # in a real enclave
    serve_attestation(mcp, MockNsm(dir, pcrs))     # CI and laptops

adds the resource template `cloister://attestation/{nonce}`: reading it with a hex nonce returns
`{"document": base64}`, an NSM attestation document carrying that nonce. A Cloister relay reads
it with the enclave's challenge nonce, and the Cloister enclave verifies it against the PCRs
pinned for this server in the policy bundle.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from cloister.enclave.nsm import Nsm

ATTESTATION_TEMPLATE = "cloister://attestation/{nonce}"


def serve_attestation(mcp: MCPServer, nsm: Nsm) -> None:
    @mcp.resource(
        ATTESTATION_TEMPLATE,
        name="attestation",
        mime_type="application/json",
        description="This server's Nitro attestation document with your nonce (hex, 8-64 bytes).",
    )
    def attestation(nonce: str) -> str:
        try:
            raw = bytes.fromhex(nonce)
        except ValueError as exc:
            raise ValueError("the nonce must be hex") from exc
        if not 8 <= len(raw) <= 64:
            raise ValueError("the nonce must be 8 to 64 bytes")
        return json.dumps({"document": base64.b64encode(nsm.attestation(nonce=raw)).decode()})
