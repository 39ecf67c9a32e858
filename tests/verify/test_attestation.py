"""AWS Nitro attestation verification against real documents, crafted chains and mutants."""

from __future__ import annotations

import base64
import dataclasses
import random
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from cloister.verify.attestation import (
    AWS_ROOT_G1_SHA256,
    DOCUMENT_TIME,
    AttestationDocument,
    AttestationError,
    AttestationPolicy,
    MalformedAttestation,
    TrustRoot,
    verify_attestation,
)
from cloister.verify.cose import encode_cose_sign1
from cloister.verify.errors import DecodeError, VerificationError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "nitro"
PROD = "evervault_cage_cert_san_2023-01-18_nondebug_pcr8.b64"
DEBUG = "evervault_ga_2023-09-18_debug.b64"
NEGATIVE = "blocky_nitrite_selfsigned_NEGATIVE.b64"
PROD_PCRS = {
    0: "d265a83faa7b4fa0d73b82b6d06253e894445922937d0ee5a74fe4891da9817611a71e71b98e5329232902de3cf419af",
    1: "bcdf05fefccaa8e55bf2c8d6dee9e79bbff31e34bf28a99aa19e6b29c37ee80b214a414b7607236edf26fcb78654e63f",
    2: "e4f634d24ad83b7f6e49fe283bafdb220f6252fb4a278a858e19d15b7cd0f263b9168ed0bacefb4444266df9f9a77f24",
    8: "97c5395a83c0d6a04d53ff962663c714c178c24500bf97f78456ed3721d922cf3f940614da4bb90107c439bc4a1443ca",
}
AWS = TrustRoot.aws()
AS_ISSUED = AttestationPolicy(root=AWS, at=DOCUMENT_TIME)  # a document checked as of its own timestamp


def load(name: str) -> bytes:
    return base64.b64decode((FIXTURES / name).read_text())


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises((MalformedAttestation, AttestationError)) as info:
        call()
    assert isinstance(info.value, (MalformedAttestation, AttestationError))
    reason: str = info.value.reason
    return reason


