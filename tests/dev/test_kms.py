"""The local KMS stand-in and the parent's KMS calls: the Recipient exchange as AWS specifies it.

Sealing: a 32-byte seed is sealed under a KMS key whose policy lets Decrypt and GenerateDataKey
answer only a Recipient with this image's PCR0 (or a pinned predecessor's). Unsealing: the parent
calls Decrypt with the enclave's attestation document as Recipient and hands the enclave the
CiphertextForRecipient, which only the enclave's one-use RSA key opens.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.dev.kms import (
    DEFAULT_MAX_DOCUMENT_AGE,
    KeyPolicy,
    KmsError,
    KmsHttpServer,
    LocalKms,
    PolicyError,
    log_key_policy,
    make_server,
    recipient_context,
)
from cloister.dev.measure import mock_pcrs
from cloister.dev.mock_nsm import MockNsm
from cloister.enclave.sealing import (
    RecipientKey,
    derive_log_key,
    log_public_key,
    parse_envelope,
    recipient_attestation,
    unseal_log_key,
)
from cloister.relay import kms as kms_client
from cloister.verify.attestation import AttestationPolicy, TrustRoot, verify_attestation
from tests.world import Clock

ORIGIN = "cloister.test/log"
PCR0 = bytes.fromhex("a0" * 48)  # this image
PCR0_OLD = bytes.fromhex("0a" * 48)  # its pinned predecessor
PCR0_OTHER = bytes.fromhex("ee" * 48)  # some other image
SEED = bytes(range(100, 132))


class Env:
    """One test world: a clock, the mock CA, the KMS stand-in, and a key sealed to PCR0."""

    def __init__(self, root: Path, clock: Clock) -> None:
        self.root = root
        self.clock = clock
        self.nsm = self.enclave(PCR0)
        self.trust = TrustRoot.from_pem(self.nsm.root_pem())
        self.kms = LocalKms(root / "kms", trust_root=self.trust, clock=clock.datetime)
        self.key_id = self.kms.create_key(log_key_policy([PCR0, PCR0_OLD], allow_encrypt=True))

    def enclave(self, pcr0: bytes, ca: str = "mock-nsm") -> MockNsm:
        return MockNsm(self.root / ca, {0: pcr0, 1: b"\x01" * 48, 2: b"\x02" * 48}, clock=self.clock.datetime)

    def recipient(self, nsm: MockNsm | None = None) -> tuple[RecipientKey, dict[str, Any]]:
        key = RecipientKey.generate()
        document = recipient_attestation(nsm or self.nsm, key)
        return key, {"AttestationDocument": document, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}

    def seal(self, seed: bytes = SEED) -> bytes:
        blob: bytes = self.kms.encrypt(self.key_id, seed)["CiphertextBlob"]
        return blob


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path, Clock())


def denied(code: str = "AccessDeniedException") -> Any:
    return pytest.raises(KmsError, match=f"^{code}")


# --- key policies --------------------------------------------------------------------------------

IMAGE_KEY = "kms:RecipientAttestation:ImageSha384"


def policy(*statements: dict[str, Any]) -> KeyPolicy:
    return KeyPolicy.parse({"Version": "2012-10-17", "Statement": list(statements)})


def allow(action: str | list[str], condition: dict[str, Any] | None = None, effect: str = "Allow") -> dict[str, Any]:
    st: dict[str, Any] = {"Effect": effect, "Principal": {"AWS": "*"}, "Action": action, "Resource": "*"}
    if condition is not None:
        st["Condition"] = condition
    return st


def ctx(**pcrs: bytes) -> dict[str, str]:
    out = {f"kms:recipientattestation:{k.lower()}": v.hex() for k, v in pcrs.items()}
    return out


def test_policy_values_are_ored_keys_anded_and_absent_keys_fail() -> None:
    p = policy(
        allow(
            "kms:Decrypt",
            {
                "StringEqualsIgnoreCase": {
                    IMAGE_KEY: [PCR0.hex(), PCR0_OLD.hex()],
                    "kms:RecipientAttestation:PCR1": "01" * 48,
                }
            },
        )
    )
    assert p.allows("kms:Decrypt", ctx(imagesha384=PCR0, pcr1=b"\x01" * 48))
    assert p.allows("kms:Decrypt", ctx(imagesha384=PCR0_OLD, pcr1=b"\x01" * 48))
    assert not p.allows("kms:Decrypt", ctx(imagesha384=PCR0_OTHER, pcr1=b"\x01" * 48))
    assert not p.allows("kms:Decrypt", ctx(imagesha384=PCR0))  # PCR1 absent: the condition fails
    assert not p.allows("kms:Decrypt", {})  # no Recipient at all
    assert not p.allows("kms:Encrypt", ctx(imagesha384=PCR0, pcr1=b"\x01" * 48))


def test_an_explicit_deny_wins_and_wildcards_match_actions() -> None:
    p = policy(allow("kms:*"), allow("kms:Decrypt", {"StringEquals": {IMAGE_KEY: PCR0_OTHER.hex()}}, "Deny"))
    assert p.allows("kms:Decrypt", ctx(imagesha384=PCR0))
    assert not p.allows("kms:Decrypt", ctx(imagesha384=PCR0_OTHER))
    assert p.allows("kms:GenerateDataKey", {})
    assert policy(allow("kms:Generate*")).allows("kms:GenerateDataKey", {})
    assert not policy(allow("kms:Generate*")).allows("kms:Decrypt", {})


def test_string_equals_is_exact_and_the_ignore_case_operator_is_not() -> None:
    upper = PCR0.hex().upper()
    assert policy(allow("kms:Decrypt", {"StringEqualsIgnoreCase": {IMAGE_KEY: upper}})).allows(
        "kms:Decrypt", ctx(imagesha384=PCR0)
    )
    # Condition key names are case-insensitive, as in IAM.
    assert policy(allow("kms:Decrypt", {"StringEquals": {IMAGE_KEY.upper(): PCR0.hex()}})).allows(
        "kms:Decrypt", ctx(imagesha384=PCR0)
    )


@pytest.mark.parametrize(
    ("statement", "why"),
    [
        (allow("kms:Decrypt", {"StringLike": {IMAGE_KEY: "a*"}}), "operator"),
        (allow("kms:Decrypt", {"StringEqualsIfExists": {IMAGE_KEY: PCR0.hex()}}), "operator"),
        (allow("kms:Decrypt", {"StringEquals": {"aws:SourceIp": "127.0.0.1"}}), "condition key"),
        (allow("kms:Decrypt", {"StringEquals": {"kms:RecipientAttestation:PCR32": PCR0.hex()}}), "condition key"),
        (allow("kms:Decrypt", {"StringEquals": {IMAGE_KEY: "0x" + PCR0.hex()}}), "hex digest"),
        (allow("kms:Decrypt", {"StringEquals": {IMAGE_KEY: PCR0.hex().upper()}}), "never matches"),
        (allow("kms:Decrypt", {"StringEquals": {}}), "must map"),
        ({**allow("kms:Decrypt"), "NotAction": "kms:Encrypt"}, "unsupported fields"),
        ({**allow("kms:Decrypt"), "Resource": "arn:aws:kms:*"}, "Resource"),
        (allow("s3:GetObject"), "kms:<Name>"),
        (allow([]), "non-empty"),
        (allow("kms:Decrypt", effect="Maybe"), "Effect"),
    ],
)
def test_a_policy_the_stand_in_cannot_evaluate_fully_is_refused(statement: dict[str, Any], why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        policy(statement)


def test_policy_documents_are_checked_whole() -> None:
    with pytest.raises(PolicyError, match="Version"):
        KeyPolicy.parse({"Version": "2008-10-17", "Statement": [allow("kms:*")]})
    with pytest.raises(PolicyError, match="Statement"):
        KeyPolicy.parse({"Version": "2012-10-17", "Statement": []})
    with pytest.raises(PolicyError, match="fields"):
        KeyPolicy.parse({"Version": "2012-10-17", "Statement": [allow("kms:*")], "Extra": 1})


def test_image_sha384_is_pcr0_and_mock_pcr0_measures_the_tcb(env: Env) -> None:
    pcrs = mock_pcrs(b'origin = "cloister.test/log"\n')
    nsm = MockNsm(env.root / "mock-nsm", pcrs, clock=env.clock.datetime)
    key, recipient = env.recipient(nsm)
    doc = verify_attestation(
        recipient["AttestationDocument"], AttestationPolicy(root=env.trust, at=env.clock.datetime())
    )
    context = recipient_context(doc)
    assert context["kms:recipientattestation:imagesha384"] == pcrs[0].hex() == context["kms:recipientattestation:pcr0"]
    # A key sealed to the measured image opens for it.
    key_id = env.kms.create_key(log_key_policy([pcrs[0]], allow_encrypt=True))
    blob = env.kms.encrypt(key_id, SEED)["CiphertextBlob"]
    answer = env.kms.decrypt(blob, recipient=recipient)
    assert key.open(answer["CiphertextForRecipient"]) == SEED


# --- Encrypt and Decrypt -------------------------------------------------------------------------


def test_plain_decrypt_round_trips_where_the_policy_allows_it(env: Env) -> None:
    admin = env.kms.create_key({"Version": "2012-10-17", "Statement": [allow("kms:*")]})
    blob = env.kms.encrypt(admin, b"hello", encryption_context={"origin": ORIGIN})["CiphertextBlob"]
    out = env.kms.decrypt(blob, encryption_context={"origin": ORIGIN})
    assert out["Plaintext"] == b"hello"
    assert "CiphertextForRecipient" not in out
    assert out["KeyId"].endswith(admin)


def test_the_log_key_never_decrypts_without_a_recipient(env: Env) -> None:
    """Under the log key's policy the parent cannot get the seed in plaintext."""
    blob = env.seal()
    with denied():
        env.kms.decrypt(blob)
    with denied():
        env.kms.generate_data_key(env.key_id, number_of_bytes=32)


