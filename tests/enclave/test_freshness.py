"""Witnessed continuation (decision 0015): the enclave grants only on a log its pinned witnesses
keep up with, so a host cannot roll the log back, fork it, or run a shadow enclave on a copy.

In process, with the real witness logic (`cloister.witness.protocol.Witness`, the code
`cloister witness serve` runs) on real state directories; tests/e2e/test_rollback.py does the
same with real processes and sockets.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloister.enclave.core import EnclaveCore
from cloister.enclave.freshness import Unwitnessed
from cloister.verify.checkpoint import parse_checkpoint
from cloister.verify.cosignature import Ed25519Cosigner
from cloister.verify.errors import VerificationError
from cloister.verify.merkle import consistency_proof
from cloister.verify.note import Ed25519NoteVerifier, Note, NoteSignature, format_note, parse_note
from cloister.witness.protocol import Witness
from cloister.witness.state import WitnessState, init_state
from tests.enclave.test_resume import material, node_source, spend
from tests.world import ORIGIN, World, make_world


class Witnesses:
    """Two witnesses on real state directories, following the world's log (quorum 2)."""

    def __init__(self, root: Path, count: int = 2) -> None:
        self.cosigners = [init_state(root / f"w{i}", f"witness.test/w{i}") for i in range(count)]
        self.dirs = [root / f"w{i}" for i in range(count)]
        self.witnesses: list[Witness] = []
        self.sizes: list[int] = [0] * count  # what the "relay" believes each witness cosigned

    def config(self, **extra: object) -> str:
        lines = f"witnesses = {json.dumps([c.vkey for c in self.cosigners])}\n"
        return lines + "".join(f"{k} = {v}\n" for k, v in extra.items())

    def open(self, log_vkey: str) -> None:
        verifier = Ed25519NoteVerifier.from_vkey(log_vkey)
        self.witnesses = [
            Witness(WitnessState.open(d, [ORIGIN]), {ORIGIN: [verifier]}, clock=lambda: 1_800_000_000)
            for d in self.dirs
        ]

    def cosign(self, log: Sequence[bytes], note: bytes, only: Sequence[int] | None = None) -> bytes:
        """Submit `note` (a checkpoint of `log`) as the relay does; the note with the cosignatures got."""
        size = parse_checkpoint(parse_note(note).text).size
        nodes = node_source(list(log[:size]))
        lines: list[bytes] = []
        for i, witness in enumerate(self.witnesses):
            if only is not None and i not in only:
                continue
            reply = witness.add_checkpoint(_body(self.sizes[i], size, nodes, note))
            if reply.status == 409:  # adopt the witness's size and retry once, like the relay
                self.sizes[i] = int(reply.body)
                reply = witness.add_checkpoint(_body(self.sizes[i], size, nodes, note))
            if reply.status == 200:
                self.sizes[i] = size
                lines.append(reply.body.rstrip(b"\n") + b"\n")
        return note + b"".join(lines)


def _body(old: int, size: int, nodes, note: bytes) -> bytes:  # type: ignore[no-untyped-def]
    old = min(old, size)
    proof = consistency_proof(old, size, nodes) if 0 < old < size else []
    return b"old %d\n" % old + b"".join(base64.b64encode(h) + b"\n" for h in proof) + b"\n" + note


def witnessed_world(tmp: Path, **settings: object) -> tuple[World, Witnesses]:
    ws = Witnesses(tmp / "witnesses")
    w = make_world(tmp / "world", witnessing=ws.config(**settings))
    ws.open(w.core.note_signer.vkey)
    return w, ws


def catch_up(w: World, ws: Witnesses, core: EnclaveCore) -> None:
    """One relay round: the newest checkpoint to the witnesses, their cosignatures to the enclave."""
    note = core.sync(len(w.log)).checkpoint.note
    core.add_cosignatures(ws.cosign(w.log, note))


