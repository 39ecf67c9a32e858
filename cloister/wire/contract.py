"""The contract between the relay (untrusted) and the enclave (trusted), besides the .proto.

Both sides import these names; neither matches the other's message text. A change here is a
change to both halves, and, as part of the TCB (`cloister.tcb`), to PCR0.
"""

from __future__ import annotations

from typing import Final

from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY

# gRPC message-size cap, both directions, both sides (a resume's history and a bundle fit).
MAX_MESSAGE_BYTES: Final = 16 << 20

# MCP tool names the relay shows agents: "<server>___<tool>", AgentCore Gateway's naming.
TOOL_SEPARATOR: Final = "___"

# Keys in an MCP request's or response's params._meta. The grant's and the upstream attestation's
# are part of the grant format that upstreams read (`cloister.verify.grant`), re-exported here.
LOG_META_KEY: Final = "dev.cloister/log"  # log indexes of a call's entries, relay -> agent
X402_META_KEY: Final = "x402/payment"  # the x402 MCP transport's payment payload

# The longest limit window a bundle may declare; the relay hands the enclave this much history
# (plus a margin) at resume so budgets are rebuilt, never reset.
MAX_LIMIT_WINDOW_S: Final = 31 * 86400
RESUME_HISTORY_MARGIN_S: Final = 3600

__all__ = ["ATTESTATION_META_KEY", "GRANT_META_KEY", "LOG_META_KEY", "MAX_LIMIT_WINDOW_S", "MAX_MESSAGE_BYTES",
           "RESUME_HISTORY_MARGIN_S", "TOOL_SEPARATOR", "X402_META_KEY"]
