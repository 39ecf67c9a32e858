"""The relay's one table from the enclave's denial classes to the JSON-RPC errors agents see."""

from __future__ import annotations

from typing import cast

from cloister.relay.codes import DENIED, ERROR_FOR_DENIAL, LIMITED, UNAUTHENTICATED, denial_error
from cloister.wire import enclave_pb2 as pb
from cloister.wire.contract import DenyCode


def test_every_denial_class_has_a_jsonrpc_code() -> None:
    assert set(ERROR_FOR_DENIAL) == set(pb.DenyCode.values())
    for code in DenyCode:
        assert denial_error(cast(pb.DenyCode, pb.DenyCode.Value(f"DENY_CODE_{code.name}"))) in (
            DENIED,
            LIMITED,
            UNAUTHENTICATED,
        )


def test_the_mapping_agents_rely_on() -> None:
    # The README's "Errors agents see": limits -32002, tokens -32003, every other denial -32001.
    assert denial_error(pb.DENY_CODE_LIMIT) == LIMITED == -32002
    assert denial_error(pb.DENY_CODE_UNAUTHENTICATED) == UNAUTHENTICATED == -32003
    others = set(pb.DenyCode.values()) - {pb.DENY_CODE_LIMIT, pb.DENY_CODE_UNAUTHENTICATED}
    assert {denial_error(cast(pb.DenyCode, v)) for v in others} == {DENIED} == {-32001}
    # A class from a newer enclave that this relay does not know is still a denial.
    assert denial_error(max(pb.DenyCode.values()) + 1) == DENIED  # type: ignore[arg-type]
