"""Grants only from witnessed keys (issue 10, decision 0015): an upstream that pins the log and its
witnesses accepts a grant only from the enclave key the log introduced at a checkpoint a quorum of
those witnesses cosigned. A shadow enclave of the same image (same PCR0, same sealed log key) on a
copy of the log is refused, even if it could grant."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from cloister.enclave.core import EnclaveCore
from cloister.upstream.guard import GrantGuard
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY
from cloister.verify.key_evidence import (
    KEY_EVIDENCE_META_KEY,
    KeyEvidence,
    WitnessedLogPolicy,
    encode_key_evidence,
    verify_key_evidence,
)
from cloister.verify.merkle import inclusion_proof
from cloister.verify.note import parse_note
from tests.enclave.test_freshness import Witnesses, catch_up, witnessed_world
from tests.enclave.test_resume import material, node_source
from tests.upstream.test_guard import REFUNDS, guard_for, refused
from tests.world import ORIGIN, World


def evidence(log: list[bytes], cosigned: bytes, index: int) -> str:
    size = int(parse_note(cosigned).text.split(b"\n")[1])
    proof = inclusion_proof(index, size, node_source(log[:size]))
    return encode_key_evidence(KeyEvidence(cosigned, index, log[index], tuple(proof)))


def policy(w: World, ws: Witnesses, quorum: int = 2) -> WitnessedLogPolicy:
    return WitnessedLogPolicy.from_vkeys(ORIGIN, w.core.note_signer.vkey, [c.vkey for c in ws.cosigners], quorum)


def params(w: World, core: EnclaveCore, key_evidence: str | None) -> dict[str, Any]:
    args = {"customer_id": "cus_1"}
    v = core.authorize(
        token=w.token("refund-bot", ["refund-agent"]),
        server="refunds",
        tool="customer_lookup",
        arguments_json=json.dumps(args).encode(),
        request_id="",
        persisted_size=len(w.log),
    )
    w.persist(v.log)
    assert v.allowed
    doc, _ = core.attest(b"n" * 16, include_checkpoint=False)
    meta = {
        GRANT_META_KEY: base64.b64encode(v.grant).decode(),
        ATTESTATION_META_KEY: base64.b64encode(doc).decode(),
    }
    if key_evidence is not None:
        meta[KEY_EVIDENCE_META_KEY] = key_evidence
    return {"name": "customer_lookup", "arguments": args, "_meta": meta}


@pytest.fixture
def witnessed(tmp_path: Path) -> tuple[World, Witnesses, str]:
    w, ws = witnessed_world(tmp_path)
    note = w.core.sync(len(w.log)).checkpoint.note
    cosigned = ws.cosign(w.log, note)
    w.core.add_cosignatures(cosigned)
    return w, ws, evidence(w.log, cosigned, 0)


def witnessed_guard(w: World, ws: Witnesses) -> GrantGuard:
    plain = guard_for(w)
    return GrantGuard(
        "refunds",
        trust_root=plain.trust_root,
        expected_pcrs=plain.expected_pcrs,
        instance=REFUNDS,
        clock=plain._clock,
        witnessed_log=policy(w, ws),
    )


def test_the_witnessed_key_is_accepted_and_its_evidence_checks(witnessed: tuple[World, Witnesses, str]) -> None:
    w, ws, ev = witnessed
    entry = verify_key_evidence(ev, policy(w, ws))
    assert entry.grant_key == w.core.grant_public
    witnessed_guard(w, ws).check(params(w, w.core, ev))


def test_grants_without_evidence_or_with_bad_evidence_are_refused(witnessed: tuple[World, Witnesses, str]) -> None:
    w, ws, ev = witnessed
    guard = witnessed_guard(w, ws)
    refused(guard, params(w, w.core, None), "unwitnessed", "only from enclave keys introduced")
    data = json.loads(ev)
    one = data["checkpoint"].rsplit("— ", 1)[0]  # drop the last cosignature line: quorum 2 not met
    for bad, match in [
        ({**data, "checkpoint": one}, "cosigned by 1 of the 2"),
        ({**data, "index": 1}, "inclusion"),
        ({**data, "proof": []}, "inclusion"),
        ({**data, "v": 2}, "v = 1"),
        ({**data, "entry": "%%%"}, "base64"),
    ]:
        refused(guard, params(w, w.core, json.dumps(bad)), "unwitnessed", "")
        with pytest.raises((DecodeError, VerificationError), match=match):
            verify_key_evidence(json.dumps(bad), policy(w, ws))
    refused(guard, params(w, w.core, "x" * 70_000), "unwitnessed", "at most")
    refused(guard, params(w, w.core, 7), "malformed", "JSON string")  # type: ignore[arg-type]


def test_evidence_for_another_log_key_or_origin_is_refused(witnessed: tuple[World, Witnesses, str]) -> None:
    w, ws, ev = witnessed
    other = WitnessedLogPolicy.from_vkeys("cloister.test/other", w.core.note_signer.vkey, [ws.cosigners[0].vkey], 1)
    with pytest.raises(VerificationError, match="origin"):
        verify_key_evidence(ev, other)


def test_a_shadow_enclave_of_the_same_image_is_refused(witnessed: tuple[World, Witnesses, str]) -> None:
    """A second enclave of the same image on a copy of the log: same PCR0, same sealed log key, a
    valid attestation. Its start is never cosigned (the witnesses already cosigned the other
    branch), so it has no evidence that verifies; its gate keeps it from granting at all, and here
    the gate is switched off to show the upstream refuses its grants on its own."""
    w, ws, ev = witnessed
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    catch_up(w, ws, w.core)
    copy_log, copy_cps = list(w.log), list(w.checkpoints)
    honest = w.new_core()
    w.persist(honest.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    honest.load_policy(w.sign_bundle(1))
    catch_up(w, ws, honest)  # the witnesses follow the honest branch
    w.log, w.checkpoints = copy_log, copy_cps
    shadow_index = len(w.log)  # where the shadow's key entry goes
    shadow = w.new_core()
    w.persist(shadow.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    w.persist(shadow.load_policy(w.sign_bundle(1))[2])
    cosigned = ws.cosign(w.log, shadow.sync(len(w.log)).checkpoint.note)  # the witnesses refuse: no lines
    shadow._gate = None  # the test's stand-in for an enclave that grants unwitnessed
    guard = witnessed_guard(w, ws)
    refused(guard, params(w, shadow, evidence(w.log, cosigned, shadow_index)), "unwitnessed", "cosigned by 0")
    # Nor does the first enclave's (valid) evidence carry the shadow's grant.
    refused(guard, params(w, shadow, ev), "unwitnessed", "not the attested enclave's grant key")
