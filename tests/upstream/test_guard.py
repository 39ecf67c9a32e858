"""GrantGuard, as an upstream server runs it: a relay that skips the enclave, replays a grant,
or changes the arguments after the grant is refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from cloister.upstream.guard import GRANT_REFUSED, GrantGuard
from cloister.verify.attestation import TrustRoot
from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY
from tests.world import World, make_world


@pytest.fixture
def w(tmp_path: Path) -> World:
    return make_world(tmp_path)


def guard_for(w: World, **kw: object) -> GrantGuard:
    root = TrustRoot.from_pem((w.root / "mock-nsm" / "root.pem").read_bytes())
    return GrantGuard(
        "refunds",
        trust_root=root,
        expected_pcrs={0: w.core.pcrs[0]},
        clock=lambda: datetime.fromtimestamp(w.clock.ms / 1000, UTC),
        **kw,  # type: ignore[arg-type]
    )


def grant_params(w: World, args: dict[str, object]) -> dict[str, object]:
    v = w.core.authorize(
        token=w.token("refund-bot", ["refund-agent"]),
        server="refunds",
        tool="customer_lookup",
        arguments_json=json.dumps(args).encode(),
        request_id="",
        persisted_size=0,
    )
    assert v.allowed
    doc, _ = w.core.attest(b"n" * 16, include_checkpoint=False)
    return {
        "name": "customer_lookup",
        "arguments": args,
        "_meta": {
            GRANT_META_KEY: base64.b64encode(v.grant).decode(),
            ATTESTATION_META_KEY: base64.b64encode(doc).decode(),
        },
    }


def refused(guard: GrantGuard, params: dict[str, object], reason: str) -> None:
    with pytest.raises(MCPError) as err:
        guard.check(params)
    assert err.value.code == GRANT_REFUSED and err.value.data["reason"] == reason, err.value.message


def test_a_valid_grant_is_honoured_once(w: World) -> None:
    guard = guard_for(w)
    params = grant_params(w, {"customer_id": "cus_1001"})
    guard.check(params)
    refused(guard, params, "replayed")


def test_skipping_the_enclave_is_refused(w: World) -> None:
    refused(guard_for(w), {"name": "customer_lookup", "arguments": {}}, "missing")


def test_changed_arguments_are_refused(w: World) -> None:
    params = grant_params(w, {"customer_id": "cus_1001"})
    params["arguments"] = {"customer_id": "cus_1002"}
    refused(guard_for(w), params, "wrong-arguments")


def test_another_tool_is_refused(w: World) -> None:
    params = grant_params(w, {"customer_id": "cus_1001"})
    params["name"] = "refund.create"
    refused(guard_for(w), params, "wrong-call")


def test_expired_grant_is_refused(w: World) -> None:
    params = grant_params(w, {"customer_id": "cus_1001"})
    w.clock.advance(61)
    refused(guard_for(w), params, "expired")


def test_an_enclave_with_other_code_is_not_trusted(w: World) -> None:
    root = TrustRoot.from_pem((w.root / "mock-nsm" / "root.pem").read_bytes())
    guard = GrantGuard(
        "refunds",
        trust_root=root,
        expected_pcrs={0: b"\x01" * 48},
        clock=lambda: datetime.fromtimestamp(w.clock.ms / 1000, UTC),
    )
    refused(guard, grant_params(w, {"customer_id": "cus_1001"}), "untrusted-enclave")


def test_a_grant_signed_by_another_enclave_is_refused(w: World, tmp_path: Path) -> None:
    other = make_world(tmp_path / "other")
    params = grant_params(other, {"customer_id": "cus_1001"})
    doc, _ = w.core.attest(b"n" * 16, include_checkpoint=False)
    params["_meta"][ATTESTATION_META_KEY] = base64.b64encode(doc).decode()  # type: ignore[index]
    refused(guard_for(w), params, "unknown-key")
