"""The enclave's start-up with the sealed log key (issue 10, docs/decisions/0014): AWAITING_KEY,
the Recipient exchange against the KMS stand-in's logic (in-process), then AWAITING_LOG.

The stand-in here is `cloister.dev.kms.LocalKms` on the world's clock and mock CA: the same
GenerateDataKey / Decrypt with Recipient the relay makes over HTTP (tests/e2e/test_sealed_key.py).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from cloister.dev.kms import KmsError, LocalKms, log_key_policy
from cloister.enclave.core import EnclaveCore, KeyRefused, LogState, NotReady
from cloister.enclave.sealing import EnvelopeError, SealedKeyMismatch
from cloister.verify.attestation import TrustRoot
from cloister.verify.entries import KeyEntry, parse_entry
from tests.enclave.test_resume import material
from tests.world import World, make_world

CONTEXT = {"cloister:origin": "cloister.test/log"}


@pytest.fixture
def w(tmp_path: Path) -> World:
    return make_world(tmp_path, start=False)


def stand_in(w: World, *pcr0s: bytes) -> tuple[LocalKms, str]:
    kms = LocalKms(
        w.root / "kms",
        trust_root=TrustRoot.from_pem((w.root / "mock-nsm" / "root.pem").read_bytes()),
        clock=w.clock.datetime,
    )
    return kms, kms.create_key(log_key_policy(list(pcr0s)))


def recipient(doc: bytes) -> dict[str, str]:
    return {"AttestationDocument": base64.b64encode(doc).decode(), "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}


def first_start(core: EnclaveCore, kms: LocalKms, key_id: str) -> bytes:
    """GenerateDataKey with the core's Recipient document; opens it; returns the CiphertextBlob."""
    answer = kms.handle(
        "TrentService.GenerateDataKey",
        {
            "KeyId": key_id,
            "NumberOfBytes": 32,
            "EncryptionContext": CONTEXT,
            "Recipient": recipient(core.request_key()),
        },
    )
    assert "Plaintext" not in answer or not answer["Plaintext"]
    core.open_sealed_key(base64.b64decode(answer["CiphertextForRecipient"]), first_start=True)
    return base64.b64decode(answer["CiphertextBlob"])


def later_start(core: EnclaveCore, kms: LocalKms, blob: bytes) -> None:
    answer = kms.handle(
        "TrentService.Decrypt",
        {
            "CiphertextBlob": base64.b64encode(blob).decode(),
            "EncryptionContext": CONTEXT,
            "Recipient": recipient(core.request_key()),
        },
    )
    core.open_sealed_key(base64.b64decode(answer["CiphertextForRecipient"]), first_start=False)


def test_a_sealed_core_waits_for_its_key_and_decides_nothing(w: World) -> None:
    core = w.new_core(sealed=True)
    assert core.state is LogState.AWAITING_KEY and core.log_public == b""
    health = core.health()
    assert health["awaiting_key"] and not health["ready"] and health["log_verifier_key"] == ""
    with pytest.raises(NotReady, match="no log key"):
        core.start_new_log()
    with pytest.raises(NotReady, match="no log key"):
        core.attest(b"", include_checkpoint=False)
    with pytest.raises(KeyRefused, match="RequestKey first"):
        core.open_sealed_key(b"x", first_start=True)


def test_restart_unseals_the_same_log_key_and_resumes(w: World) -> None:
    pcr0 = w.new_core().pcrs[0]
    kms, key_id = stand_in(w, pcr0)
    core = w.new_core(sealed=True)
    blob = first_start(core, kms, key_id)
    assert core.state is LogState.AWAITING_LOG and core.health()["awaiting_key"] is False
    with pytest.raises(KeyRefused, match="already has its log key"):
        core.request_key()
    with pytest.raises(KeyRefused, match="must start one"):  # checked before anything is parsed
        core.resume_log(
            checkpoint=b"",
            range_size=0,
            range_hashes=[],
            entries=[],
            key_entry=b"",
            key_entry_index=0,
            key_entry_proof=[],
            boundary_entry=b"",
            boundary_proof=[],
        )
    w.core = core
    w.persist(core.start_new_log())
    w.persist(core.load_policy(w.sign_bundle(1))[2])

    fresh = w.new_core(sealed=True)
    later_start(fresh, kms, blob)
    assert fresh.log_public == core.log_public and fresh.grant_public != core.grant_public
    with pytest.raises(KeyRefused, match="must resume it"):
        fresh.start_new_log()
    n = len(w.log)
    w.persist(fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    intro = parse_entry(w.log[n])
    assert isinstance(intro, KeyEntry) and intro.log_key == core.log_public and intro.grant_key == fresh.grant_public
    assert fresh.note_signer.vkey == core.note_signer.vkey


def test_another_pcr0_is_refused_by_the_key_policy(w: World) -> None:
    kms, key_id = stand_in(w, bytes(48))  # a policy for some other image
    core = w.new_core(sealed=True)
    with pytest.raises(KmsError, match="AccessDenied"):
        first_start(core, kms, key_id)
    assert core.state is LogState.AWAITING_KEY


def test_a_bad_envelope_uses_up_the_recipient_key_and_installs_nothing(w: World) -> None:
    core = w.new_core(sealed=True)
    core.request_key()
    with pytest.raises(EnvelopeError):
        core.open_sealed_key(b"\x30\x00", first_start=True)
    with pytest.raises(KeyRefused, match="RequestKey first"):
        core.open_sealed_key(b"\x30\x00", first_start=True)
    assert core.state is LogState.AWAITING_KEY
    core.request_key()  # a new exchange may start


def test_a_seed_of_another_log_key_cannot_continue_the_log(w: World) -> None:
    pcr0 = w.new_core().pcrs[0]
    kms, key_id = stand_in(w, pcr0)
    w.core = w.new_core()  # the world's log, signed by the world's log key
    w.persist(w.core.start_new_log())
    other = w.new_core(sealed=True)
    first_start(other, kms, key_id)  # a new seed (say, the parent substituted one): another log key
    other._first_start = False  # the parent claims it is the stored log's seed
    with pytest.raises(SealedKeyMismatch):
        other.resume_log(**material(w, start=0))  # type: ignore[arg-type]
    assert other.state is LogState.AWAITING_LOG and other.sequencer is None


def test_the_service_maps_the_exchange_errors(w: World) -> None:
    import grpc

    from cloister.enclave.service import EnclaveService
    from cloister.wire import enclave_pb2 as pb

    class Aborted(Exception):
        pass

    class Context:
        code: grpc.StatusCode | None = None

        def abort(self, code: grpc.StatusCode, details: str) -> None:
            self.code = code
            raise Aborted(details)

    core = w.new_core(sealed=True)
    service = EnclaveService(core)
    opened = pb.OpenSealedKeyRequest(ciphertext_for_recipient=b"x", first_start=True)
    for fn, code in (
        (lambda ctx: service.OpenSealedKey(opened, ctx), grpc.StatusCode.FAILED_PRECONDITION),  # nothing pending
        (
            lambda ctx: (service.RequestKey(pb.RequestKeyRequest(), ctx), service.OpenSealedKey(opened, ctx)),
            grpc.StatusCode.INVALID_ARGUMENT,  # not an envelope
        ),
        (lambda ctx: service.StartLog(pb.StartLogRequest(), ctx), grpc.StatusCode.UNAVAILABLE),  # no key yet
    ):
        ctx = Context()
        with pytest.raises(Aborted):
            fn(ctx)
        assert ctx.code == code
