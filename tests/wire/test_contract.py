"""The typed contract across the boundary: deny codes and the "bundle not newer" status, as the
enclave's servicer answers them (EnclaveService over the test world's EnclaveCore, in-process)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.dev.examples.payments import payment as usdc
from cloister.enclave.service import DENIALS, EnclaveService
from cloister.wire import enclave_pb2 as pb
from cloister.wire.contract import POLICY_NOT_NEWER_STATUS, DenyCode
from tests.relay.inprocess import Aborted, ServicerContext
from tests.world import World, epoch_ms, make_world

EPOCH_S = epoch_ms() // 1000


def test_deny_codes_match_the_proto_enum_both_ways() -> None:
    proto = {name.removeprefix("DENY_CODE_"): value for name, value in pb.DenyCode.items()}
    assert proto.pop("UNSPECIFIED") == 0
    assert set(proto) == {c.name for c in DenyCode}
    # The servicer's one table covers every DenyCode, each with its own proto value.
    assert set(DENIALS) == set(DenyCode)
    assert {c: DENIALS[c] for c in DenyCode} == {c: proto[c.name] for c in DenyCode}
    assert len(set(DENIALS.values())) == len(DenyCode)


def test_deny_code_values_are_the_strings_the_enclave_logs() -> None:
    # The decision entry's `code` (and the auditor's and `policy explain`'s vocabulary).
    assert sorted(DenyCode) == sorted(
        [
            "bad-arguments",
            "unauthenticated",
            "unknown-agent",
            "unknown-server",
            "unknown-tool",
            "quarantined",
            "policy",
            "no-permit",
            "limit",
        ]
    )


@pytest.fixture
def w(tmp_path: Path) -> World:
    return make_world(tmp_path)


def authorize(
    w: World, token: str, server: str, tool: str, args: dict[str, Any] | bytes, payment: str = ""
) -> pb.AuthorizeResponse:
    raw = args if isinstance(args, bytes) else json.dumps(args).encode()
    resp = EnclaveService(w.core).Authorize(
        pb.AuthorizeRequest(
            token=token,
            server=server,
            tool=tool,
            arguments_json=raw,
            persisted_size=len(w.log),
            payment=payment.encode(),  # an x402 payment payload (JSON), "" for none
        ),
        ServicerContext(),  # type: ignore[arg-type]
    )
    for i, data in enumerate(resp.log.entries):
        if resp.log.first_index + i == len(w.log):
            w.log.append(data)
    return resp


REFUND, RESEARCH = ("refund-bot", ["refund-agent"]), ("research-bot", ["research-agent"])


@pytest.mark.parametrize(
    ("who", "server", "tool", "args", "payment", "code"),
    [
        (REFUND, "refunds", "customer_lookup", b"[1]", "", DenyCode.BAD_ARGUMENTS),
        (("research-bot", ["refund-agent"]), "refunds", "customer_lookup", {}, "", DenyCode.UNAUTHENTICATED),
        (("mallory-bot", []), "refunds", "customer_lookup", {}, "", DenyCode.UNKNOWN_AGENT),
        (REFUND, "billing", "charge", {}, "", DenyCode.UNKNOWN_SERVER),
        (REFUND, "refunds", "delete_all", {}, "", DenyCode.UNKNOWN_TOOL),
        (REFUND, "refunds", "refund.approve_above_threshold", {"refund_id": "r"}, "", DenyCode.POLICY),
        (RESEARCH, "research", "db_write", {"key": "k", "value": "v"}, "", DenyCode.NO_PERMIT),
        (RESEARCH, "research", "deep_search", {"query": "q"}, json.dumps(usdc("0.11", now_s=EPOCH_S)), DenyCode.LIMIT),
    ],
)
def test_each_denial_crosses_the_wire_typed(
    w: World,
    who: tuple[str, list[str]],
    server: str,
    tool: str,
    args: dict[str, Any] | bytes,
    payment: str,
    code: DenyCode,
) -> None:
    resp = authorize(w, w.token(*who), server, tool, args, payment)
    assert resp.decision == pb.DENY and not resp.grant
    assert resp.denial == DENIALS[code] and resp.deny_code == code.value


def test_quarantine_crosses_the_wire_typed(tmp_path: Path) -> None:
    # With identities, refunds is quarantined until it proves itself.
    w = make_world(tmp_path, identities=True)
    resp = authorize(w, w.token("refund-bot", ["refund-agent"]), "refunds", "customer_lookup", {"customer_id": "c"})
    assert resp.decision == pb.DENY and resp.denial == pb.DENY_CODE_QUARANTINED


def test_an_allow_carries_no_denial(w: World) -> None:
    resp = authorize(w, w.token("refund-bot", ["refund-agent"]), "refunds", "customer_lookup", {"customer_id": "c"})
    assert resp.decision == pb.ALLOW and resp.grant
    assert resp.denial == pb.DENY_CODE_UNSPECIFIED and resp.deny_code == ""


def test_a_deny_code_outside_the_contract_fails_closed(
    w: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A programming error in the core (an allow that names a code the contract lacks) is answered
    # as a plain denial, without the grant, and logged inside the enclave.
    real = w.core.authorize

    def odd(**kw: Any) -> Any:
        return dataclasses.replace(real(**kw), code="made-up")

    monkeypatch.setattr(w.core, "authorize", odd)
    with caplog.at_level(logging.ERROR, logger="cloister.enclave.service"):
        resp = authorize(w, w.token("refund-bot", ["refund-agent"]), "refunds", "customer_lookup", {"customer_id": "c"})
    assert resp.decision == pb.DENY and not resp.grant and resp.denial == pb.DENY_CODE_UNSPECIFIED
    assert "'made-up', which is not a DenyCode" in caplog.text


def load(w: World, bundle: bytes) -> pb.LoadPolicyResponse:
    return EnclaveService(w.core).LoadPolicy(
        pb.LoadPolicyRequest(bundle=bundle, persisted_size=len(w.log)),
        ServicerContext(),  # type: ignore[arg-type]
    )


def test_a_bundle_not_above_the_version_in_force_has_its_own_status(w: World) -> None:
    not_newer = grpc.StatusCode[POLICY_NOT_NEWER_STATUS]
    assert not_newer == grpc.StatusCode.ALREADY_EXISTS
    assert load(w, w.sign_bundle(2)).version == 2
    for stale in (w.sign_bundle(2), w.sign_bundle(1)):  # the same version again, and a rollback
        with pytest.raises(Aborted) as refused:
            load(w, stale)
        assert refused.value.code == not_newer and "is not above the version in force (2)" in refused.value.details
    # Every other refusal stays FAILED_PRECONDITION, whatever its version: the status says "a signed
    # bundle at or above this version is in force", so an unsigned low version does not get it.
    stranger = ed25519.Ed25519PrivateKey.generate()
    for refused_bundle in (
        w.sign_bundle(1, key=stranger),
        b"garbage",
        w.sign_bundle(3, {"policies/x.cedar": "permit (principal, action, resource) when { 1 + };"}),
    ):
        with pytest.raises(Aborted) as refused:
            load(w, refused_bundle)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details
    assert load(w, w.sign_bundle(3)).version == 3
