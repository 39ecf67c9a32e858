"""The contract between the relay (untrusted) and the enclave (trusted), besides the .proto.

Both sides import these names; neither matches the other's message text. A change here is a
change to both halves, and, as part of the TCB (`cloister.tcb`), to PCR0.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY
from cloister.verify.response_sig import RESPONSE_SIG_META_KEY
from cloister.verify.x402 import X402_META_KEY

# gRPC message-size cap, both directions, both sides (a resume's history and a bundle fit).
MAX_MESSAGE_BYTES: Final = 16 << 20

# Calls in one message of the Channel stream (decision 0022): the parent batches what it has
# waiting, up to this; the enclave ends a stream that sends more.
MAX_CHANNEL_BATCH: Final = 64

# MCP tool names the relay shows agents: "<server>___<tool>", AgentCore Gateway's naming.
TOOL_SEPARATOR: Final = "___"

# Keys in an MCP request's or response's params._meta. The grant's and the upstream attestation's
# are part of the grant format that upstreams read (`cloister.verify.grant`), the x402 payment's
# (`cloister.verify.x402`: the x402 MCP transport's payment payload) and an attested upstream's
# response signature in a result's _meta (`cloister.verify.response_sig`) too; re-exported here.
LOG_META_KEY: Final = "dev.cloister/log"  # log indexes of a call's entries, relay -> agent


class DenyCode(StrEnum):
    """Why the enclave denied a call: the decision entry's `code`, sent as the proto's `DenyCode`
    (`DENY_CODE_<member name>`). The enclave produces exactly these strings; its servicer maps
    them to the proto enum and the relay maps the enum to JSON-RPC errors, each with one table."""

    BAD_ARGUMENTS = "bad-arguments"  # arguments malformed or over the cap, or an unusable payment or cost
    UNAUTHENTICATED = "unauthenticated"  # missing, expired or forged token
    UNKNOWN_AGENT = "unknown-agent"  # a valid token for an agent the bundle does not register
    UNKNOWN_SERVER = "unknown-server"  # a server the bundle does not declare
    UNKNOWN_TOOL = "unknown-tool"  # a tool the bundle does not declare for that server
    QUARANTINED = "quarantined"  # the server's identity is unproven, or the tool drifted from its pin
    POLICY = "policy"  # a Cedar forbid matched (or could not be evaluated)
    NO_PERMIT = "no-permit"  # no Cedar permit matched
    LIMIT = "limit"  # a rate limit or spend cap


# The gRPC status (a `grpc.StatusCode` name) LoadPolicy answers for a validly signed bundle whose
# version is not above the one in force, e.g. the same bundle again; other refusals are
# FAILED_PRECONDITION. The relay branches on this status, never on the message.
POLICY_NOT_NEWER_STATUS: Final = "ALREADY_EXISTS"

# The longest limit window a bundle may declare; the relay hands the enclave this much history
# (plus a margin) at resume so budgets are rebuilt, never reset.
MAX_LIMIT_WINDOW_S: Final = 31 * 86400
RESUME_HISTORY_MARGIN_S: Final = 3600

__all__ = [
    "ATTESTATION_META_KEY",
    "GRANT_META_KEY",
    "LOG_META_KEY",
    "MAX_CHANNEL_BATCH",
    "MAX_LIMIT_WINDOW_S",
    "MAX_MESSAGE_BYTES",
    "POLICY_NOT_NEWER_STATUS",
    "RESPONSE_SIG_META_KEY",
    "RESUME_HISTORY_MARGIN_S",
    "TOOL_SEPARATOR",
    "X402_META_KEY",
    "DenyCode",
]