def test_nothing_is_granted_before_the_witnesses_cosign_the_start(tmp_path: Path) -> None:
    w, ws = witnessed_world(tmp_path)
    with pytest.raises(Unwitnessed, match="have not cosigned this enclave's start"):
        spend(w, w.core, 1)
    assert len(w.log) == 2  # the refusal wrote nothing: key entry and policy entry only
    status = w.core.witness_status()
    assert status is not None and status.required and not status.granting and status.start_size == 1
    catch_up(w, ws, w.core)
    assert spend(w, w.core, 1)
    status = w.core.witness_status()
    assert status is not None and status.granting and status.witnessed_size == 2


def test_a_quorum_is_required_and_forged_cosignatures_are_refused(tmp_path: Path) -> None:
    w, ws = witnessed_world(tmp_path)
    note = w.core.sync(len(w.log)).checkpoint.note
    one = ws.cosign(w.log, note, only=[0])
    with pytest.raises(VerificationError, match="cosigned by 1 of the 2 witnesses required"):
        w.core.add_cosignatures(one)
    # A line under the second witness's name and key id, with a signature it never made.
    stranger = Ed25519Cosigner(ws.cosigners[1].name, Ed25519PrivateKey.generate())
    forged = stranger.cosign(parse_note(note).text, 1_800_000_000)
    fake = NoteSignature(ws.cosigners[1].name, ws.cosigners[1].key_id, forged.signature)
    parsed = parse_note(one)
    with pytest.raises(VerificationError):
        w.core.add_cosignatures(format_note(Note(parsed.text, (*parsed.signatures, fake))))
    with pytest.raises(Unwitnessed):
        spend(w, w.core, 1)