def test_ciphertext_blobs_are_authenticated_and_bound(env: Env) -> None:
    admin = env.kms.create_key({"Version": "2012-10-17", "Statement": [allow("kms:*")]})
    blob = env.kms.encrypt(admin, b"hello", encryption_context={"origin": ORIGIN})["CiphertextBlob"]
    with denied("InvalidCiphertextException"):
        env.kms.decrypt(blob, encryption_context={"origin": "elsewhere"})
    with denied("InvalidCiphertextException"):
        env.kms.decrypt(blob[:-1] + bytes([blob[-1] ^ 1]), encryption_context={"origin": ORIGIN})
    with denied("InvalidCiphertextException"):
        env.kms.decrypt(b"not a blob")
    with denied("IncorrectKeyException"):
        env.kms.decrypt(blob, key_id=env.key_id, encryption_context={"origin": ORIGIN})
    with denied("NotFoundException"):
        env.kms.encrypt("00000000-0000-0000-0000-000000000000", b"x")
    with denied("NotFoundException"):
        env.kms.encrypt("alias/nope", b"x")


def test_keys_survive_a_restart_of_the_stand_in(env: Env) -> None:
    blob = env.seal()
    again = LocalKms(env.root / "kms", trust_root=env.trust, clock=env.clock.datetime)
    key, recipient = env.recipient()
    assert key.open(again.decrypt(blob, recipient=recipient)["CiphertextForRecipient"]) == SEED
    assert (env.root / "kms" / "keys" / f"{env.key_id}.json").stat().st_mode & 0o777 == 0o600


