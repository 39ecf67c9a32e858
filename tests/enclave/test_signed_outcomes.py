"""Outcomes of attested upstreams carry the server's response signature, checked in the enclave
(docs/decisions/0017-signed-outcomes.md): what a host that serves a call itself, strips, forges or
replays a signature gets recorded; every outcome is logged whatever its signature."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.enclave.core import EnclaveCore
from cloister.verify.entries import OutcomeEntry, ServerEntry, parse_entry
from cloister.verify.errors import VerificationError
from cloister.verify.grant import read_grant
from cloister.verify.response_sig import UpstreamBinding, result_sha256, sign_response
from tests.enclave.test_resume import material
from tests.enclave.test_servers import ARTIFACT, ENTITIES, POLICIES, UPSTREAM_PCR0, report
from tests.world import World, make_world

RESULT = {"content": [{"type": "text", "text": "refund re_0001 succeeded"}], "isError": False}
RESULT_HASH = result_sha256(RESULT)


def raw(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.fixture
def w(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    files = {"entities.toml": ENTITIES, "limits.toml": "", "policies/refunds.cedar": POLICIES}
    w.persist(w.core.load_policy(w.sign_bundle(2, {**files, "policies/research.cedar": None}))[2])
    return w


def attest(w: World, key: ed25519.Ed25519PrivateKey | None, core: EnclaveCore | None = None) -> ServerEntry:
    """The refunds server proves its identity (binding `key`, or no key) to the enclave."""
    core = core or w.core
    nonce, kind = core.server_challenge("refunds")
    assert kind == "nitro"
    user_data = UpstreamBinding(raw(key)).encode() if key is not None else None
    doc = w.mock_nsm({0: UPSTREAM_PCR0}).attestation(nonce=nonce, user_data=user_data)
    rep, a = core.report_server(
        server="refunds",
        attestation=doc,
        artifact=b"",
        certificates=[],
        tools_json=b"",
        failure="",
        evidence=True,
        persisted_size=len(w.log),
    )
    w.persist(a)
    assert rep.status == "verified", rep.detail
    entries = [e for e in (parse_entry(d) for d in a.entries) if isinstance(e, ServerEntry)]
    return entries[-1] if entries else ServerEntry(time_ms=0, server="", kind="", status="", detail="")


def allow(
    w: World, server: str = "refunds", tool: str = "customer_lookup", core: EnclaveCore | None = None
) -> tuple[int, bytes]:
    """An allowed call: its decision index and grant nonce."""
    v = (core or w.core).authorize(
        token=w.token("refund-bot", ["refund-agent"]),
        server=server,
        tool=tool,
        arguments_json=b"{}",
        request_id="",
        persisted_size=len(w.log),
    )
    w.persist(v.log)
    assert v.allowed, v.reason
    return v.log_index, read_grant(v.grant).nonce


def outcome(
    w: World, index: int, sig: bytes, result_hash: bytes | None = RESULT_HASH, core: EnclaveCore | None = None
) -> OutcomeEntry:
    a = (core or w.core).record_outcome(
        decision_index=index,
        result_sha256=result_hash,
        error="" if result_hash else "upstream timed out after 30s",
        duration_us=100,
        paid_amount="",
        persisted_size=len(w.log),
        response_sig=sig,
    )
    w.persist(a)
    entry = parse_entry(a.entries[0])
    assert isinstance(entry, OutcomeEntry) and entry.decision_index == index
    return entry


def test_the_attested_key_is_logged_with_the_identity(w: World) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    entry = attest(w, key)
    assert entry.kind == "nitro" and entry.response_key == raw(key) and raw(key).hex() in entry.detail
    # The same server, proven again with the same key: a refresh, no entry. A new key (the server
    # restarted) is a change, logged before outcomes are checked against it.
    assert attest(w, key).server == ""
    new = ed25519.Ed25519PrivateKey.generate()
    assert attest(w, new).response_key == raw(new)


def test_a_genuine_signed_result_is_verified(w: World) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    index, nonce = allow(w)
    e = outcome(w, index, sign_response(key, nonce, RESULT_HASH))
    assert e.response == "verified" and e.response_key == raw(key) and e.result_sha256 == RESULT_HASH
    assert e.response_sig == sign_response(key, nonce, RESULT_HASH)


def test_a_host_that_serves_the_call_itself_cannot_sign_it(w: World) -> None:
    """The host got "nitro verified" by forwarding only the attestation challenge, then answered
    the call itself: without the server's key, its signature is refused; without one, it is missing."""
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    host_key = ed25519.Ed25519PrivateKey.generate()
    index, nonce = allow(w)
    forged = outcome(w, index, sign_response(host_key, nonce, RESULT_HASH))
    assert forged.response == "invalid" and forged.response_sig is not None and forged.response_key == raw(key)
    index, _ = allow(w)
    assert outcome(w, index, b"").response == "missing"
    index, _ = allow(w)
    malformed = outcome(w, index, b"not a signature")
    assert malformed.response == "invalid" and malformed.response_sig is None


