"""The mock NSM: AWS's byte format, AWS's chain shape, and the same verifier as real documents."""

from __future__ import annotations

import base64
import random
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from cloister.dev.mock_nsm import DEFAULT_MODULE_ID, MockNsm
from cloister.enclave.nsm import Nsm, NsmError
from cloister.verify.attestation import (
    DOCUMENT_TIME,
    AttestationError,
    AttestationPolicy,
    MalformedAttestation,
    TrustRoot,
    verify_attestation,
)
from cloister.verify.errors import DecodeError, VerificationError
from tests.world import EPOCH

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "nitro"
PROD = "evervault_cage_cert_san_2023-01-18_nondebug_pcr8.b64"
DEBUG = "evervault_ga_2023-09-18_debug.b64"
PCR0 = bytes.fromhex("ab" * 48)


def load(name: str) -> bytes:
    return base64.b64decode((FIXTURES / name).read_text())


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture
def mock(tmp_path: Path) -> MockNsm:
    return MockNsm(tmp_path / "mock-nsm", {0: PCR0}, clock=Clock(EPOCH))


def mock_root(m: MockNsm) -> TrustRoot:
    return TrustRoot.from_pem(m.root_path.read_bytes())


# --- byte format ------------------------------------------------------------------------------


def heads(data: bytes) -> list[tuple[int, int, int]]:
    """(depth, major type, additional info) of every CBOR data item, in order: the encoding's shape."""
    out: list[tuple[int, int, int]] = []

    def item(i: int, depth: int) -> int:
        major, ai = data[i] >> 5, data[i] & 0x1F
        out.append((depth, major, ai))
        size = {24: 1, 25: 2, 26: 4, 27: 8}.get(ai, 0)
        arg = ai if ai < 24 else int.from_bytes(data[i + 1 : i + 1 + size], "big")
        i += 1 + size
        if major in (2, 3):
            return i + arg
        if major in (4, 5):
            for _ in range(arg * (2 if major == 5 else 1)):
                i = item(i, depth + 1)
        if major == 6:
            i = item(i, depth + 1)
        return i

    assert item(0, 0) == len(data)
    return out


def by_field(payload: bytes) -> dict[str, list[tuple[int, int, int]]]:
    """The shape of each top-level field of a payload map: the key's head, then the value's heads."""
    keys = list(cbor2.loads(payload))
    chunks: list[list[tuple[int, int, int]]] = []
    for h in heads(payload)[1:]:
        if h[0] == 1:
            chunks.append([])
        chunks[-1].append(h)
    return {key: chunks[2 * i] + chunks[2 * i + 1] for i, key in enumerate(keys)}


@pytest.mark.parametrize(("name", "user_data_len"), [(PROD, 120), (DEBUG, 91)])
def test_document_structure_matches_real_documents(mock: MockNsm, name: str, user_data_len: int) -> None:
    real = load(name)
    # Same presence pattern as the real document: public_key null, user_data and a 256-byte nonce.
    ours = mock.attestation(user_data=b"u" * user_data_len, nonce=b"n" * 256)
    assert ours[:8] == real[:8] == bytes.fromhex("8444a1013822a059")
    real_cose, our_cose = cbor2.loads(real), cbor2.loads(ours)
    assert our_cose[0] == real_cose[0] == b"\xa1\x01\x38\x22"
    assert our_cose[1] == real_cose[1] == {}
    assert len(our_cose[3]) == len(real_cose[3]) == 96
    assert ours[-98:-96] == real[-98:-96] == b"\x58\x60"
    assert heads(ours)[:5] == heads(real)[:5]

    real_payload, our_payload = real_cose[2], our_cose[2]
    rp, op = cbor2.loads(real_payload), cbor2.loads(our_payload)
    assert list(op) == list(rp) == [
        "module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce",
    ]  # fmt: skip
    # Field by field: the CBOR major type and length encoding of every item, nested ones included.
    ours_by_field, real_by_field = by_field(our_payload), by_field(real_payload)
    assert list(ours_by_field) == list(real_by_field)
    for key, shape in real_by_field.items():
        assert ours_by_field[key] == shape, key
    assert heads(our_payload) == heads(real_payload)
    assert sorted(op["pcrs"]) == sorted(rp["pcrs"]) == list(range(16))
    assert {len(v) for v in op["pcrs"].values()} == {48}
    assert len(op["cabundle"]) == len(rp["cabundle"]) == 4
    assert op["public_key"] is None and rp["public_key"] is None
    assert op["digest"] == "SHA384"


def test_absent_fields_are_cbor_null(mock: MockNsm) -> None:
    payload = cbor2.loads(mock.attestation())[2]
    tail = payload[payload.index(cbor2.dumps("public_key")) :]
    assert (
        tail
        == cbor2.dumps("public_key") + b"\xf6" + cbor2.dumps("user_data") + b"\xf6" + cbor2.dumps("nonce") + b"\xf6"
    )