# --- the Recipient exchange ----------------------------------------------------------------------


def test_a_recipient_gets_an_envelope_only_it_opens_and_no_plaintext(env: Env) -> None:
    blob = env.seal()
    key, recipient = env.recipient()
    out = env.kms.decrypt(blob, key_id=env.key_id, recipient=recipient)
    assert "Plaintext" not in out
    envelope = out["CiphertextForRecipient"]
    assert SEED not in envelope
    assert parse_envelope(envelope).key_identifier  # the KMS layout (tests/enclave/test_sealing.py)
    assert key.open(envelope) == SEED


def test_a_restarted_enclave_signs_with_the_same_log_key(env: Env) -> None:
    """Each start has a fresh RSA key and document; the sealed seed and so the log key are the same."""
    blob = env.seal()
    keys = []
    for _ in range(2):
        nsm = env.enclave(PCR0)  # a new enclave of the same image
        key, recipient = env.recipient(nsm)
        envelope = env.kms.decrypt(blob, recipient=recipient)["CiphertextForRecipient"]
        keys.append(unseal_log_key(key, envelope, origin=ORIGIN, expected_public=None))
        env.clock.advance(60)
    first, second = keys
    assert log_public_key(first) == log_public_key(second) == log_public_key(derive_log_key(SEED, ORIGIN))
    message = b"checkpoint"
    second.public_key().verify(first.sign(message), message)
    assert first.sign(message) == second.sign(message)  # Ed25519 is deterministic


