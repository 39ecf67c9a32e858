"""Regression (boundary fuzzer, grpc_ReportServer target): a TLS certificate whose public key is of
a type `cryptography` cannot load made check_tls raise UnsupportedAlgorithm, which reached the
gRPC layer as an internal error instead of a failed verification."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from cloister.enclave.server_identity import check_tls
from cloister.verify.errors import DecodeError
from tests.world import EPOCH

ID_EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")  # OID 1.2.840.10045.2.1, DER


def test_a_certificate_with_an_unknown_key_type_fails_verification_not_the_enclave() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd.internal")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(EPOCH)
        .not_valid_after(EPOCH + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    ).public_bytes(Encoding.DER)
    assert cert.count(ID_EC_PUBLIC_KEY) == 1
    odd = cert.replace(ID_EC_PUBLIC_KEY, ID_EC_PUBLIC_KEY[:-1] + b"\x09")  # 1.2.840.10045.2.9: no such key type
    with pytest.raises(DecodeError, match="public key cannot be read"):
        check_tls([odd], spki_sha256_hex="00" * 32)