def _ext_shape(cert: x509.Certificate) -> dict[str, Any]:
    shape: dict[str, Any] = {}
    for ext in cert.extensions:
        if ext.oid == ExtensionOID.CRL_DISTRIBUTION_POINTS:
            continue  # AWS's point at S3 CRLs; the mock has no CRL to point at
        value: Any = ext.critical
        if isinstance(ext.value, x509.BasicConstraints):
            value = (ext.critical, ext.value.ca, ext.value.path_length)
        if isinstance(ext.value, x509.KeyUsage):
            ku = ext.value
            value = (ext.critical, ku.digital_signature, ku.content_commitment, ku.key_cert_sign, ku.crl_sign)
        shape[ext.oid.dotted_string] = value
    return shape


def test_chain_is_shaped_like_aws(mock: MockNsm) -> None:
    rp, op = cbor2.loads(cbor2.loads(load(PROD))[2]), cbor2.loads(cbor2.loads(mock.attestation())[2])
    real = [x509.load_der_x509_certificate(d) for d in [*rp["cabundle"], rp["certificate"]]]
    ours = [x509.load_der_x509_certificate(d) for d in [*op["cabundle"], op["certificate"]]]
    assert [_ext_shape(c) for c in ours] == [_ext_shape(c) for c in real]
    for c in ours:
        assert c.signature_hash_algorithm is not None and c.signature_hash_algorithm.name == "sha384"
        assert c.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert ours[0].subject == ours[0].issuer  # self-signed root
    leaf = ours[-1]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=3, seconds=10)


# --- the same verifier, only the anchor differs -----------------------------------------------


def test_mock_documents_verify_with_the_mock_root(mock: MockNsm) -> None:
    raw = mock.attestation(nonce=b"n1")
    policy = AttestationPolicy(root=mock_root(mock), at=DOCUMENT_TIME, expected_pcrs={0: PCR0}, nonce=b"n1")
    doc = verify_attestation(raw, policy)
    assert doc.module_id == DEFAULT_MODULE_ID
    assert doc.pcrs[0] == PCR0 and doc.pcrs[1] == bytes(48) and sorted(doc.pcrs) == list(range(16))
    now = EPOCH + timedelta(seconds=30)  # the test world's time, not the wall clock
    verify_attestation(raw, AttestationPolicy(root=mock_root(mock), at=now, now=now, max_age=timedelta(minutes=1)))


def test_mock_and_real_roots_do_not_mix(mock: MockNsm) -> None:
    raw = mock.attestation()
    with pytest.raises(AttestationError) as info:
        verify_attestation(raw, AttestationPolicy(root=TrustRoot.aws(), at=DOCUMENT_TIME))
    assert info.value.reason == "wrong-root"
    with pytest.raises(AttestationError) as info:
        verify_attestation(load(PROD), AttestationPolicy(root=mock_root(mock), at=DOCUMENT_TIME))
    assert info.value.reason == "wrong-root"


def test_bound_fields_round_trip(mock: MockNsm) -> None:
    root = TrustRoot.from_pem(mock.root_pem())
    big = {"user_data": b"u" * 1024, "nonce": b"n" * 1024, "public_key": b"p" * 1024}
    policy = AttestationPolicy(
        root=root, at=DOCUMENT_TIME, user_data=big["user_data"], nonce=big["nonce"], public_key=big["public_key"]
    )
    doc = verify_attestation(mock.attestation(**big), policy)
    assert (doc.user_data, doc.nonce, doc.public_key) == (big["user_data"], big["nonce"], big["public_key"])
    doc = verify_attestation(mock.attestation(), AttestationPolicy(root=root, at=DOCUMENT_TIME))
    assert (doc.user_data, doc.nonce, doc.public_key) == (None, None, None)
    empty = verify_attestation(mock.attestation(nonce=b""), AttestationPolicy(root=root, at=DOCUMENT_TIME, nonce=b""))
    assert empty.nonce == b""
    with pytest.raises(AttestationError) as info:
        verify_attestation(mock.attestation(nonce=b"a"), AttestationPolicy(root=root, at=DOCUMENT_TIME, nonce=b"b"))
    assert info.value.reason == "nonce-mismatch"
    with pytest.raises(NsmError) as err:
        mock.attestation(user_data=b"u" * 1025)
    assert err.value.code == "InputTooLarge"


def test_debug_mode_when_pcr0_is_zero(tmp_path: Path) -> None:
    m = MockNsm(tmp_path, {}, clock=Clock(EPOCH))
    raw = m.attestation()
    with pytest.raises(AttestationError) as info:
        verify_attestation(raw, AttestationPolicy(root=mock_root(m), at=DOCUMENT_TIME))
    assert info.value.reason == "debug-mode"
    verify_attestation(raw, AttestationPolicy(root=mock_root(m), at=DOCUMENT_TIME, allow_debug=True))


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_mock_document_mutants_are_rejected(mock: MockNsm) -> None:
    raw = mock.attestation(nonce=b"n" * 32)
    root = mock_root(mock)
    rng = random.Random(7)
    for pos in rng.sample(range(len(raw)), 150):
        m = bytearray(raw)
        m[pos] ^= rng.randrange(1, 256)
        with pytest.raises((DecodeError, VerificationError)):
            verify_attestation(bytes(m), AttestationPolicy(root=root, at=DOCUMENT_TIME))