def test_an_enclave_with_another_pcr0_cannot_unseal(env: Env) -> None:
    blob = env.seal()
    _, recipient = env.recipient(env.enclave(PCR0_OTHER))
    with denied() as info:
        env.kms.decrypt(blob, recipient=recipient)
    assert "no resource-based policy allows the kms:Decrypt action" in info.value.message


def test_a_pinned_predecessor_can_unseal(env: Env) -> None:
    blob = env.seal()
    key, recipient = env.recipient(env.enclave(PCR0_OLD))
    assert key.open(env.kms.decrypt(blob, recipient=recipient)["CiphertextForRecipient"]) == SEED


def test_a_document_from_another_root_is_refused(env: Env) -> None:
    blob = env.seal()
    _, recipient = env.recipient(env.enclave(PCR0, ca="other-ca"))
    with denied() as info:
        env.kms.decrypt(blob, recipient=recipient)
    assert "wrong-root" in info.value.message


@pytest.mark.parametrize(
    ("seconds", "reason"),
    [
        (DEFAULT_MAX_DOCUMENT_AGE.total_seconds() + 1, "stale"),
        (4 * 3600, "expired-certificate"),  # past the three-hour leaf
        (-(DEFAULT_MAX_DOCUMENT_AGE.total_seconds() + 1), "not-yet-valid"),  # a document from the future
    ],
)
def test_a_replayed_or_expired_document_is_refused(env: Env, seconds: float, reason: str) -> None:
    blob = env.seal()
    _, recipient = env.recipient()
    env.clock.advance(seconds)
    with denied() as info:
        env.kms.decrypt(blob, recipient=recipient)
    assert reason in info.value.message


def test_a_document_just_inside_the_age_limit_is_accepted(env: Env) -> None:
    blob = env.seal()
    key, recipient = env.recipient()
    env.clock.advance(DEFAULT_MAX_DOCUMENT_AGE.total_seconds() - 1)
    assert key.open(env.kms.decrypt(blob, recipient=recipient)["CiphertextForRecipient"]) == SEED


def test_a_debug_mode_document_is_refused(env: Env) -> None:
    blob = env.seal()
    _, recipient = env.recipient(env.enclave(bytes(48)))
    with denied() as info:
        env.kms.decrypt(blob, recipient=recipient)
    assert "debug-mode" in info.value.message