def resign_payload(doc: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Re-encode a real document with an edited payload (the signature no longer matches)."""
    cose = cbor2.loads(doc)
    payload = cbor2.loads(cose[2])
    edit(payload)
    cose[2] = cbor2.dumps(payload)
    return bytes(cbor2.dumps(cose))


# --- real documents ---------------------------------------------------------------------------


def test_production_document_verifies_at_its_own_time() -> None:
    doc = verify_attestation(load(PROD), AS_ISSUED)
    assert isinstance(doc, AttestationDocument)
    assert doc.module_id == "i-0ec0e572c8263d8ff-enc0185c4fd382eeb25"
    assert doc.digest == "SHA384"
    assert doc.timestamp_ms == 1674047239280
    assert doc.timestamp == datetime(2023, 1, 18, 13, 7, 19, 280000, tzinfo=UTC)
    assert sorted(doc.pcrs) == list(range(16))
    assert all(len(v) == 48 for v in doc.pcrs.values())
    assert {i: doc.pcrs[i].hex() for i in PROD_PCRS} == PROD_PCRS
    assert len(doc.cabundle) == 4 and doc.cabundle[0] == AWS.der
    assert doc.public_key is None
    assert doc.user_data is not None and len(doc.user_data) == 120
    assert doc.nonce is not None and len(doc.nonce) == 256


def test_production_document_matches_expected_pcrs() -> None:
    expected = {i: bytes.fromhex(h) for i, h in PROD_PCRS.items()}
    verify_attestation(load(PROD), replace(AS_ISSUED, expected_pcrs=expected))
    wrong = dict(expected)
    wrong[2] = bytes([expected[2][0] ^ 1]) + expected[2][1:]
    assert reason_of(lambda: verify_attestation(load(PROD), replace(AS_ISSUED, expected_pcrs=wrong))) == (
        "pcr-mismatch"
    )
    absent = {20: bytes(48)}
    assert reason_of(lambda: verify_attestation(load(PROD), replace(AS_ISSUED, expected_pcrs=absent))) == (
        "pcr-mismatch"
    )


def test_debug_document_needs_allow_debug() -> None:
    doc = verify_attestation(load(DEBUG), replace(AS_ISSUED, allow_debug=True))
    assert doc.timestamp == datetime(2023, 9, 18, 15, 3, 30, 860000, tzinfo=UTC)
    assert not any(doc.pcrs[0]) and any(doc.pcrs[3])
    assert reason_of(lambda: verify_attestation(load(DEBUG), AS_ISSUED)) == "debug-mode"


@pytest.mark.parametrize("name", [PROD, DEBUG])
def test_real_documents_expire_three_hours_later(name: str) -> None:
    doc = verify_attestation(load(name), replace(AS_ISSUED, allow_debug=True))
    verify_attestation(load(name), AttestationPolicy(root=AWS, at=doc.timestamp, allow_debug=True))  # explicit datetime
    later = doc.timestamp + timedelta(hours=3)
    with pytest.raises(AttestationError) as info:
        verify_attestation(load(name), AttestationPolicy(root=AWS, at=later, allow_debug=True))
    assert info.value.reason == "expired-certificate"
    assert "certificate expired" in str(info.value)  # the leaf goes first


def test_before_the_chain_was_issued() -> None:
    early = datetime(2020, 1, 1, tzinfo=UTC)
    policy = AttestationPolicy(root=AWS, at=early)
    assert reason_of(lambda: verify_attestation(load(PROD), policy)) == "certificate-not-yet-valid"


def test_tagged_form_is_accepted() -> None:
    tagged = b"\xd2" + load(PROD)  # tag 18 around the same array
    verify_attestation(tagged, AS_ISSUED)


def test_negative_blocky_document_is_rejected() -> None:
    with pytest.raises(MalformedAttestation) as info:
        verify_attestation(load(NEGATIVE), AS_ISSUED)
    assert info.value.reason == "malformed"
    assert "unprotected header [1] is null" in str(info.value)
    # Past that first defect it still fails: cabundle null, then a self-signed leaf and 8-byte PCRs.
    cose = cbor2.loads(load(NEGATIVE))
    cose[1] = {}
    with pytest.raises(MalformedAttestation, match="cabundle"):
        verify_attestation(cbor2.dumps(cose), AS_ISSUED)


def test_real_document_fails_against_another_root() -> None:
    other = TrustRoot.from_pem(_make_chain([_Spec()])[0].cert.public_bytes(Encoding.PEM))
    assert reason_of(lambda: verify_attestation(load(PROD), replace(AS_ISSUED, root=other))) == "wrong-root"


def test_bound_fields() -> None:
    raw = load(PROD)
    doc = verify_attestation(raw, AS_ISSUED)
    assert doc.nonce is not None and doc.user_data is not None
    verify_attestation(raw, replace(AS_ISSUED, nonce=doc.nonce, user_data=doc.user_data))
    assert reason_of(lambda: verify_attestation(raw, replace(AS_ISSUED, nonce=b"x" * 256))) == ("nonce-mismatch")
    assert reason_of(lambda: verify_attestation(raw, replace(AS_ISSUED, user_data=b"x"))) == ("user-data-mismatch")
    assert reason_of(lambda: verify_attestation(raw, replace(AS_ISSUED, public_key=b"k"))) == ("public-key-mismatch")


def test_freshness_relative_to_callers_now() -> None:
    raw = load(PROD)
    ts = verify_attestation(raw, AS_ISSUED).timestamp
    five = timedelta(minutes=5)
    verify_attestation(raw, replace(AS_ISSUED, now=ts + timedelta(minutes=1), max_age=five))
    # `now` defaults to `at`:
    verify_attestation(raw, AttestationPolicy(root=AWS, at=ts + timedelta(minutes=1), max_age=five))
    stale = ts + timedelta(minutes=10)
    assert reason_of(lambda: verify_attestation(raw, replace(AS_ISSUED, now=stale, max_age=five))) == "stale"
    early = ts - timedelta(minutes=10)
    assert reason_of(lambda: verify_attestation(raw, replace(AS_ISSUED, now=early, max_age=five))) == (
        "future-timestamp"
    )


def test_programming_errors_are_not_verification_errors() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        AttestationPolicy(root=AWS, at=datetime(2023, 1, 18, 14))
    with pytest.raises(ValueError, match="timezone-aware"):
        AttestationPolicy(root=AWS, at=DOCUMENT_TIME, now=datetime(2023, 1, 18, 14))
    with pytest.raises(ValueError, match="needs `now`"):
        replace(AS_ISSUED, max_age=timedelta(minutes=1))
    with pytest.raises(ValueError, match="DOCUMENT_TIME"):
        AttestationPolicy(root=AWS, at="now")  # type: ignore[arg-type]


def test_the_policy_names_its_time_and_is_immutable() -> None:
    # No default time: the caller says when the certificates must be valid.
    with pytest.raises(TypeError):
        AttestationPolicy(root=AWS)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        AttestationPolicy(AWS, DOCUMENT_TIME)  # type: ignore[call-arg]  # keyword-only
    with pytest.raises(TypeError):
        verify_attestation(load(PROD), root=AWS, at=DOCUMENT_TIME)  # type: ignore[call-arg]  # the old interface
    pcrs = {i: bytes.fromhex(v) for i, v in PROD_PCRS.items()}
    policy = replace(AS_ISSUED, expected_pcrs=pcrs)
    pcrs[0] = bytes(48)  # the caller's dict changes later: the policy does not
    assert verify_attestation(load(PROD), policy).pcrs[0] == policy.expected_pcrs[0] != bytes(48)
    with pytest.raises(TypeError):
        policy.expected_pcrs[0] = bytes(48)  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.allow_debug = True  # type: ignore[misc]
    assert AS_ISSUED.expected_pcrs == {} and not AS_ISSUED.allow_debug and AS_ISSUED.nonce is None


def test_returned_document_is_immutable() -> None:
    doc = verify_attestation(load(PROD), AS_ISSUED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        doc.nonce = b""  # type: ignore[misc]
    with pytest.raises(TypeError):
        doc.pcrs[0] = b""  # type: ignore[index]


# --- trust roots -----------------------------------------------------------------------------


def test_aws_root_is_pinned() -> None:
    assert AWS.sha256 == AWS_ROOT_G1_SHA256
    assert AWS.name == "AWS Nitro Enclaves Root-G1"
    pem = (FIXTURES / "aws_nitro_enclaves_root_g1.pem").read_bytes()
    assert TrustRoot.from_pem(pem).der == AWS.der


@pytest.mark.parametrize("pem", [b"", b"not a pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_trust_root_rejects_non_pem(pem: bytes) -> None:
    with pytest.raises(DecodeError):
        TrustRoot.from_pem(pem)


def test_trust_root_wants_exactly_one_certificate() -> None:
    pem = (FIXTURES / "aws_nitro_enclaves_root_g1.pem").read_bytes()
    with pytest.raises(DecodeError, match="exactly one"):
        TrustRoot.from_pem(pem + pem)


# --- decoding and type checks ----------------------------------------------------------------


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(p: dict[str, Any]) -> None:
        p[key] = value

    return edit


def _pcr(index: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(p: dict[str, Any]) -> None:
        p["pcrs"][index] = value

    return edit


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(p: dict[str, Any]) -> None:
        del p[key]

    return edit


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_set("module_id", ""), "module_id"),
        (_set("module_id", b"bytes"), "module_id"),
        (_set("digest", "SHA256"), "digest"),
        (_set("timestamp", -1), "timestamp"),
        (_set("timestamp", True), "timestamp"),
        (_set("timestamp", 1.5), "timestamp"),
        (_set("timestamp", 1 << 64), "timestamp"),
        (_set("pcrs", {}), "pcrs"),
        (_set("pcrs", [b"\x00" * 48]), "pcrs"),
        (_set("pcrs", {i: b"\x00" * 48 for i in range(33)}), "pcrs"),
        (_pcr(32, b"\x00" * 48), "pcrs key 32"),
        (_pcr(-1, b"\x00" * 48), "pcrs key -1"),
        (_pcr("0", b"\x00" * 48), "pcrs key '0'"),
        (_pcr(3, b"\x00" * 47), "pcrs[3]"),
        (_pcr(3, "00" * 48), "pcrs[3]"),
        (_set("certificate", b""), "certificate must be"),
        (_set("certificate", b"\x30" * 1025), "certificate must be"),
        (_set("certificate", b"\x30\x03\x02\x01\x01"), "certificate is not a DER"),
        (_set("cabundle", []), "cabundle must be"),
        (_set("cabundle", None), "cabundle must be"),
        (_set("cabundle", [b"\x30"] * 9), "cabundle must be"),
        (_set("cabundle", ["text"]), "cabundle[0]"),
        (_set("public_key", "text"), "public_key"),
        (_set("user_data", b"u" * 1025), "user_data"),
        (_set("nonce", 7), "nonce"),
        (_set("extra", 1), "unknown fields"),
        (_drop("pcrs"), "lacks fields ['pcrs']"),
    ],
)
def test_payload_type_checks(edit: Callable[[dict[str, Any]], None], fragment: str) -> None:
    doc = resign_payload(load(PROD), edit)
    with pytest.raises(MalformedAttestation) as info:
        verify_attestation(doc, AS_ISSUED)
    assert fragment in str(info.value)


def test_optional_fields_may_be_absent() -> None:
    """AWS's CDDL marks them optional: absence parses (and here fails only the signature)."""
    doc = resign_payload(load(PROD), _drop("public_key"))
    assert reason_of(lambda: verify_attestation(doc, AS_ISSUED)) == "bad-signature"


def test_envelope_checks() -> None:
    raw = load(PROD)
    cose = cbor2.loads(raw)

    def variant(i: int, value: Any) -> bytes:
        c = list(cose)
        c[i] = value
        return bytes(cbor2.dumps(c))

    assert reason_of(lambda: verify_attestation(variant(0, b"\xa1\x01\x26"), AS_ISSUED)) == ("unsupported-algorithm")
    assert reason_of(lambda: verify_attestation(variant(0, b"\xa2\x01\x38\x22\x04\x00"), AS_ISSUED)) == (
        "unsupported-algorithm"
    )
    # {1: -35} with a non-minimal integer: same map, other bytes.
    nonminimal = variant(0, b"\xa1\x01\x39\x00\x22")
    assert reason_of(lambda: verify_attestation(nonminimal, AS_ISSUED)) == "malformed"
    assert reason_of(lambda: verify_attestation(variant(3, cose[3][:95]), AS_ISSUED)) == "malformed"
    assert reason_of(lambda: verify_attestation(variant(2, cbor2.dumps([1])), AS_ISSUED)) == ("malformed")


def test_oversize_document() -> None:
    doc = resign_payload(load(PROD), _set("padding", b"\x00" * 20000))
    with pytest.raises(MalformedAttestation, match="exceeds the limit"):
        verify_attestation(doc, AS_ISSUED)


def test_unprotected_header_is_not_signed() -> None:
    """A different unprotected map does not change the signed bytes (RFC 9052 §4.4)."""
    cose = cbor2.loads(load(PROD))
    cose[1] = {4: b"kid"}
    verify_attestation(cbor2.dumps(cose), AS_ISSUED)


def qemu_document(*, alg: int = -1) -> bytes:
    """The shape QEMU's virtio-nsm emits: alg -1, zero-filled certificate, cabundle and signature."""
    payload = {
        "module_id": "i-1234-enc5678",
        "digest": "SHA384",
        "timestamp": 1_700_000_000_000,
        "pcrs": {i: bytes(48) for i in range(16)},
        "certificate": bytes(64),
        "cabundle": [bytes(64)],
        "public_key": None,
        "user_data": None,
        "nonce": None,
    }
    return bytes(cbor2.dumps([cbor2.dumps({1: alg}), {}, cbor2.dumps(payload), bytes(64)]))


def test_qemu_unsigned_document_is_rejected() -> None:
    with pytest.raises(AttestationError) as info:
        verify_attestation(qemu_document(), replace(AS_ISSUED, allow_debug=True))
    assert info.value.reason == "unsigned-qemu"
    assert "QEMU" in str(info.value)


def test_zero_filled_certificate_is_rejected_even_with_es384_header() -> None:
    cose = cbor2.loads(qemu_document(alg=-35))
    cose[3] = bytes(96)
    doc = cbor2.dumps(cose)
    assert reason_of(lambda: verify_attestation(doc, replace(AS_ISSUED, allow_debug=True))) == ("unsigned-qemu")


# --- mutants ---------------------------------------------------------------------------------


def _regions(raw: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of every part of a real document, found by locating the parts' encodings."""
    cose = cbor2.loads(raw)
    payload: bytes = cose[2]
    p = cbor2.loads(payload)
    base = raw.index(payload)
    regions = {"cose-header": (0, base), "signature": (len(raw) - 96, len(raw))}
    keys = list(p)
    for key, nxt in zip(keys, [*keys[1:], None], strict=True):
        start = base + payload.index(cbor2.dumps(key))
        end = base + payload.index(cbor2.dumps(nxt)) if nxt is not None else base + len(payload)
        regions[f"field:{key}"] = (start, end)
    for i, der in enumerate(p["cabundle"]):
        start = raw.index(der)
        regions[f"cabundle[{i}]"] = (start, start + len(der))
    start = raw.index(p["certificate"])
    regions["leaf"] = (start, start + len(p["certificate"]))
    return regions


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_mutants_of_a_real_document_are_all_rejected() -> None:
    raw = load(PROD)
    rng = random.Random(20230118)
    regions = _regions(raw)
    assert len(regions) == 2 + 9 + 4 + 1
    mutants: list[tuple[str, bytes]] = []
    for name, (start, end) in regions.items():
        for _ in range(24):
            pos = rng.randrange(start, end)
            m = bytearray(raw)
            m[pos] ^= rng.choice([0x01, 0x80, 0xFF, rng.randrange(1, 256)])
            mutants.append((f"{name}@{pos}", bytes(m)))
    for cut in rng.sample(range(len(raw)), 20):
        mutants.append((f"truncated@{cut}", raw[:cut]))
    mutants.append(("appended", raw + b"\x00"))
    reasons: set[str] = set()
    for label, mutant in mutants:
        try:
            verify_attestation(mutant, AS_ISSUED)
        except (DecodeError, VerificationError) as exc:
            reasons.add(getattr(exc, "reason", "?"))
        else:
            pytest.fail(f"mutant {label} was accepted")
    assert {"malformed", "bad-signature", "wrong-root", "bad-chain"} <= reasons


# --- crafted chains: the certificate checks of step 3 -----------------------------------------


@dataclasses.dataclass
class _Spec:
    ca: bool | None = True  # None: no basicConstraints at all
    path_length: int | None = None
    cert_sign: bool = True
    digital_signature: bool = True
    curve: ec.EllipticCurve = dataclasses.field(default_factory=ec.SECP384R1)
    hash_alg: hashes.SHA256 | hashes.SHA384 | hashes.SHA512 = dataclasses.field(default_factory=hashes.SHA384)
    extra_critical: bool = False
    signed_by_stranger: bool = False


@dataclasses.dataclass
class _Made:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)


def _make_chain(specs: list[_Spec]) -> list[_Made]:
    made: list[_Made] = []
    for i, spec in enumerate(specs):
        key = ec.generate_private_key(spec.curve)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test-{i}")])
        issuer = made[-1] if made else None
        signer = issuer.key if issuer else key
        if spec.signed_by_stranger:
            signer = ec.generate_private_key(ec.SECP384R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.cert.subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(hours=1))
            .not_valid_after(NOW + timedelta(hours=3))
        )
        if spec.ca is not None:
            b = b.add_extension(x509.BasicConstraints(ca=spec.ca, path_length=spec.path_length), critical=True)
        ku = x509.KeyUsage(spec.digital_signature, False, False, False, False, spec.cert_sign, False, False, False)
        b = b.add_extension(ku, critical=True)
        if spec.extra_critical:
            b = b.add_extension(x509.OCSPNoCheck(), critical=True)
        made.append(_Made(b.sign(signer, spec.hash_alg), key))
    return made


