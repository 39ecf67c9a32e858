"""A mock NSM for CI and laptops: AWS-format attestation documents signed by a local CA chain.

Documents are byte-for-byte in AWS's format (untagged COSE_Sign1 `84 44 a1 01 38 22 a0 59 ...`,
payload keys in AWS's order, absent fields as CBOR null, PCRs 0..15 of 48 bytes) and the chain has
AWS's shape: a self-signed P-384 root, three intermediates (pathLen 2, 1, 0) and a three-hour leaf,
with the same basicConstraints and keyUsage. `cloister.verify.attestation` therefore runs the same
code on them; only the anchor differs (`TrustRoot.from_pem(state_dir / "root.pem")`).

State under `state_dir` (the CLI looks in `$CLOISTER_STATE/mock-nsm`):
  root.pem      the mock root certificate, for auditors to pin
  root-key.pem  its private key (mode 0600), so that a restart keeps the same root
The intermediates and the leaf live in memory and are reissued when close to expiry.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import NameOID, ObjectIdentifier

from cloister.dev.files import write_atomic
from cloister.enclave.nsm import (
    NSM_REQUEST_MAX_SIZE,
    NsmDescription,
    NsmError,
    check_bound_fields,
    check_random_size,
)
from cloister.verify.cose import encode_cose_sign1

ROOT_CERT_FILE: Final = "root.pem"
ROOT_KEY_FILE: Final = "root-key.pem"
DEFAULT_MODULE_ID: Final = "i-0000000000c10157e-enc0000000000000000"  # AWS's shape, marked "c10157e"
PCR_SIZE: Final = 48  # SHA-384
MAX_PCRS: Final = 32
BOOT_LOCKED: Final = frozenset(range(16))  # PCRs 0..15 are read-only, and are what documents carry

ROOT_LIFETIME: Final = timedelta(days=30 * 365)
REGIONAL_LIFETIME: Final = timedelta(days=20)
ZONAL_LIFETIME: Final = timedelta(days=5)
INSTANCE_LIFETIME: Final = timedelta(days=1)
LEAF_LIFETIME: Final = timedelta(hours=3)
LEAF_REISSUE_MARGIN: Final = timedelta(minutes=30)  # a document stays verifiable for >= 30 min
BACKDATE: Final = timedelta(minutes=5)  # tolerate small clock differences with verifiers
_ORG: Final = (
    (NameOID.COUNTRY_NAME, "US"),
    (NameOID.ORGANIZATION_NAME, "Cloister mock"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "mock-nsm"),
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class _Chain:
    intermediates: tuple[_Ca, ...]  # regional, zonal, instance
    leaf: _Ca


class MockNsm:
    """Implements `cloister.enclave.nsm.Nsm` in software. Thread-safe."""

    def __init__(
        self,
        state_dir: Path,
        pcrs: Mapping[int, bytes],
        *,
        module_id: str = DEFAULT_MODULE_ID,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        for index, value in pcrs.items():
            if not 0 <= index < MAX_PCRS or len(value) != PCR_SIZE:
                raise ValueError(f"PCR{index}: index must be in [0, {MAX_PCRS}) and value {PCR_SIZE} bytes")
        self._state_dir = Path(state_dir)
        self._module_id = module_id
        self._clock = clock
        self._pcrs = [bytes(pcrs.get(i, bytes(PCR_SIZE))) for i in range(MAX_PCRS)]
        self._locked = set(BOOT_LOCKED)
        self._lock = threading.Lock()
        self._root: _Ca | None = None
        self._chain: _Chain | None = None

    @property
    def root_path(self) -> Path:
        return self._state_dir / ROOT_CERT_FILE

    def root_pem(self) -> bytes:
        """The mock root certificate (created on first use)."""
        with self._lock:
            return self._ensure_root().cert.public_bytes(Encoding.PEM)

    # --- the Nsm protocol ---

    def attestation(
        self, *, user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        check_bound_fields(user_data=user_data, nonce=nonce, public_key=public_key)
        with self._lock:
            now = self._clock()
            root = self._ensure_root()
            chain = self._ensure_chain(root, now)
            # Same keys, order and encodings as AWS's payload (see tests/fixtures/nitro/README.md).
            payload = {
                "module_id": self._module_id,
                "digest": "SHA384",
                "timestamp": (now - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1),
                "pcrs": {i: self._pcrs[i] for i in sorted(self._locked)},
                "certificate": chain.leaf.cert.public_bytes(Encoding.DER),
                "cabundle": [c.cert.public_bytes(Encoding.DER) for c in (root, *chain.intermediates)],
                "public_key": public_key,
                "user_data": user_data,
                "nonce": nonce,
            }
            leaf_key = chain.leaf.key

        def sign(data: bytes) -> bytes:
            r, s = decode_dss_signature(leaf_key.sign(data, ec.ECDSA(hashes.SHA384())))
            return r.to_bytes(48, "big") + s.to_bytes(48, "big")

        return encode_cose_sign1({1: -35}, {}, cbor2.dumps(payload), sign, tagged=False)

    def describe_pcr(self, index: int) -> bytes:
        self._check_index(index)
        with self._lock:
            return self._pcrs[index]

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        self._check_index(index)
        if len(data) > NSM_REQUEST_MAX_SIZE:
            raise NsmError("InputTooLarge", f"extend data is {len(data)} bytes")
        with self._lock:
            if index in self._locked:
                raise NsmError("ReadOnlyIndex", f"PCR{index} is locked")
            self._pcrs[index] = hashlib.sha384(self._pcrs[index] + data).digest()
            return self._pcrs[index]

    def lock_pcr(self, index: int) -> None:
        self._check_index(index)
        with self._lock:
            self._locked.add(index)

    def get_random(self, n: int) -> bytes:
        check_random_size(n)
        return os.urandom(n)

    def describe(self) -> NsmDescription:
        with self._lock:
            locked = frozenset(self._locked)
        return NsmDescription((1, 0, 0), self._module_id, MAX_PCRS, locked, "SHA384")

    # --- the mock PKI ---

    @staticmethod
    def _check_index(index: int) -> None:
        if not 0 <= index < MAX_PCRS:
            raise NsmError("InvalidIndex", f"PCR index {index} is not in [0, {MAX_PCRS})")

    def _ensure_root(self) -> _Ca:
        if self._root is None:
            self._root = _load_or_create_root(self._state_dir, self._clock())
        return self._root

    def _ensure_chain(self, root: _Ca, now: datetime) -> _Chain:
        chain = self._chain
        if chain is not None and now + LEAF_REISSUE_MARGIN <= chain.leaf.cert.not_valid_after_utc:
            return chain
        intermediates = chain.intermediates if chain is not None else ()
        # The leaf must be covered by every CA above it for its whole life.
        if not intermediates or any(
            now - BACKDATE < ca.cert.not_valid_before_utc or now + LEAF_LIFETIME > ca.cert.not_valid_after_utc
            for ca in intermediates
        ):
            intermediates = _issue_intermediates(root, now)
        issuer = intermediates[-1]
        subject = _name(*_ORG, (NameOID.COMMON_NAME, f"{self._module_id}.mock-region.mock.aws"))
        leaf = _issue(issuer, subject, now - timedelta(seconds=10), now + LEAF_LIFETIME, ca=False, path_length=None)
        self._chain = _Chain(intermediates, leaf)
        return self._chain


def _name(*pairs: tuple[ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def _issue(
    issuer: _Ca | None,
    subject: x509.Name,
    not_before: datetime,
    not_after: datetime,
    *,
    ca: bool,
    path_length: int | None,
) -> _Ca:
    """One certificate shaped like AWS's at its level; `issuer=None` makes a self-signed root."""
    key = ec.generate_private_key(ec.SECP384R1())
    signer = issuer.key if issuer is not None else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    )
    if ca and (path_length is None or path_length > 0):
        # Root and upper intermediates: SKI/AKI; keyUsage digitalSignature, keyCertSign, cRLSign.
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        if issuer is not None:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
            builder = builder.add_extension(aki, critical=False)
        builder = builder.add_extension(
            _key_usage(digital_signature=True, cert_sign=True, crl_sign=True), critical=True
        )
    elif ca:
        # The instance CA (pathLen 0): keyUsage keyCertSign only, no key identifiers.
        builder = builder.add_extension(_key_usage(cert_sign=True), critical=True)
    else:
        # The leaf: keyUsage digitalSignature and nonRepudiation, not critical.
        builder = builder.add_extension(_key_usage(digital_signature=True, non_repudiation=True), critical=False)
    return _Ca(builder.sign(signer, hashes.SHA384()), key)