def test_a_changed_result_fails_the_genuine_signature(w: World) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    index, nonce = allow(w)
    changed = result_sha256({**RESULT, "isError": True})
    assert outcome(w, index, sign_response(key, nonce, RESULT_HASH), changed).response == "invalid"


def test_a_signature_for_another_nonce_or_replayed_from_another_call_is_invalid(w: World) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    first, nonce1 = allow(w)
    replayed = sign_response(key, nonce1, RESULT_HASH)
    assert outcome(w, first, replayed).response == "verified"
    # The same answer to a second call: the host replays the first call's genuine signature.
    second, _ = allow(w)
    assert outcome(w, second, replayed).response == "invalid"
    third, _ = allow(w)
    assert outcome(w, third, sign_response(key, b"\x00" * 16, RESULT_HASH)).response == "invalid"


def test_no_result_and_servers_that_bind_no_key(w: World) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    index, nonce = allow(w)
    e = outcome(w, index, sign_response(key, nonce, RESULT_HASH), None)
    assert e.response == "no-result" and e.response_sig is None and e.response_key is None
    # A nitro server whose attestation binds no key: verified (identity), but nothing it or
    # anyone sends can verify as its response.
    entry = attest(w, None)
    assert entry.response_key is None and "no response key bound" in entry.detail
    index, nonce = allow(w)
    assert outcome(w, index, sign_response(key, nonce, RESULT_HASH)).response == "invalid"
    index, _ = allow(w)
    assert outcome(w, index, b"").response == "missing"


def test_servers_without_a_nitro_identity_need_no_signature(w: World) -> None:
    w.core.server_challenge("research")
    status, _, _ = report(w, "research", artifact=ARTIFACT)
    assert status == "verified"
    index, nonce = allow(w, "research", "db_write")
    e = outcome(w, index, sign_response(ed25519.Ed25519PrivateKey.generate(), nonce, RESULT_HASH))
    assert e.response == "not-required" and e.response_sig is None


def test_a_bad_signature_never_blocks_the_outcome_nor_reopens_it(w: World) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    index, _ = allow(w)
    assert outcome(w, index, b"\xff" * 10_000).response == "invalid"  # bounded, recorded, logged
    with pytest.raises(VerificationError, match="not an open allowed decision"):
        outcome(w, index, b"")


def test_a_decision_reopened_after_a_restart_is_checked_once_the_server_proves_its_key(w: World) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    attest(w, key)
    before, nonce_before = allow(w)
    pending, nonce_pending = allow(w)
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    fresh = w.new_core()
    w.persist(fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    files = {"entities.toml": ENTITIES, "limits.toml": "", "policies/refunds.cedar": POLICIES}
    w.persist(fresh.load_policy(w.sign_bundle(3, {**files, "policies/research.cedar": None}))[2])
    # The new enclave has not seen the server's attestation yet: the signature is recorded unchecked
    # (an auditor checks it against the key the log introduced).
    e = outcome(w, before, sign_response(key, nonce_before, RESULT_HASH), core=fresh)
    assert e.response == "unchecked" and e.response_sig is not None and e.response_key is None
    attest(w, key, core=fresh)
    e = outcome(w, pending, sign_response(key, nonce_pending, RESULT_HASH), core=fresh)
    assert e.response == "verified" and e.response_key == raw(key)
