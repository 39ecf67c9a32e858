"""`cloister audit replay` and signed outcomes (decision 0017): outcomes of attested servers whose
signature is missing or invalid are problems; every recorded signature is verified again with the
key the log introduced, so a log that says "verified" for a bad signature (or names a key no
server entry introduced) is caught too."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.audit.render import replay_json
from cloister.audit.replay import ReplayResult, replay_tree
from cloister.audit.source import SourceSpec
from cloister.verify.entries import OutcomeEntry, encode_entry, parse_entry
from cloister.verify.response_sig import sign_response
from tests.audit.logbuilder import write_tiles
from tests.enclave.test_resume import material
from tests.enclave.test_servers import ENTITIES, POLICIES
from tests.enclave.test_signed_outcomes import RESULT_HASH, allow, attest, outcome, raw
from tests.world import World, make_world


@pytest.fixture
def w(tmp_path: Path) -> World:
    w = make_world(tmp_path / "world")
    files = {"entities.toml": ENTITIES, "limits.toml": "", "policies/refunds.cedar": POLICIES}
    w.persist(w.core.load_policy(w.sign_bundle(2, {**files, "policies/research.cedar": None}))[2])
    return w


def replay(w: World, tmp: Path, entries: list[bytes] | None = None, **kw: object) -> ReplayResult:
    entries = w.log if entries is None else entries
    write_tiles(tmp / "log", entries, w.checkpoints[-1])
    return replay_tree(SourceSpec(str(tmp / "log")), len(entries), **kw)  # type: ignore[arg-type]


def problems(result: ReplayResult) -> list[str]:
    return [str(p) for p in result.problems]


def test_genuine_signed_outcomes_replay_clean_and_are_rechecked(w: World, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    for _ in range(3):
        index, nonce = allow(w)
        assert outcome(w, index, sign_response(key, nonce, RESULT_HASH)).response == "verified"
    result = replay(w, tmp_path)
    assert problems(result) == []
    assert result.summary.responses["verified"] == 3 and result.summary.signatures_checked == 3
    counts = replay_json(result, checkpoint_root=b"", rate=None)["response_signatures"]
    assert counts["missing"] == counts["invalid"] == 0 and counts["rechecked"] == 3


def test_missing_and_invalid_signatures_are_problems(w: World, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    index, nonce = allow(w)
    outcome(w, index, b"")  # the host stripped it, or answered itself
    missing_at = len(w.log) - 1
    index, nonce = allow(w)
    outcome(w, index, sign_response(ed25519.Ed25519PrivateKey.generate(), nonce, RESULT_HASH))  # forged
    invalid_at = len(w.log) - 1
    index, _ = allow(w)
    outcome(w, index, b"", None)  # no result: nothing to sign, not a problem
    result = replay(w, tmp_path)
    found = problems(result)
    assert len(found) == 2, found
    assert found[0].startswith(f"entry {missing_at}:") and "is missing" in found[0]
    assert found[1].startswith(f"entry {invalid_at}:") and "is invalid" in found[1]
    counts = json.loads(json.dumps(replay_json(result, checkpoint_root=b"", rate=None)))["response_signatures"]
    assert (counts["missing"], counts["invalid"], counts["by_status"]["no-result"]) == (1, 1, 1)
    # The invalid one was re-verified too (and is invalid again: no contradiction).
    assert result.summary.signatures_checked == 1


def _tampered(w: World, at: int, **change: object) -> list[bytes]:
    entries = list(w.log)
    e = parse_entry(entries[at])
    assert isinstance(e, OutcomeEntry)
    entries[at] = encode_entry(dataclasses.replace(e, **change))  # type: ignore[arg-type]
    return entries


def test_a_log_that_says_verified_for_a_bad_signature_is_caught(w: World, tmp_path: Path) -> None:
    """Whoever wrote it (a bug in an enclave, or storage edited before the checkpoint is checked),
    the replay does not take "verified" on trust."""
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    index, nonce = allow(w)
    outcome(w, index, sign_response(key, nonce, RESULT_HASH))
    at = len(w.log) - 1
    other = sign_response(key, b"\x00" * 16, RESULT_HASH)
    found = problems(replay(w, tmp_path, _tampered(w, at, response_sig=other)))
    assert any(p.startswith(f"entry {at}:") and "does not verify" in p for p in found), found
    # A key that no server entry introduced, with a signature it made: verifies, but is not the server's.
    rogue = ed25519.Ed25519PrivateKey.generate()
    entries = _tampered(w, at, response_key=raw(rogue), response_sig=sign_response(rogue, nonce, RESULT_HASH))
    found = problems(replay(w, tmp_path / "2", entries))
    assert any(p.startswith(f"entry {at}:") and "no verified nitro server entry" in p for p in found), found
    # An "invalid" that verifies: the log contradicts itself.
    found = problems(replay(w, tmp_path / "3", _tampered(w, at, response="invalid")))
    assert any("recorded invalid, but it verifies" in p for p in found), found


def test_an_unchecked_signature_is_checked_with_the_key_the_log_introduced(w: World, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    good, good_nonce = allow(w)
    bad, _ = allow(w)
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    fresh = w.new_core()
    w.persist(fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    files = {"entities.toml": ENTITIES, "limits.toml": "", "policies/refunds.cedar": POLICIES}
    w.persist(fresh.load_policy(w.sign_bundle(3, {**files, "policies/research.cedar": None}))[2])
    assert outcome(w, good, sign_response(key, good_nonce, RESULT_HASH), core=fresh).response == "unchecked"
    assert outcome(w, bad, sign_response(key, good_nonce, RESULT_HASH), core=fresh).response == "unchecked"
    result = replay(w, tmp_path)
    found = problems(result)
    assert len(found) == 1 and f"entry {len(w.log) - 1}:" in found[0] and "does not verify" in found[0], found
    assert result.summary.signatures_checked == 2


def test_a_decision_in_an_earlier_chunk_is_checked_by_the_main_process(w: World, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    calls = [allow(w) for _ in range(300)]  # all decisions first: outcomes land in later bundles
    first, _ = calls[0]
    outcome(w, first, sign_response(key, calls[1][1], RESULT_HASH))  # another call's signature
    first_outcome = len(w.log) - 1
    for index, nonce in calls[1:]:
        outcome(w, index, sign_response(key, nonce, RESULT_HASH))
    assert first < 256 <= first_outcome
    result = replay(w, tmp_path, chunk_bundles=1)
    found = problems(result)
    assert len(found) == 1 and found[0].startswith(f"entry {first_outcome}:") and "is invalid" in found[0], found
    assert result.summary.signatures_checked == 300
    # The same log with the enclave's verdict rewritten to "verified": the main process catches it.
    entries = _tampered(w, first_outcome, response="verified")
    found = problems(replay(w, tmp_path / "2", entries, chunk_bundles=1))
    assert len(found) == 1 and "(recorded verified) does not verify" in found[0], found


def test_signed_outcomes_that_differ_only_in_their_signature_share_a_template(w: World) -> None:
    from cloister.audit.templates import RESPONSE_PROBLEM, RESPONSE_SIGNED, TemplateCache

    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    for _ in range(24):  # decision indexes of 24 and up are slots (smaller ones are their own head byte)
        allow(w)
    made = []
    for _ in range(2):
        index, nonce = allow(w)
        outcome(w, index, sign_response(key, nonce, RESULT_HASH))
        made.append(w.log[-1])
    cache = TemplateCache()
    entry = parse_entry(made[0])
    assert isinstance(entry, OutcomeEntry)
    template = cache.learn(made[0], entry)
    assert template is not None and template.response_flags == RESPONSE_SIGNED
    assert cache.match(made[1]) is not None  # another decision index, duration, time and signature
    missing = dataclasses.replace(entry, response="missing", response_sig=None, response_key=None)
    t = cache.learn(encode_entry(missing), missing)
    assert t is not None and t.response_flags == RESPONSE_PROBLEM


def test_rechecking_can_be_skipped_but_statuses_are_always_judged(w: World, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    index, nonce = allow(w)
    outcome(w, index, sign_response(key, nonce, RESULT_HASH))
    at = len(w.log) - 1
    index, _ = allow(w)
    outcome(w, index, b"")
    entries = _tampered(w, at, response_sig=sign_response(key, b"\x00" * 16, RESULT_HASH))
    fast = replay(w, tmp_path, entries, recheck_signatures=False)
    assert fast.summary.signatures_checked == 0 and len(fast.problems) == 1 and "is missing" in str(fast.problems[0])
    full = replay(w, tmp_path / "2", entries)
    assert full.summary.signatures_checked == 1 and len(full.problems) == 2


def test_a_server_that_bound_no_key_is_reported_once_per_outcome(w: World, tmp_path: Path) -> None:
    attest(w, None)  # verified identity, no response key
    index, nonce = allow(w)
    e = outcome(w, index, sign_response(ed25519.Ed25519PrivateKey.generate(), nonce, RESULT_HASH))
    assert e.response == "invalid" and e.response_key is None
    found = problems(replay(w, tmp_path))
    assert len(found) == 1 and "is invalid" in found[0], found
