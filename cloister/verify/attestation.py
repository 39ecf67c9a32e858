"""AWS Nitro Enclaves attestation documents: parse and verify.

The procedure follows AWS's "Verifying the root of trust" (AWS Nitro Enclaves User Guide,
https://docs.aws.amazon.com/enclaves/latest/user/verify-root.html, section "Attestation document
validation": syntactical validation, semantic validation, certificates validity, certificates
chain, cryptographic validation), corrected by what real documents show (see
tests/fixtures/nitro/README.md): the COSE_Sign1 arrives untagged, absent optional fields are CBOR
null, user_data and nonce carry up to 1024 bytes.

The verifier never reads the clock and does not know whether its anchor is AWS's root or a mock
root: the caller passes one `AttestationPolicy` (the `TrustRoot`, the time, the expected PCRs,
nonce and bound data, whether debug mode is allowed). It returns the verified document or raises;
every rejection carries a machine-readable `reason`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from itertools import pairwise
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from cloister.verify.cose import CoseSign1, cbor_type_name, decode_cbor, parse_cose_sign1, sig_structure
from cloister.verify.errors import DecodeError, VerificationError

# AWS Nitro Enclaves Root-G1 (CN=aws.nitro-enclaves), pinned by the SHA-256 of its DER.
# (AWS publishes the SHA-256 of the zip that carries it, 8cf60e2b…, not of the certificate.)
AWS_ROOT_G1_SHA256: Final = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
_AWS_ROOT_RESOURCE: Final = "aws_nitro_root_g1.pem"

# Caps. The NSM response buffer is 0x3000 bytes; a document is smaller than that.
MAX_DOCUMENT_SIZE: Final = 16 * 1024
MAX_CERT_SIZE: Final = 1024  # AWS: certificate and each cabundle entry, length in [1, 1024]
MAX_CABUNDLE: Final = 8  # AWS: "length > 0"; real chains hold 4
MAX_BOUND_FIELD: Final = 1024  # public_key, user_data, nonce (real documents use up to 1024)
MAX_MODULE_ID: Final = 1024
MAX_PCRS: Final = 32  # AWS: pcrs map length in [1, 32], index in [0, 32)
PCR_SIZES: Final = frozenset({32, 48, 64})
_MAX_TIMESTAMP_MS: Final = 253402300799999  # 9999-12-31T23:59:59.999Z, the datetime limit

ALG_ES384: Final = -35
ALG_QEMU_UNSIGNED: Final = -1  # QEMU's nitro-enclave machine: "we don't actually sign the data"
PROTECTED_ES384: Final = bytes.fromhex("a1013822")  # {1: -35}, as real documents encode it
ES384_SIGNATURE_SIZE: Final = 96  # raw r || s, 48 bytes each
CLOCK_SKEW: Final = timedelta(minutes=5)  # tolerated for documents "from the future"

_REQUIRED: Final = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL: Final = ("public_key", "user_data", "nonce")
_UNDERSTOOD_CRITICAL: Final = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

DOCUMENT_TIME: Final = "document"
"""`AttestationPolicy.at` for an archived document: check it as of its own timestamp."""


class MalformedAttestation(DecodeError):
    """The bytes are not a well-formed attestation document (reason "malformed")."""

    reason = "malformed"

    @property
    def detail(self) -> str:
        return str(self)


class AttestationError(VerificationError):
    """A well-formed attestation document failed a check named by `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


@dataclass(frozen=True)
class TrustRoot:
    """The certificate that `cabundle[0]` must equal byte for byte."""

    der: bytes
    name: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    @classmethod
    def aws(cls) -> TrustRoot:
        """The AWS Nitro Enclaves Root-G1 shipped in this package, checked against its pin."""
        return _aws_root()

    @classmethod
    def from_pem(cls, pem: bytes, *, name: str | None = None) -> TrustRoot:
        """Exactly one PEM certificate (e.g. a mock NSM's root.pem). Raises DecodeError."""
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError as exc:
            raise DecodeError(f"trust root: not a PEM certificate: {exc}") from exc
        if len(certs) != 1:
            raise DecodeError(f"trust root: expected exactly one PEM certificate, found {len(certs)}")
        der = certs[0].public_bytes(Encoding.DER)
        return cls(der, name or f"root sha256:{hashlib.sha256(der).hexdigest()[:16]}")


@cache
def _aws_root() -> TrustRoot:
    pem = resources.files("cloister.verify").joinpath(_AWS_ROOT_RESOURCE).read_bytes()
    root = TrustRoot.from_pem(pem, name="AWS Nitro Enclaves Root-G1")
    if root.sha256 != AWS_ROOT_G1_SHA256:
        raise AttestationError(
            "bad-trust-root", f"packaged AWS root has sha256 {root.sha256}, pinned {AWS_ROOT_G1_SHA256}"
        )
    return root


@dataclass(frozen=True)
class AttestationDocument:
    """A verified attestation document (only `verify_attestation` makes these)."""

    module_id: str
    digest: str
    timestamp: datetime  # UTC
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes  # DER of the leaf that signed the document
    cabundle: tuple[bytes, ...]  # DER, [root, ..., issuer of the leaf]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None


@dataclass(frozen=True, kw_only=True)
class AttestationPolicy:
    """What a verifier accepts: one value for `verify_attestation` instead of a row of keywords.

    - `root`: the certificate `cabundle[0]` must equal byte for byte (AWS's, or a mock NSM's).
    - `at`: the time at which every certificate must be valid, a timezone-aware datetime, or
      `DOCUMENT_TIME` to check an archived document as of its own timestamp. There is no
      default: the verifier never reads the clock, the caller says when.
    - `now`, `max_age`: when `max_age` is set, the document must be at most that old relative to
      `now` (which defaults to `at` when that is a datetime) and not ahead of it by more than
      CLOCK_SKEW.
    - `expected_pcrs`: PCR index -> value the document must carry (absent PCRs fail).
    - `nonce`, `user_data`, `public_key`: when given, the document's field must equal them.
    - `allow_debug`: accept debug-mode documents (PCR0 all zero).

    Construction checks the times (ValueError), and `expected_pcrs` is copied read-only.
    """

    root: TrustRoot
    at: datetime | Literal["document"]
    now: datetime | None = None
    max_age: timedelta | None = None
    expected_pcrs: Mapping[int, bytes] = field(default_factory=lambda: MappingProxyType({}))
    nonce: bytes | None = None
    user_data: bytes | None = None
    public_key: bytes | None = None
    allow_debug: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.at, datetime) and self.at != DOCUMENT_TIME:
            raise ValueError("`at` must be a datetime or DOCUMENT_TIME")
        if isinstance(self.at, datetime) and self.at.tzinfo is None:
            raise ValueError("`at` must be timezone-aware")
        if self.now is not None and self.now.tzinfo is None:
            raise ValueError("`now` must be timezone-aware")
        if self.max_age is not None and self.now is None and not isinstance(self.at, datetime):
            raise ValueError("`max_age` with at=DOCUMENT_TIME needs `now`")
        object.__setattr__(self, "expected_pcrs", MappingProxyType(dict(self.expected_pcrs)))


def verify_attestation(data: bytes, policy: AttestationPolicy) -> AttestationDocument:
    """Verify a Nitro attestation document under `policy` and return its verified content.

    The steps are AWS's "Attestation document validation" (verify-root.html), in order:

      1. Syntactical validation: decode the COSE_Sign1 and type-check every payload field.
      2. Semantic validation: `cabundle[0]` is the pinned root, byte for byte.
      3. Certificates validity and chain: root -> ... -> leaf, each valid at `policy.at`,
         with CA constraints (RFC 5280 §6.1).
      4. Cryptographic validation: ES384 over Sig_structure (RFC 9052 §4.4) with the leaf key.
      5. PCRs: not a debug-mode document unless allowed; the expected PCRs.
      6. Nonce, user_data and public_key, when the policy names them.
      7. Age, when the policy bounds it.

    Raises MalformedAttestation (a DecodeError) or AttestationError (a VerificationError).
    """
    # Step 1 (AWS "Syntactical validation"): decode, then type-check every field.
    cose = _parse_cose(data)
    doc = _parse_payload(cose.payload)
    chain = [_parse_cert(der, f"cabundle[{i}]") for i, der in enumerate(doc.cabundle)]
    leaf = _parse_cert(doc.certificate, "certificate")
    t = policy.at if isinstance(policy.at, datetime) else doc.timestamp
    # Step 2 (AWS "Semantic validation"): cabundle is [ROOT, INTERM_1, ..., INTERM_N] and the
    # root must be the pinned one, byte for byte.
    _check_root(doc, policy.root)
    # Step 3 (AWS "Certificates validity" and "Certificates chain"): root -> ... -> leaf.
    leaf_key = _check_chain([*chain, leaf], t)
    # Step 4 (AWS "Cryptographic validation").
    _check_signature(cose, leaf_key)
    # Step 5: PCRs. Debug-mode enclaves are signed by the same PKI but PCR0 is all zero.
    _check_pcrs(doc, policy)
    # Step 6: freshness comes from the nonce; then the data the document binds.
    _check_bound_data(doc, policy)
    # Step 7: optional age bound relative to the caller's clock.
    _check_age(doc, policy, t)
    return doc


def _check_root(doc: AttestationDocument, root: TrustRoot) -> None:
    if doc.cabundle[0] != root.der:
        got = hashlib.sha256(doc.cabundle[0]).hexdigest()
        raise AttestationError(
            "wrong-root", f"cabundle[0] (sha256 {got}) is not the pinned {root.name} ({root.sha256})"
        )


def _check_signature(cose: CoseSign1, leaf_key: ec.EllipticCurvePublicKey) -> None:
    """ES384 over Sig_structure built from the protected header bytes exactly as received."""
    r = int.from_bytes(cose.signature[:48], "big")
    s = int.from_bytes(cose.signature[48:], "big")
    try:
        leaf_key.verify(
            encode_dss_signature(r, s), sig_structure(cose.protected, cose.payload), ec.ECDSA(hashes.SHA384())
        )
    except InvalidSignature as exc:
        raise AttestationError("bad-signature", "COSE_Sign1 ES384 signature does not verify with the leaf key") from exc


def _check_pcrs(doc: AttestationDocument, policy: AttestationPolicy) -> None:
    pcr0 = doc.pcrs.get(0)
    if not policy.allow_debug and (pcr0 is None or not any(pcr0)):
        raise AttestationError("debug-mode", "PCR0 is all zero (debug-mode enclave) and debug is not allowed")
    for index, want in sorted(policy.expected_pcrs.items()):
        got = doc.pcrs.get(index)
        if got != want:
            shown = "absent" if got is None else got.hex()
            raise AttestationError("pcr-mismatch", f"PCR{index} is {shown}, expected {want.hex()}")


def _check_bound_data(doc: AttestationDocument, policy: AttestationPolicy) -> None:
    if policy.nonce is not None and doc.nonce != policy.nonce:
        raise AttestationError("nonce-mismatch", "document nonce differs from the expected nonce")
    if policy.user_data is not None and doc.user_data != policy.user_data:
        raise AttestationError("user-data-mismatch", "document user_data differs from the expected value")
    if policy.public_key is not None and doc.public_key != policy.public_key:
        raise AttestationError("public-key-mismatch", "document public_key differs from the expected key")


def _check_age(doc: AttestationDocument, policy: AttestationPolicy, t: datetime) -> None:
    if policy.max_age is None:
        return
    ref = policy.now if policy.now is not None else t
    if doc.timestamp < ref - policy.max_age:
        raise AttestationError(
            "stale", f"document from {_iso(doc.timestamp)} is older than {policy.max_age} at {_iso(ref)}"
        )
    if doc.timestamp > ref + CLOCK_SKEW:
        raise AttestationError("future-timestamp", f"document from {_iso(doc.timestamp)} is ahead of {_iso(ref)}")


def _parse_cose(data: bytes) -> CoseSign1:
    try:
        cose = parse_cose_sign1(data, max_size=MAX_DOCUMENT_SIZE)
    except DecodeError as exc:
        raise MalformedAttestation(str(exc)) from exc
    # QEMU's virtio-nsm emits alg -1 with zero-filled signature and certificates.
    if cose.protected_map.get(1) == ALG_QEMU_UNSIGNED:
        raise AttestationError("unsigned-qemu", "protected header alg is -1: an unsigned QEMU nitro-enclave document")
    if cose.protected_map.get(1) != ALG_ES384 or len(cose.protected_map) != 1:
        raise AttestationError(
            "unsupported-algorithm",
            f"protected header is {dict(cose.protected_map)!r:.100}, expected {{1: -35}} (ES384)",
        )
    if cose.protected != PROTECTED_ES384:
        raise MalformedAttestation(
            f"protected header bytes {cose.protected.hex()} are not the encoding a1013822 of {{1: -35}}"
        )
    if len(cose.signature) != ES384_SIGNATURE_SIZE:
        raise MalformedAttestation(f"signature is {len(cose.signature)} bytes, expected 96 (raw r||s)")
    return cose


def _parse_payload(payload: bytes) -> AttestationDocument:
    """AWS "Syntactical validation" of the payload: the field set, then each field's type and size."""
    try:
        doc = decode_cbor(payload, what="attestation payload")
    except DecodeError as exc:
        raise MalformedAttestation(str(exc)) from exc
    if not isinstance(doc, dict):
        raise MalformedAttestation(f"payload is {cbor_type_name(doc)}, not a map")
    unknown = [k for k in doc if k not in _REQUIRED and k not in _OPTIONAL]
    if unknown:
        raise MalformedAttestation(f"payload has unknown fields {unknown!r}")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise MalformedAttestation(f"payload lacks fields {missing}")

    module_id, ts = _check_module_and_time(doc)
    pcrs = _check_pcr_map(doc["pcrs"])
    certificate, cabundle = _check_certificate_fields(doc["certificate"], doc["cabundle"])
    bound = _check_bound_fields(doc)
    if not any(certificate):
        raise AttestationError("unsigned-qemu", "certificate is zero-filled: an unsigned QEMU nitro-enclave document")

    return AttestationDocument(
        module_id=module_id,
        digest="SHA384",
        timestamp=_EPOCH + timedelta(milliseconds=ts),
        timestamp_ms=ts,
        pcrs=MappingProxyType(dict(sorted(pcrs.items()))),
        certificate=certificate,
        cabundle=tuple(cabundle),
        public_key=bound["public_key"],
        user_data=bound["user_data"],
        nonce=bound["nonce"],
    )


def _check_module_and_time(doc: dict[Any, Any]) -> tuple[str, int]:
    module_id = doc["module_id"]
    if not isinstance(module_id, str) or not 0 < len(module_id) <= MAX_MODULE_ID:
        raise MalformedAttestation("module_id must be non-empty text")
    if doc["digest"] != "SHA384":
        raise MalformedAttestation(f"digest is {doc['digest']!r}, expected 'SHA384'")
    ts = doc["timestamp"]
    if not _is_uint(ts) or not 0 < ts <= _MAX_TIMESTAMP_MS:
        raise MalformedAttestation(f"timestamp {ts!r} is not a uint of milliseconds since the epoch")
    return module_id, ts


def _check_pcr_map(pcrs: Any) -> dict[int, bytes]:
    if not isinstance(pcrs, dict) or not 0 < len(pcrs) <= MAX_PCRS:
        raise MalformedAttestation(f"pcrs must be a map of 1 to {MAX_PCRS} entries")
    for index, value in pcrs.items():
        if not _is_uint(index) or index >= MAX_PCRS:
            raise MalformedAttestation(f"pcrs key {index!r} is not an index in [0, {MAX_PCRS})")
        if not isinstance(value, bytes) or len(value) not in PCR_SIZES:
            raise MalformedAttestation(f"pcrs[{index}] must be 32, 48 or 64 bytes")
    return pcrs


def _check_certificate_fields(certificate: Any, cabundle: Any) -> tuple[bytes, list[bytes]]:
    if not isinstance(certificate, bytes) or not 0 < len(certificate) <= MAX_CERT_SIZE:
        raise MalformedAttestation(f"certificate must be 1 to {MAX_CERT_SIZE} bytes")
    if not isinstance(cabundle, list) or not 0 < len(cabundle) <= MAX_CABUNDLE:
        raise MalformedAttestation(f"cabundle must be an array of 1 to {MAX_CABUNDLE} certificates")
    for i, der in enumerate(cabundle):
        if not isinstance(der, bytes) or not 0 < len(der) <= MAX_CERT_SIZE:
            raise MalformedAttestation(f"cabundle[{i}] must be 1 to {MAX_CERT_SIZE} bytes")
    return certificate, cabundle


def _check_bound_fields(doc: dict[Any, Any]) -> dict[str, bytes | None]:
    bound: dict[str, bytes | None] = {}
    for key in _OPTIONAL:
        value = doc.get(key)
        if value is not None and (not isinstance(value, bytes) or len(value) > MAX_BOUND_FIELD):
            raise MalformedAttestation(f"{key} must be null or at most {MAX_BOUND_FIELD} bytes")
        bound[key] = value
    return bound


@dataclass(frozen=True)
class _Cert:
    der: bytes
    cert: x509.Certificate
    extensions: x509.Extensions
    key: CertificatePublicKeyTypes
    where: str


def _parse_cert(der: bytes, where: str) -> _Cert:
    try:
        cert = x509.load_der_x509_certificate(der)
        # cryptography parses these lazily; force them here so that hostile DER fails at the
        # boundary (it raises ValueError, InvalidVersion, DuplicateExtension, UnsupportedAlgorithm).
        extensions = cert.extensions
        key = cert.public_key()
    except Exception as exc:
        raise MalformedAttestation(f"{where} is not a DER X.509 certificate: {exc}") from exc
    # RFC 5280 §4.1.2.2: the serial number is a positive integer.
    if cert.serial_number <= 0:
        raise MalformedAttestation(f"{where} has a non-positive serial number")
    return _Cert(der, cert, extensions, key, where)


def _check_chain(chain: Sequence[_Cert], t: datetime) -> ec.EllipticCurvePublicKey:
    """RFC 5280 §6.1 checks on the fixed path chain[0] (root) -> ... -> chain[-1] (leaf).

    a. every certificate is valid at `t`, understood, and holds a P-384 key;
    b. the issuers are CAs with room for the path below them; the leaf is an end entity;
    c. each certificate is signed by the one before it, with ecdsa-with-SHA384.

    Returns the leaf's public key.
    """
    key: ec.EllipticCurvePublicKey | None = None
    for c in chain:
        key = _check_certificate(c, t)
    _check_ca_constraints(chain[:-1], chain[-1])
    for issuer, subject in pairwise(chain):
        _check_issued_by(subject, issuer)
    assert key is not None  # the chain is never empty: cabundle has at least one entry
    return key


def _check_certificate(c: _Cert, t: datetime) -> ec.EllipticCurvePublicKey:
    if t < c.cert.not_valid_before_utc:
        raise AttestationError(
            "certificate-not-yet-valid",
            f"{c.where} is valid from {_iso(c.cert.not_valid_before_utc)}, checked at {_iso(t)}",
        )
    if t > c.cert.not_valid_after_utc:
        raise AttestationError(
            "expired-certificate", f"{c.where} expired at {_iso(c.cert.not_valid_after_utc)}, checked at {_iso(t)}"
        )
    critical = {e.oid for e in c.extensions if e.critical} - _UNDERSTOOD_CRITICAL
    if critical:
        raise AttestationError(
            "unsupported-critical-extension",
            f"{c.where} has critical extensions {sorted(o.dotted_string for o in critical)}",
        )
    pk = c.key
    if not isinstance(pk, ec.EllipticCurvePublicKey) or not isinstance(pk.curve, ec.SECP384R1):
        raise AttestationError("bad-chain", f"{c.where} key is not ECDSA P-384")
    return pk


def _check_ca_constraints(issuers: Sequence[_Cert], leaf: _Cert) -> None:
    for depth, ca in enumerate(issuers):
        bc = _ext(ca, x509.BasicConstraints)
        if bc is None or not bc.ca:
            raise AttestationError("ca-constraints", f"{ca.where} is not a CA (basicConstraints)")
        cas_below = len(issuers) - 1 - depth  # intermediates that follow this CA in the path
        if bc.path_length is not None and bc.path_length < cas_below:
            raise AttestationError("ca-constraints", f"{ca.where} pathLen {bc.path_length} < {cas_below} CAs below it")
        ku = _ext(ca, x509.KeyUsage)
        if ku is None or not ku.key_cert_sign:
            raise AttestationError("ca-constraints", f"{ca.where} lacks keyCertSign key usage")
    leaf_bc = _ext(leaf, x509.BasicConstraints)
    if leaf_bc is not None and leaf_bc.ca:
        raise AttestationError("ca-constraints", "the signing certificate is a CA, expected an end-entity certificate")
    leaf_ku = _ext(leaf, x509.KeyUsage)
    if leaf_ku is None or not leaf_ku.digital_signature:
        raise AttestationError("ca-constraints", "the signing certificate lacks digitalSignature key usage")


def _check_issued_by(subject: _Cert, issuer: _Cert) -> None:
    if subject.cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
        raise AttestationError("bad-chain", f"{subject.where} is not signed with ecdsa-with-SHA384")
    try:
        subject.cert.verify_directly_issued_by(issuer.cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AttestationError(
            "bad-chain", f"{subject.where} is not issued by {issuer.where}: {exc or 'bad signature'}"
        ) from exc


_E = TypeVar("_E", bound=x509.ExtensionType)


def _ext(c: _Cert, kind: type[_E]) -> _E | None:
    try:
        return c.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