def test_a_cosigned_checkpoint_of_another_run_does_not_count(tmp_path: Path) -> None:
    """The same sealed log key signed the earlier run's checkpoints; cosignatures on them say
    nothing about this run (it may be continuing an erased branch)."""
    w, ws = witnessed_world(tmp_path)
    note = w.core.sync(len(w.log)).checkpoint.note
    old_cosigned = ws.cosign(w.log, note)
    w.core.add_cosignatures(old_cosigned)
    w.checkpoints.append(note)
    fresh = w.new_core()
    w.persist(fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    w.persist(fresh.load_policy(w.sign_bundle(1))[2])
    with pytest.raises(VerificationError, match="not one this enclave signed since it started"):
        fresh.add_cosignatures(old_cosigned)
    with pytest.raises(Unwitnessed):
        spend(w, fresh, 1)
    catch_up(w, ws, fresh)  # the honest restart: the witnesses see it extend what they cosigned
    assert spend(w, fresh, 1)


def test_granting_pauses_when_the_witnesses_lag_by_entries_and_resumes(tmp_path: Path) -> None:
    w, ws = witnessed_world(tmp_path, max_unwitnessed_entries=5)
    catch_up(w, ws, w.core)
    granted = 0
    with pytest.raises(Unwitnessed, match=r"5 entries ahead of its newest witnessed checkpoint \(bound 5\)"):
        while True:
            assert spend(w, w.core, 1)
            granted += 1
    assert granted == 5  # from witnessed size 2: sizes 2..6, then the bound
    catch_up(w, ws, w.core)
    assert spend(w, w.core, 1)


def test_granting_pauses_when_a_checkpoint_waits_too_long(tmp_path: Path) -> None:
    w, ws = witnessed_world(tmp_path, max_unwitnessed_s=2)
    catch_up(w, ws, w.core)
    assert spend(w, w.core, 1)
    w.clock.advance(1)
    assert spend(w, w.core, 1)
    w.clock.advance(1.5)  # the first unwitnessed checkpoint is now 2.5 s old
    with pytest.raises(Unwitnessed, match=r"waited 2\.5s for the witnesses \(bound 2s\)"):
        spend(w, w.core, 1)
    catch_up(w, ws, w.core)
    assert spend(w, w.core, 1)


def test_a_rolled_back_log_is_never_continued(tmp_path: Path) -> None:
    """The issue's attack: keep a copy of storage, spend, put the copy back, restart. The restored
    log proves out (it is validly signed), but the witnesses have seen more: the new enclave's
    start is never cosigned, so nothing is granted and the hourly cap holds."""
    w, ws = witnessed_world(tmp_path)
    catch_up(w, ws, w.core)
    for _ in range(5):
        assert spend(w, w.core, 1000)
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    catch_up(w, ws, w.core)
    copy_log, copy_cps = list(w.log), list(w.checkpoints)  # the host's copy
    for _ in range(5):
        assert spend(w, w.core, 1000)  # $10,000 of the $10,000/hour cap now spent
    catch_up(w, ws, w.core)
    assert not spend(w, w.core, 1000)
    # The host puts the copy back and starts a new enclave on it.
    w.log, w.checkpoints = copy_log, copy_cps
    fresh = w.new_core()
    w.persist(fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    w.persist(fresh.load_policy(w.sign_bundle(1))[2])
    cosigned = ws.cosign(w.log, fresh.sync(len(w.log)).checkpoint.note)
    assert parse_note(cosigned).signatures == parse_note(fresh.sync(len(w.log)).checkpoint.note).signatures
    with pytest.raises(VerificationError, match="cosigned by 0 of the 2"):
        fresh.add_cosignatures(cosigned)
    with pytest.raises(Unwitnessed):
        spend(w, fresh, 1000)
    status = fresh.witness_status()
    assert status is not None and not status.granting and status.witnessed_size == 0


def test_a_shadow_enclave_on_the_same_log_is_never_witnessed(tmp_path: Path) -> None:
    """Two enclaves of the same image resume the same stored log: both append a key entry at the
    same index, the witnesses cosign whichever comes first and refuse the fork."""
    w, ws = witnessed_world(tmp_path)
    catch_up(w, ws, w.core)
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    stored_log, stored_cps = list(w.log), list(w.checkpoints)
    a, b = w.new_core(), w.new_core()
    w.persist(a.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    log_a = list(w.log)
    w.log, w.checkpoints = list(stored_log), list(stored_cps)
    w.persist(b.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    log_b = list(w.log)
    assert log_a[:-1] == log_b[:-1] and log_a[-1] != log_b[-1]  # a fork at the same size
    a.add_cosignatures(ws.cosign(log_a, a.sync(len(log_a)).checkpoint.note))
    with pytest.raises(VerificationError, match="cosigned by 0 of the 2"):
        b.add_cosignatures(ws.cosign(log_b, b.sync(len(log_b)).checkpoint.note))
    a_status, b_status = a.witness_status(), b.witness_status()
    assert a_status is not None and a_status.witnessed_size == len(log_a)
    assert b_status is not None and b_status.witnessed_size == 0


def test_the_unsafe_mode_is_reported(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    status = w.core.witness_status()
    assert status is not None and not status.required and status.granting and "unsafe" in status.reason
    assert spend(w, w.core, 1)


def test_a_second_new_log_for_a_witnessed_origin_is_never_witnessed(tmp_path: Path) -> None:
    """The host starts an enclave on empty storage for an origin the witnesses already follow: a
    brand-new log (same origin, same sealed key) is never cosigned, so it never grants."""
    w, ws = witnessed_world(tmp_path)
    catch_up(w, ws, w.core)
    assert spend(w, w.core, 1)
    catch_up(w, ws, w.core)
    w.log, w.checkpoints = [], []
    second = w.new_core()
    w.persist(second.start_new_log())
    w.persist(second.load_policy(w.sign_bundle(1))[2])
    with pytest.raises(VerificationError, match="cosigned by 0 of the 2"):
        second.add_cosignatures(ws.cosign(w.log, second.sync(len(w.log)).checkpoint.note))
    with pytest.raises(Unwitnessed):
        spend(w, second, 1)
