"""The JSON-RPC error codes the relay answers agents with (the README's "Errors agents see"), the
one table that maps the enclave's denial classes (the proto's `DenyCode`) to them, and how an
upstream's errors are kept apart from Cloister's own.

Every error the relay makes carries `data.source = "cloister"`; every error an upstream made
carries `data.source = "upstream"` and `data.upstream_server`. An upstream cannot answer with a
code of Cloister's own block (`CLOISTER_CODES`): it could pass for an enclave denial, so
`upstream_error_code` turns it into UPSTREAM_FAILED and the original goes in `data.upstream_code`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from cloister.wire import enclave_pb2 as pb

DENIED: Final = -32001  # the enclave denied the call (policy, identity, unknown server/tool, bad arguments)
LIMITED: Final = -32002  # a rate limit or spend cap was hit
UNAUTHENTICATED: Final = -32003  # missing, expired or forged token
ENCLAVE_UNAVAILABLE: Final = -32004  # fail closed: no decision could be obtained
UPSTREAM_FAILED: Final = -32005  # the upstream crashed, hung or refused
LOG_UNAVAILABLE: Final = -32006  # the decision could not be persisted; nothing was forwarded
INVALID_PARAMS: Final = -32602
PAYMENT_REQUIRED: Final = -32402  # the x402 MCP transport's error: the upstream wants a payment

# Cloister's own block: codes only the relay may answer with (README, "Errors agents see").
CLOISTER_CODES: Final = range(-32009, -32000)  # -32009 ... -32001
SOURCE: Final = "source"  # the `data` key that says who made an error
FROM_CLOISTER: Final = "cloister"
FROM_UPSTREAM: Final = "upstream"

# Every proto DenyCode (tests/relay/test_codes.py checks that none is missing).
ERROR_FOR_DENIAL: Final[Mapping[pb.DenyCode, int]] = {
    pb.DENY_CODE_UNSPECIFIED: DENIED,  # a denial of no known class is a denial all the same
    pb.DENY_CODE_BAD_ARGUMENTS: DENIED,
    pb.DENY_CODE_UNAUTHENTICATED: UNAUTHENTICATED,
    pb.DENY_CODE_UNKNOWN_AGENT: DENIED,
    pb.DENY_CODE_UNKNOWN_SERVER: DENIED,
    pb.DENY_CODE_UNKNOWN_TOOL: DENIED,
    pb.DENY_CODE_QUARANTINED: DENIED,
    pb.DENY_CODE_POLICY: DENIED,
    pb.DENY_CODE_NO_PERMIT: DENIED,
    pb.DENY_CODE_LIMIT: LIMITED,
}


def denial_error(denial: pb.DenyCode) -> int:
    """The JSON-RPC code for a denial; a class this relay does not know yet (a newer enclave) is DENIED."""
    return ERROR_FOR_DENIAL.get(denial, DENIED)


def upstream_error_code(code: int) -> int:
    """The code an agent sees for an upstream's JSON-RPC error: its own, unless it is one of
    Cloister's (then UPSTREAM_FAILED, so it cannot pass for a denial or any other Cloister verdict)."""
    return UPSTREAM_FAILED if code in CLOISTER_CODES else code