def _doc_for(chain: list[_Made]) -> tuple[bytes, TrustRoot]:
    leaf = chain[-1]
    payload = {
        "module_id": "i-test",
        "digest": "SHA384",
        "timestamp": int(NOW.timestamp() * 1000),
        "pcrs": {0: b"\x01" * 48},
        "certificate": leaf.cert.public_bytes(Encoding.DER),
        "cabundle": [c.cert.public_bytes(Encoding.DER) for c in chain[:-1]],
        "public_key": None,
        "user_data": None,
        "nonce": None,
    }

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(leaf.key.sign(data, ec.ECDSA(hashes.SHA384())))
        return r.to_bytes(48, "big") + s.to_bytes(48, "big")

    doc = encode_cose_sign1({1: -35}, {}, cbor2.dumps(payload), sign, tagged=False)
    return doc, TrustRoot.from_pem(chain[0].cert.public_bytes(Encoding.PEM))


def _leaf(**kw: Any) -> _Spec:
    return _Spec(ca=False, cert_sign=False, **kw)


def test_crafted_good_chain_verifies() -> None:
    doc, root = _doc_for(_make_chain([_Spec(), _Spec(path_length=1), _Spec(path_length=0), _leaf()]))
    verify_attestation(doc, AttestationPolicy(root=root, at=NOW))


