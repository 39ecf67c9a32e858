"""Sealed bodies (cloister.audit.sealed): RFC 9180 HPKE base mode, checked against the independent
implementation in `cryptography`, and the envelope's binding to one entry and kind."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cloister.audit.sealed import (
    INFO,
    MAGIC,
    hpke_open,
    hpke_seal,
    is_sealed,
    key_id,
    open_body,
    parse_sealed,
    seal_body,
)
from cloister.verify.errors import DecodeError, VerificationError

hpke = pytest.importorskip("cryptography.hazmat.primitives.hpke", reason="cryptography without HPKE")
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
BODY = b'{"card":"4242-4242-4242-4242"}'


def test_our_hpke_and_cryptographys_open_each_others_messages() -> None:
    key = X25519PrivateKey.generate()
    enc, ct = hpke_seal(key.public_key(), INFO, b"", BODY)
    assert SUITE.decrypt(enc + ct, key, info=INFO) == BODY
    theirs = SUITE.encrypt(BODY, key.public_key(), info=INFO)
    assert hpke_open(key, theirs[:32], INFO, b"", theirs[32:]) == BODY


def test_a_sealed_body_opens_only_for_its_entry_kind_and_key() -> None:
    key = X25519PrivateKey.generate()
    sealed = seal_body(key.public_key(), 7, "args", BODY)
    assert is_sealed(sealed) and not is_sealed(BODY) and BODY not in sealed
    assert parse_sealed(sealed).key_id == key_id(key.public_key()) and sealed.startswith(MAGIC)
    assert len(sealed) == len(BODY) + 4 + 8 + 32 + 16
    assert open_body(key, 7, "args", sealed) == BODY
    for index, kind in ((8, "args"), (7, "result")):  # moved to another entry, or passed off as a result
        with pytest.raises(VerificationError, match="does not authenticate"):
            open_body(key, index, kind, sealed)
    with pytest.raises(VerificationError, match="sealed to auditor key"):
        open_body(X25519PrivateKey.generate(), 7, "args", sealed)
    for i in (4, 12, 44, len(sealed) - 1):  # any flipped byte: header, key id, enc, ciphertext, tag
        tampered = bytearray(sealed)
        tampered[i] ^= 1
        with pytest.raises((VerificationError, DecodeError)):
            open_body(key, 7, "args", bytes(tampered))
    # Two seals of the same body differ (a fresh ephemeral key each): equal bodies do not show.
    assert seal_body(key.public_key(), 7, "args", BODY) != sealed


def test_malformed_envelopes_and_arguments_are_refused() -> None:
    key = X25519PrivateKey.generate()
    with pytest.raises(DecodeError, match="does not start with"):
        parse_sealed(BODY)
    with pytest.raises(DecodeError, match="shorter than its header"):
        parse_sealed(MAGIC + b"\x00" * 40)
    with pytest.raises(ValueError, match="kind"):
        seal_body(key.public_key(), 1, "other", BODY)
    with pytest.raises(ValueError, match="2\\*\\*64"):
        seal_body(key.public_key(), 1 << 64, "args", BODY)
    # A low-order point as the encapsulated key gives no usable secret.
    low_order = MAGIC + key_id(key.public_key()) + b"\x00" * 32 + b"\x00" * 16
    with pytest.raises(VerificationError):
        open_body(key, 1, "args", low_order)
