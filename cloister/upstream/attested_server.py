"""For MCP servers that run in a Nitro Enclave (or under the mock NSM): present attestation, and
sign what you answer.

    from cloister.upstream.attested_server import serve_attestation
    serve_attestation(mcp, DevNsm.open(), guard=guard)          # in a real enclave
    serve_attestation(mcp, MockNsm(dir, pcrs), guard=guard)     # CI and laptops

adds the resource template `cloister://attestation/{nonce}`: reading it with a hex nonce returns
`{"document": base64}`, an NSM attestation document carrying that nonce. A Cloister relay reads
it with the enclave's challenge nonce, and the Cloister enclave verifies it against the PCRs
pinned for this server in the policy bundle.

The document's `user_data` binds this server's response key (an Ed25519 key made here, at
start, never stored: `cloister.verify.response_sig.UpstreamBinding`). With `guard=`, the
`GrantGuard` in the server's middleware signs every tools/call result it lets through with that
key, over the grant's nonce and the result's hash; the enclave checks the signature when it logs
the call's outcome, so a host that answers a call itself, or changes the answer, is caught
(docs/decisions/0017-signed-outcomes.md).
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.verify.response_sig import UpstreamBinding

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from cloister.enclave.nsm import Nsm
    from cloister.upstream.guard import GrantGuard

ATTESTATION_TEMPLATE = "cloister://attestation/{nonce}"


def serve_attestation(
    mcp: MCPServer,
    nsm: Nsm,
    *,
    guard: GrantGuard | None = None,
    response_key: ed25519.Ed25519PrivateKey | None = None,
) -> ed25519.Ed25519PrivateKey:
    """Serve attestation documents that bind a response key (`response_key`, or a new one); hand
    the key to `guard` to sign results with. Returns the key."""
    key = response_key or ed25519.Ed25519PrivateKey.generate()
    user_data = UpstreamBinding(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).encode()
    if guard is not None:
        guard.sign_responses(key)

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
        document = nsm.attestation(nonce=raw, user_data=user_data)
        return json.dumps({"document": base64.b64encode(document).decode()})

    return key