@pytest.mark.parametrize(
    ("specs", "reason", "fragment"),
    [
        ([_Spec(), _Spec(ca=False), _leaf()], "ca-constraints", "cabundle[1] is not a CA"),
        ([_Spec(), _Spec(ca=None), _leaf()], "ca-constraints", "cabundle[1] is not a CA"),
        ([_Spec(), _Spec(path_length=0), _Spec(path_length=0), _leaf()], "ca-constraints", "pathLen 0 < 1"),
        ([_Spec(path_length=0), _Spec(), _leaf()], "ca-constraints", "cabundle[0] pathLen 0"),
        ([_Spec(), _Spec(cert_sign=False), _leaf()], "ca-constraints", "keyCertSign"),
        ([_Spec(), _leaf(digital_signature=False)], "ca-constraints", "digitalSignature"),
        ([_Spec(), _Spec(ca=True)], "ca-constraints", "is a CA"),
        ([_Spec(), _Spec(extra_critical=True), _leaf()], "unsupported-critical-extension", "1.3.6.1.5.5.7.48.1.5"),
        ([_Spec(), _Spec(curve=ec.SECP256R1()), _leaf()], "bad-chain", "not ECDSA P-384"),
        ([_Spec(), _Spec(hash_alg=hashes.SHA256()), _leaf()], "bad-chain", "ecdsa-with-SHA384"),
        ([_Spec(), _Spec(signed_by_stranger=True), _leaf()], "bad-chain", "cabundle[1] is not issued by cabundle[0]"),
        ([_Spec(), _leaf(signed_by_stranger=True)], "bad-chain", "certificate is not issued by"),
    ],
)
def test_crafted_chain_rejections(specs: list[_Spec], reason: str, fragment: str) -> None:
    doc, root = _doc_for(_make_chain(specs))
    with pytest.raises(AttestationError) as info:
        verify_attestation(doc, AttestationPolicy(root=root, at=NOW))
    assert info.value.reason == reason
    assert fragment in str(info.value)