def _document_with_key(env: Env, public_key: bytes | None) -> dict[str, Any]:
    document = env.nsm.attestation(public_key=public_key)
    return {"AttestationDocument": document, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}


def test_recipients_that_are_not_rsa_2048_to_4096_are_refused(env: Env) -> None:
    blob = env.seal()
    ec_key = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    small_der = small.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    for public_key, why in [
        (None, "no public_key"),
        (ec_key, "RSA"),
        (small_der, "RSA"),
        (b"junk", "SubjectPublicKeyInfo"),
    ]:
        with denied("ValidationException") as info:
            env.kms.decrypt(blob, recipient=_document_with_key(env, public_key))
        assert why in info.value.message


def test_a_malformed_recipient_is_refused(env: Env) -> None:
    blob = env.seal()
    _, recipient = env.recipient()
    for bad in [
        {**recipient, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_1"},
        {"AttestationDocument": recipient["AttestationDocument"]},
        {**recipient, "AttestationDocument": b"\xd2\x84garbage"},
        {**recipient, "AttestationDocument": b""},
    ]:
        with denied("ValidationException"):
            env.kms.decrypt(blob, recipient=bad)


def test_generate_data_key_seals_a_new_seed_the_parent_never_sees(env: Env) -> None:
    key, recipient = env.recipient()
    out = env.kms.generate_data_key(env.key_id, number_of_bytes=32, recipient=recipient)
    assert "Plaintext" not in out
    seed = key.open(out["CiphertextForRecipient"])
    assert len(seed) == 32
    # The next start unseals the same seed from the stored CiphertextBlob.
    key2, recipient2 = env.recipient()
    assert key2.open(env.kms.decrypt(out["CiphertextBlob"], recipient=recipient2)["CiphertextForRecipient"]) == seed
    _, other = env.recipient(env.enclave(PCR0_OTHER))
    with denied():
        env.kms.generate_data_key(env.key_id, number_of_bytes=32, recipient=other)


def test_generate_data_key_sizes(env: Env) -> None:
    admin = env.kms.create_key({"Version": "2012-10-17", "Statement": [allow("kms:*")]})
    assert len(env.kms.generate_data_key(admin, key_spec="AES_128")["Plaintext"]) == 16
    for kwargs in [
        {},
        {"number_of_bytes": 0},
        {"number_of_bytes": 1025},
        {"key_spec": "AES_512"},
        {"number_of_bytes": 8, "key_spec": "AES_256"},
    ]:
        with denied("ValidationException"):
            env.kms.generate_data_key(admin, **kwargs)  # type: ignore[arg-type]


def test_a_policy_can_be_replaced_to_pin_a_new_image(env: Env) -> None:
    blob = env.seal()
    key, recipient = env.recipient(env.enclave(PCR0_OTHER))
    env.kms.put_key_policy(env.key_id, log_key_policy([PCR0_OTHER, PCR0]))
    assert key.open(env.kms.decrypt(blob, recipient=recipient)["CiphertextForRecipient"]) == SEED
    with denied("MalformedPolicyDocumentException"):
        env.kms.put_key_policy(env.key_id, {"Version": "2012-10-17", "Statement": [allow("kms:*", {"Bool": {}})]})


# --- the parent's helper, against fakes ------------------------------------------------------------


class FakeKms:
    def __init__(self, answer: Mapping[str, Any]) -> None:
        self.answer = answer
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def encrypt(self, **kwargs: Any) -> Mapping[str, Any]:
        self.calls.append(("encrypt", kwargs))
        return self.answer

    def decrypt(self, **kwargs: Any) -> Mapping[str, Any]:
        self.calls.append(("decrypt", kwargs))
        return self.answer

    def generate_data_key(self, **kwargs: Any) -> Mapping[str, Any]:
        self.calls.append(("generate_data_key", kwargs))
        return self.answer


def test_the_helper_sends_the_recipient_as_aws_specifies() -> None:
    fake = FakeKms({"CiphertextForRecipient": b"env", "KeyId": "k"})
    assert kms_client.decrypt_for_recipient(fake, b"blob", b"doc", key_id="k", encryption_context={"a": "b"}) == b"env"
    assert fake.calls == [
        (
            "decrypt",
            {
                "CiphertextBlob": b"blob",
                "KeyId": "k",
                "Recipient": {"AttestationDocument": b"doc", "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
                "EncryptionContext": {"a": "b"},
            },
        )
    ]


@pytest.mark.parametrize(
    "answer",
    [
        {"CiphertextForRecipient": b"env", "Plaintext": b"seed"},  # KMS ignored the Recipient
        {"Plaintext": b"seed"},
        {"KeyId": "k"},
        {"CiphertextForRecipient": "not bytes"},
    ],
)
def test_the_helper_refuses_an_answer_that_is_not_for_the_recipient(answer: dict[str, Any]) -> None:
    with pytest.raises(kms_client.KmsResponseError):
        kms_client.decrypt_for_recipient(FakeKms(answer), b"blob", b"doc")
    with pytest.raises(kms_client.KmsResponseError):
        kms_client.generate_sealed_seed(FakeKms({**answer, "CiphertextBlob": b"b"}), "k", b"doc")


def test_the_helper_accepts_an_empty_plaintext_beside_the_envelope() -> None:
    """AWS: with CiphertextForRecipient, the Plaintext field is "null or empty"."""
    fake = FakeKms({"CiphertextForRecipient": b"env", "Plaintext": b"", "CiphertextBlob": b"b", "KeyId": "arn"})
    sealed = kms_client.generate_sealed_seed(fake, "k", b"doc")
    assert sealed == kms_client.SealedSeed("arn", b"b", b"env")
    assert fake.calls[0][1]["NumberOfBytes"] == 32


# --- over HTTP, with the real boto3 client ---------------------------------------------------------


@pytest.fixture
def server(env: Env) -> Iterator[KmsHttpServer]:
    srv = make_server(env.kms)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def raw_bodies(client: kms_client.KmsApi) -> list[bytes]:
    """Record every raw HTTP response body boto3 receives from `client`."""
    bodies: list[bytes] = []

    def hook(http_response: Any, **kwargs: Any) -> None:
        bodies.append(http_response.content)

    cast(Any, client).meta.events.register("after-call.kms", hook)
    return bodies


def assert_seed_nowhere(seed: bytes, body: bytes) -> None:
    assert seed not in body
    assert seed.hex().encode() not in body
    assert base64.b64encode(seed) not in body
    payload = json.loads(body)
    assert "Plaintext" not in payload
    for value in payload.values():
        if isinstance(value, str):
            try:
                decoded = base64.b64decode(value, validate=True)
            except ValueError:
                continue
            assert seed not in decoded


def test_boto3_seals_and_unseals_over_a_real_socket(env: Env, server: KmsHttpServer) -> None:
    client = kms_client.local_kms_client(server.url)
    bodies = raw_bodies(client)
    blob = kms_client.encrypt(client, env.key_id, SEED, encryption_context={"cloister:origin": ORIGIN})
    key, recipient = env.recipient()
    envelope = kms_client.decrypt_for_recipient(
        client,
        blob,
        recipient["AttestationDocument"],
        key_id=env.key_id,
        encryption_context={"cloister:origin": ORIGIN},
    )
    log_key = unseal_log_key(key, envelope, origin=ORIGIN, expected_public=None)
    assert log_public_key(log_key) == log_public_key(derive_log_key(SEED, ORIGIN))
    decrypt_body = bodies[-1]
    assert b"CiphertextForRecipient" in decrypt_body
    assert_seed_nowhere(SEED, decrypt_body)


def test_boto3_generate_data_key_never_carries_the_seed(env: Env, server: KmsHttpServer) -> None:
    client = kms_client.local_kms_client(server.url)
    bodies = raw_bodies(client)
    key, recipient = env.recipient()
    sealed = kms_client.generate_sealed_seed(client, env.key_id, recipient["AttestationDocument"])
    seed = key.open(sealed.ciphertext_for_recipient)
    assert_seed_nowhere(seed, bodies[-1])
    key2, recipient2 = env.recipient()
    again = kms_client.decrypt_for_recipient(client, sealed.ciphertext_blob, recipient2["AttestationDocument"])
    assert key2.open(again) == seed
    assert_seed_nowhere(seed, bodies[-1])


def test_boto3_sees_access_denied_for_another_image_or_root(env: Env, server: KmsHttpServer) -> None:
    client = kms_client.local_kms_client(server.url)
    blob = env.seal()
    for nsm in (env.enclave(PCR0_OTHER), env.enclave(PCR0, ca="other-ca")):
        _, recipient = env.recipient(nsm)
        with pytest.raises(ClientError) as info:
            kms_client.decrypt_for_recipient(client, blob, recipient["AttestationDocument"])
        error = info.value.response["Error"]
        assert error["Code"] == "AccessDeniedException"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as info:
        cast(Any, client).decrypt(CiphertextBlob=blob)  # the parent asking for the plaintext itself
    assert info.value.response["Error"]["Code"] == "AccessDeniedException"


def _post(url: str, target: str, body: bytes) -> tuple[int, dict[str, Any]]:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request(
            "POST", "/", body=body, headers={"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.1"}
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_the_wire_protocol_refuses_what_kms_would(server: KmsHttpServer) -> None:
    status, body = _post(server.url, "TrentService.ScheduleKeyDeletion", b"{}")
    assert (status, body["__type"]) == (400, "UnknownOperationException")
    status, body = _post(server.url, "TrentService.Decrypt", b"{not json")
    assert (status, body["__type"]) == (400, "SerializationException")
    status, body = _post(server.url, "TrentService.Decrypt", b'{"CiphertextBlob": "@@@"}')
    assert (status, body["__type"]) == (400, "SerializationException")
    status, body = _post(server.url, "TrentService.Decrypt", b"[]")
    assert (status, body["__type"]) == (400, "SerializationException")


# --- the command line ----------------------------------------------------------------------------


def test_the_stand_in_serves_from_the_command_line(tmp_path: Path) -> None:
    """A real process on the real clock (so the mock NSM here uses the real clock too)."""
    nsm = MockNsm(tmp_path / "mock-nsm", {0: PCR0}, clock=lambda: datetime.now(UTC))
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(nsm.root_pem())
    state = tmp_path / "kms"
    cmd = [sys.executable, "-m", "cloister.dev.kms"]
    made = subprocess.run(
        [*cmd, "create-key", "--state", str(state), "--pcr0", PCR0.hex(), "--allow-encrypt"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key_id = json.loads(made.stdout)["KeyId"]
    proc = subprocess.Popen(
        [*cmd, "serve", "--state", str(state), "--port", "0", "--root", str(root_pem)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready" and ready["endpoint"].startswith("http://127.0.0.1:")
        client = kms_client.local_kms_client(ready["endpoint"])
        seed = os.urandom(32)
        blob = kms_client.encrypt(client, key_id, seed)
        key = RecipientKey.generate()
        envelope = kms_client.decrypt_for_recipient(client, blob, recipient_attestation(nsm, key))
        assert key.open(envelope) == seed
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_max_document_age_is_a_parameter(env: Env) -> None:
    strict = LocalKms(
        env.root / "kms", trust_root=env.trust, clock=env.clock.datetime, max_document_age=timedelta(seconds=10)
    )
    blob = env.seal()
    _, recipient = env.recipient()
    env.clock.advance(11)
    with denied() as info:
        strict.decrypt(blob, recipient=recipient)
    assert "stale" in info.value.message