def _key_usage(
    *, digital_signature: bool = False, non_repudiation: bool = False, cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=non_repudiation,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issue_intermediates(root: _Ca, now: datetime) -> tuple[_Ca, _Ca, _Ca]:
    tag = os.urandom(8).hex()
    start = now - BACKDATE
    cn = NameOID.COMMON_NAME
    regional_name = _name(*_ORG, (cn, f"{tag}.mock-region.mock.aws.nitro-enclaves"))
    regional = _issue(root, regional_name, start, now + REGIONAL_LIFETIME, ca=True, path_length=2)
    zonal_name = _name(*_ORG, (cn, f"{tag}.zonal.mock-region.mock.aws.nitro-enclaves"))
    zonal = _issue(regional, zonal_name, start, now + ZONAL_LIFETIME, ca=True, path_length=1)
    instance_name = _name(*_ORG, (cn, f"i-{tag}.mock-region.mock.aws.nitro-enclaves"))
    instance = _issue(zonal, instance_name, start, now + INSTANCE_LIFETIME, ca=True, path_length=0)
    return regional, zonal, instance


@contextmanager
def _locked_dir(state_dir: Path) -> Iterator[None]:
    """Serialize root creation between processes sharing one state directory."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_or_create_root(state_dir: Path, now: datetime) -> _Ca:
    cert_path, key_path = state_dir / ROOT_CERT_FILE, state_dir / ROOT_KEY_FILE
    with _locked_dir(state_dir):
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
                raise NsmError("InternalError", f"{key_path} does not hold the key of {cert_path}")
            if now > cert.not_valid_after_utc:
                raise NsmError("InternalError", f"the mock root in {cert_path} has expired; delete the directory")
            return _Ca(cert, key)
        if cert_path.exists() or key_path.exists():
            raise NsmError("InternalError", f"{state_dir} holds only half of the mock root; delete both files")
        subject = _name(*_ORG, (NameOID.COMMON_NAME, "mock.aws.nitro-enclaves"))
        root = _issue(None, subject, now - timedelta(days=1), now + ROOT_LIFETIME, ca=True, path_length=None)
        key_pem = root.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        write_atomic(key_path, key_pem, 0o600)
        write_atomic(cert_path, root.cert.public_bytes(Encoding.PEM), 0o644)
        return root