# --- state, reissue, PCR operations -----------------------------------------------------------


def test_root_persists_across_instances(tmp_path: Path) -> None:
    a = MockNsm(tmp_path, {0: PCR0}, clock=Clock(EPOCH))
    raw = a.attestation()
    b = MockNsm(tmp_path, {0: PCR0}, clock=Clock(EPOCH))
    assert b.root_pem() == a.root_pem() == (tmp_path / "root.pem").read_bytes()
    root = TrustRoot.from_pem(b.root_pem())
    verify_attestation(raw, AttestationPolicy(root=root, at=DOCUMENT_TIME))
    verify_attestation(b.attestation(), AttestationPolicy(root=root, at=DOCUMENT_TIME))
    assert stat.S_IMODE((tmp_path / "root-key.pem").stat().st_mode) == 0o600


def test_half_a_root_is_an_error(tmp_path: Path) -> None:
    MockNsm(tmp_path, {}, clock=Clock(EPOCH)).root_pem()
    (tmp_path / "root-key.pem").unlink()
    with pytest.raises(NsmError, match="only half"):
        MockNsm(tmp_path, {}, clock=Clock(EPOCH)).attestation()


def test_leaf_is_reissued_near_expiry(tmp_path: Path) -> None:
    clock = Clock(datetime(2030, 1, 1, 12, tzinfo=UTC))
    m = MockNsm(tmp_path, {0: PCR0}, clock=clock)
    root = TrustRoot.from_pem(m.root_pem())
    first = m.attestation()
    clock.t += timedelta(hours=2)
    second = m.attestation()  # 1 h left on the leaf: still the same one
    clock.t += timedelta(minutes=40)
    third = m.attestation()  # 20 min left: reissued
    leaf = [cbor2.loads(cbor2.loads(d)[2])["certificate"] for d in (first, second, third)]
    assert leaf[0] == leaf[1] != leaf[2]
    for d in (first, second, third):
        verify_attestation(d, AttestationPolicy(root=root, at=DOCUMENT_TIME))
    with pytest.raises(AttestationError) as info:
        verify_attestation(first, AttestationPolicy(root=root, at=clock.t + timedelta(hours=1)))
    assert info.value.reason == "expired-certificate"
    verify_attestation(third, AttestationPolicy(root=root, at=clock.t + timedelta(hours=2)))
    bundle = cbor2.loads(cbor2.loads(third)[2])["cabundle"]
    clock.t += timedelta(days=2)  # past the instance CA's day: the intermediates are reissued too
    later = m.attestation()
    assert cbor2.loads(cbor2.loads(later)[2])["cabundle"][1:] != bundle[1:]
    verify_attestation(later, AttestationPolicy(root=root, at=DOCUMENT_TIME))


def test_pcr_operations(mock: MockNsm) -> None:
    import hashlib

    nsm: Nsm = mock
    assert nsm.describe_pcr(0) == PCR0
    assert nsm.describe_pcr(16) == bytes(48)
    with pytest.raises(NsmError) as info:
        nsm.extend_pcr(0, b"x")
    assert info.value.code == "ReadOnlyIndex"
    new = nsm.extend_pcr(16, b"data")
    assert new == hashlib.sha384(bytes(48) + b"data").digest() == nsm.describe_pcr(16)
    nsm.lock_pcr(16)
    with pytest.raises(NsmError):
        nsm.extend_pcr(16, b"more")
    desc = nsm.describe()
    assert desc.locked_pcrs == frozenset(range(17)) and desc.max_pcrs == 32 and desc.digest == "SHA384"
    assert desc.module_id == DEFAULT_MODULE_ID
    doc = verify_attestation(nsm.attestation(), AttestationPolicy(root=mock_root(mock), at=DOCUMENT_TIME))
    assert doc.pcrs[16] == new  # locked PCRs appear in documents, as on real hardware
    with pytest.raises(NsmError) as info:
        nsm.describe_pcr(32)
    assert info.value.code == "InvalidIndex"
    assert len(nsm.get_random(100)) == 100


def test_constructor_validates_pcrs(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MockNsm(tmp_path, {0: b"short"})
    with pytest.raises(ValueError):
        MockNsm(tmp_path, {32: bytes(48)})


def test_concurrent_use(mock: MockNsm) -> None:
    docs: list[bytes] = []

    def work() -> None:
        docs.append(mock.attestation(nonce=b"t"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    root = mock_root(mock)
    leaves = {cbor2.loads(cbor2.loads(d)[2])["certificate"] for d in docs}
    assert len(docs) == 4 and len(leaves) == 1
    for d in docs:
        verify_attestation(d, AttestationPolicy(root=root, at=DOCUMENT_TIME, nonce=b"t"))


def test_malformed_is_a_decode_error() -> None:
    assert issubclass(MalformedAttestation, DecodeError)