def test_crafted_chain_bad_document_signature() -> None:
    chain = _make_chain([_Spec(), _leaf()])
    doc, root = _doc_for(chain)
    cose = cbor2.loads(doc)
    cose[3] = bytes([cose[3][0] ^ 1]) + cose[3][1:]
    policy = AttestationPolicy(root=root, at=NOW)
    assert reason_of(lambda: verify_attestation(cbor2.dumps(cose), policy)) == "bad-signature"


@pytest.mark.parametrize("first_byte", [0x80, 0x00])
@pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")
def test_a_certificate_with_a_non_positive_serial_is_refused(first_byte: int) -> None:
    # The boundary fuzzer made such certificates: cryptography parses a negative or zero serial with
    # only a deprecation warning (an exception "in a future release", which the parser's catch-all
    # turns into `malformed` too); RFC 5280 §4.1.2.2 says positive, and the verifier checks it.
    def negative(payload: dict[str, Any]) -> None:
        der = bytearray(payload["certificate"])
        serial = x509.load_der_x509_certificate(bytes(der)).serial_number
        raw = serial.to_bytes((serial.bit_length() + 8) // 8, "big")
        at = bytes(der).index(raw)  # the serial's content octets, first in tbsCertificate
        der[at : at + len(raw)] = bytes([first_byte]) + bytes(len(raw) - 1)
        payload["certificate"] = bytes(der)

    reason = reason_of(lambda: verify_attestation(resign_payload(load(PROD), negative), AS_ISSUED))
    assert reason == "malformed"
