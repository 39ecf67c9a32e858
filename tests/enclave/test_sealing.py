"""The sealed log key, enclave side: KMS's CiphertextForRecipient parsed strictly and opened once.

AWS_KMS_ENVELOPE is a real KMS answer. Provenance: the byte array `input_ber` in
tests/cms_test.c of aws/aws-nitro-enclaves-sdk-c (Apache-2.0), commented there "CMS response
from KMS. Enveloped Data. RSA-OAEP envelope with AES256-CBC encrypted content", with the
encrypted key, IV and ciphertext that the SDK's test expects its parser to extract (checked
below). Its private key is not published, so it is parsed here, not opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from functools import cache
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.dev.kms import envelope_to
from cloister.dev.mock_nsm import MockNsm
from cloister.enclave.sealing import (
    MAX_ENVELOPE,
    EnvelopeError,
    RecipientKey,
    RecipientKeyUsed,
    SealedKeyMismatch,
    derive_log_key,
    log_public_key,
    open_envelope,
    parse_envelope,
    recipient_attestation,
    unseal_log_key,
)
from cloister.verify import der
from cloister.verify.attestation import AttestationPolicy, TrustRoot, verify_attestation
from cloister.verify.errors import DecodeError
from tests.world import Clock

AWS_KMS_ENVELOPE = bytes.fromhex(
    "308006092a864886f70d010703a08030800201023182016b3082016702010280207087b55df94ba3255cdf3c01840a2a"
    "a3ec93620625d601cf56f97bde7a3d2eb1303c06092a864886f70d010107302fa00f300d06096086480165030402010500"
    "a11c301a06092a864886f70d010108300d0609608648016503040201050004820100a0614593a030ee336bfff076618b01"
    "30d045de9f4d183d83c5da882f13abc1f4bf0d13645869393442ab582e6a04d697d52d5623e367e7e92db6ebd2bd07735b"
    "153f2826bee5df8e16c713a1e85cb6ba85e88681335c7e941a94abf0c0113e030916e2b6e1826db4ffb919b8e1b6f59ec2"
    "77e58de40b0ffeecaa0d94fbcb290374ed3dfc35d31a8f43ae1300fe20fdd986d4b8565657451f9dc693e1346789202"
    "21c58a28da5e71ab6b31caa445825a6385c6c4f5d5d5ebbc2c2570e9647fded36b559647bcb27e58886255f582c63d863"
    "ecec307d15763abce0b1b812a550938ca4e2d28a74563db52367558d3e2e82ac2a27fe5c9391a007c15f75b90ab0dd3080"
    "06092a864886f70d010701301d060960864801650304012a0410688c6d5f7f31b0fecedf09f2e7c99ac9a080043070e5"
    "caaffd49ad24efe15bf903be9d19895b777d269b57b025f6f67e7ef93f94464515f2ebe034ea0b7621a1ff19292e000000"
    "00000000000000"
)
ORIGIN = "cloister.test/log"
SEED = bytes(range(32))


@cache
def private_key() -> rsa.RSAPrivateKey:
    """One RSA key for the tests that need no fresh one (generating keys is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def spki(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def sealed(plaintext: bytes, key: rsa.RSAPrivateKey | None = None) -> bytes:
    """An envelope as the KMS stand-in makes it (the layout KMS returns)."""
    key = key or private_key()
    return envelope_to(key.public_key(), spki(key), plaintext)


def skeleton(node: der.Node) -> list[tuple[int, int, bool]]:
    """The shape of a parsed element: (depth, tag, indefinite) in document order."""
    out: list[tuple[int, int, bool]] = []

    def walk(n: der.Node, depth: int) -> None:
        out.append((depth, n.tag, n.indefinite))
        for child in n.children:
            walk(child, depth + 1)

    walk(node, 0)
    return out


def parse_ber(data: bytes) -> der.Node:
    return der.parse(data, max_size=MAX_ENVELOPE, indefinite=True)


# --- the format KMS sends -------------------------------------------------------------------------


def test_a_real_kms_answer_parses_to_the_fields_the_aws_sdk_extracts() -> None:
    env = parse_envelope(AWS_KMS_ENVELOPE)
    assert env.key_identifier.hex() == "7087b55df94ba3255cdf3c01840a2aa3ec93620625d601cf56f97bde7a3d2eb1"
    assert len(env.encrypted_key) == 256  # RSA 2048
    assert env.encrypted_key[:4].hex() == "a0614593"
    assert env.encrypted_key[-4:].hex() == "b90ab0dd"
    assert env.iv.hex() == "688c6d5f7f31b0fecedf09f2e7c99ac9"
    assert env.ciphertext.hex() == (
        "70e5caaffd49ad24efe15bf903be9d19895b777d269b57b025f6f67e7ef93f94464515f2ebe034ea0b7621a1ff19292e"
    )


def test_the_stand_in_lays_its_envelope_out_as_kms_does() -> None:
    ours = sealed(SEED)
    assert skeleton(parse_ber(ours)) == skeleton(parse_ber(AWS_KMS_ENVELOPE))
    # Same plaintext size (32 bytes: one padded 48-byte content) and key size: same length too.
    assert len(ours) == len(AWS_KMS_ENVELOPE)
    assert parse_envelope(ours).key_identifier == hashlib.sha256(spki(private_key())).digest()


@pytest.mark.parametrize("size", [1, 15, 16, 32, 100, 4096])
def test_an_envelope_opens_to_its_plaintext(size: int) -> None:
    plaintext = bytes((i * 7) % 256 for i in range(size))
    assert open_envelope(private_key(), sealed(plaintext)) == plaintext


# --- one use, one key -----------------------------------------------------------------------------


def test_a_recipient_key_opens_one_envelope_only() -> None:
    key = RecipientKey(private_key())
    envelope = sealed(SEED)
    assert key.open(envelope) == SEED
    assert key.used
    with pytest.raises(RecipientKeyUsed):
        key.open(envelope)


def test_a_failed_opening_uses_the_key_up_too() -> None:
    """No second try: the parent cannot use the enclave as a decryption or padding oracle."""
    key = RecipientKey(private_key())
    envelope = sealed(SEED)
    # Corrupt the OAEP-encrypted key, whose padding check fails for every flip. A flip in the
    # CBC ciphertext is no good here: about 1 in 256 of those still unpads (CMS content is not
    # authenticated), which made this test fail once in CI. The log key's pinned public key
    # catches such garbage instead (test_a_flipped_iv_is_not_seen_by_the_envelope_but_by_the_log_key_check).
    wrapped = parse_envelope(envelope).encrypted_key
    at = envelope.index(wrapped) + len(wrapped) // 2
    bad = bytearray(envelope)
    bad[at] ^= 1
    with pytest.raises(EnvelopeError):
        key.open(bytes(bad))
    with pytest.raises(RecipientKeyUsed):
        key.open(sealed(SEED))


def test_a_discarded_key_opens_nothing() -> None:
    key = RecipientKey(private_key())
    key.discard()
    with pytest.raises(RecipientKeyUsed):
        key.open(sealed(SEED))


def test_an_envelope_to_another_key_does_not_open() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(EnvelopeError, match="does not open") as info:
        open_envelope(private_key(), sealed(SEED, other))
    assert info.value.__cause__ is not None


def test_recipient_keys_are_2048_to_4096_bit_rsa_with_e_65537() -> None:
    key = RecipientKey.generate()
    assert len(key.public_key_der) < 1024  # fits the NSM's public_key field
    with pytest.raises(ValueError, match="bits"):
        RecipientKey.generate(1024)
    with pytest.raises(ValueError, match="bits"):
        RecipientKey(rsa.generate_private_key(public_exponent=65537, key_size=1536))
    with pytest.raises(ValueError, match="65537"):
        RecipientKey(rsa.generate_private_key(public_exponent=3, key_size=2048))


def test_the_attestation_document_carries_the_recipient_key(tmp_path: Path) -> None:
    clock = Clock()
    nsm = MockNsm(tmp_path / "nsm", {0: b"\x11" * 48}, clock=clock.datetime)
    key = RecipientKey(private_key())
    document = recipient_attestation(nsm, key, nonce=b"n" * 16, user_data=b"u")
    root = TrustRoot.from_pem(nsm.root_pem())
    doc = verify_attestation(document, AttestationPolicy(root=root, at=clock.datetime(), nonce=b"n" * 16))
    assert doc.public_key == key.public_key_der
    assert doc.user_data == b"u"


# --- tampering -----------------------------------------------------------------------------------


def test_an_altered_encrypted_key_is_refused() -> None:
    env = sealed(SEED)
    at = env.index(parse_envelope(env).encrypted_key)
    bad = bytearray(env)
    bad[at + 100] ^= 0x40
    with pytest.raises(EnvelopeError):
        open_envelope(private_key(), bytes(bad))


def test_an_altered_last_block_fails_the_padding() -> None:
    env = sealed(SEED)
    ciphertext = parse_envelope(env).ciphertext
    at = env.index(ciphertext)
    bad = bytearray(env)
    bad[at + len(ciphertext) - 17] ^= 0x01  # the last padding byte 0x10 becomes 0x11
    with pytest.raises(EnvelopeError):
        open_envelope(private_key(), bytes(bad))


def test_a_flipped_iv_is_not_seen_by_the_envelope_but_by_the_log_key_check() -> None:
    """CBC is malleable and the envelope unauthenticated: the seed's log key is what is checked."""
    env = sealed(SEED)
    at = env.index(parse_envelope(env).iv)
    bad = bytearray(env)
    bad[at] ^= 0x01
    assert open_envelope(private_key(), bytes(bad)) == bytes([SEED[0] ^ 1]) + SEED[1:]
    expected = log_public_key(derive_log_key(SEED, ORIGIN))
    with pytest.raises(SealedKeyMismatch):
        unseal_log_key(RecipientKey(private_key()), bytes(bad), origin=ORIGIN, expected_public=expected)
    key = unseal_log_key(RecipientKey(private_key()), env, origin=ORIGIN, expected_public=expected)
    assert log_public_key(key) == expected


def test_a_seed_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="31 bytes"):
        unseal_log_key(RecipientKey(private_key()), sealed(SEED[:31]), origin=ORIGIN, expected_public=None)


# --- the log key ---------------------------------------------------------------------------------


def test_the_log_key_is_a_fixed_function_of_seed_and_origin() -> None:
    """Known answer: changing the derivation would orphan every sealed log key."""
    key = derive_log_key(SEED, ORIGIN)
    assert log_public_key(key) == log_public_key(derive_log_key(bytes(SEED), ORIGIN))
    assert log_public_key(key).hex() == KNOWN_LOG_KEY
    assert log_public_key(derive_log_key(SEED, ORIGIN + "2")) != log_public_key(key)
    with pytest.raises(ValueError, match="33 bytes"):
        derive_log_key(SEED + b"x", ORIGIN)
    # RFC 5869 by hand: extract with the default all-zero salt, one block of expand.
    prk = hmac.new(bytes(32), SEED, "sha256").digest()
    okm = hmac.new(prk, b"cloister/log-key/v1\x00" + ORIGIN.encode() + b"\x01", "sha256").digest()
    assert key.private_bytes_raw() == okm


KNOWN_LOG_KEY = "669117a97d2fe331402fcfed913f5d79f479d224e23e64d2c39f99912b78aad4"


# --- hostile bytes -------------------------------------------------------------------------------

OID_SHA1 = "1.3.14.3.2.26"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_AES128_CBC = "2.16.840.1.101.3.4.1.2"


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, *parts: bytes) -> bytes:
    content = b"".join(parts)
    return bytes([tag]) + _len(len(content)) + content


def indef(tag: int, *parts: bytes) -> bytes:
    return bytes([tag, 0x80]) + b"".join(parts) + b"\x00\x00"


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))


SHA256_ALG = tlv(0x30, oid("2.16.840.1.101.3.4.2.1"), b"\x05\x00")
MGF1_SHA256 = tlv(0xA1, tlv(0x30, oid("1.2.840.113549.1.1.8"), SHA256_ALG))


def build(**over: bytes) -> bytes:
    """A well-formed envelope of SEED to private_key(), with parts replaced by `over`."""
    key = private_key()
    cek, iv = b"K" * 32, b"I" * 16
    oaep = asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES256(cek), modes.CBC(iv)).encryptor()
    ciphertext = enc.update(padder.update(SEED) + padder.finalize()) + enc.finalize()
    p = {
        "content_type": oid("1.2.840.113549.1.7.3"),
        "version": tlv(0x02, b"\x02"),
        "ktri_version": tlv(0x02, b"\x02"),
        "rid": tlv(0x80, b"R" * 32),
        "oaep": oid("1.2.840.113549.1.1.7"),
        "hash": tlv(0xA0, SHA256_ALG),
        "mgf": MGF1_SHA256,
        "encrypted_key": tlv(0x04, key.public_key().encrypt(cek, oaep)),
        "data_type": oid("1.2.840.113549.1.7.1"),
        "aes": oid("2.16.840.1.101.3.4.1.42"),
        "iv": tlv(0x04, iv),
        "content": indef(0xA0, tlv(0x04, ciphertext)),
        "extra_env": b"",
        "extra_ktri": b"",
    } | over
    ktri = tlv(
        0x30, p["ktri_version"], p["rid"], tlv(0x30, p["oaep"], tlv(0x30, p["hash"], p["mgf"])), p["encrypted_key"]
    )
    eci = indef(0x30, p["data_type"], tlv(0x30, p["aes"], p["iv"]), p["content"])
    enveloped = indef(0x30, p["version"], tlv(0x31, ktri, p["extra_ktri"]), eci, p["extra_env"])
    return indef(0x30, p["content_type"], indef(0xA0, enveloped))


def test_the_builder_makes_a_good_envelope() -> None:
    assert open_envelope(private_key(), build()) == SEED
    # definite lengths throughout, and a segmented or primitive content, are fine too
    assert open_envelope(private_key(), build(content=tlv(0xA0, build_content()))) == SEED


def build_content() -> bytes:
    env = parse_envelope(build())
    half = len(env.ciphertext) // 2
    return tlv(0x04, env.ciphertext[:half]) + tlv(0x04, env.ciphertext[half:])


HOSTILE: dict[str, bytes] = {
    "signedData, not envelopedData": build(content_type=oid(OID_SIGNED_DATA)),
    "EnvelopedData version 0": build(version=tlv(0x02, b"\x00")),
    "recipient version 0": build(ktri_version=tlv(0x02, b"\x00")),
    "version not minimal": build(version=tlv(0x02, b"\x00\x02")),
    "rid as issuerAndSerialNumber": build(rid=tlv(0x30, tlv(0x30), tlv(0x02, b"\x01"))),
    "empty rid": build(rid=tlv(0x80, b"")),
    "rsaEncryption (PKCS#1 v1.5), not OAEP": build(oaep=oid(OID_RSA_ENCRYPTION)),
    "OAEP with SHA-1": build(hash=tlv(0xA0, tlv(0x30, oid(OID_SHA1), b"\x05\x00"))),
    "OAEP with MGF1-SHA-1": build(mgf=tlv(0xA1, tlv(0x30, oid("1.2.840.113549.1.1.8"), tlv(0x30, oid(OID_SHA1))))),
    "OAEP with default (SHA-1) parameters": build(hash=b"", mgf=b""),
    "OAEP with a label": build(mgf=MGF1_SHA256 + tlv(0xA2, tlv(0x30, oid("1.2.840.113549.1.1.9"), tlv(0x04, b"L")))),
    "SHA-256 with odd parameters": build(hash=tlv(0xA0, tlv(0x30, oid("2.16.840.1.101.3.4.2.1"), tlv(0x04, b"")))),
    "id-data replaced": build(data_type=oid(OID_SIGNED_DATA)),
    "AES-128": build(aes=oid(OID_AES128_CBC)),
    "short IV": build(iv=tlv(0x04, b"I" * 8)),
    "no content": build(content=b""),
    "content not a block multiple": build(content=tlv(0x80, b"x" * 17)),
    "nested segments": build(content=indef(0xA0, indef(0x24, tlv(0x04, b"x" * 16)))),
    "originatorInfo present": build(extra_env=tlv(0xA1, b"")),
    "two recipients": build(extra_ktri=tlv(0x30, tlv(0x02, b"\x02"))),
    "OID not minimal": build(aes=tlv(0x06, b"\x60\x86\x48\x01\x65\x03\x04\x01\x80\x2a")),
    "OID ends mid-arc": build(aes=tlv(0x06, b"\x60\x86")),
    "empty": b"",
    "one byte": b"\x30",
    "trailing bytes": AWS_KMS_ENVELOPE + b"\x00",
    "huge length": b"\x30\x84\xff\xff\xff\xff" + b"\x00" * 10,
    "five length octets": b"\x30\x85\x00\x00\x00\x00\x10" + b"\x00" * 16,
    "non-minimal long length": b"\x30\x81\x05" + bytes(tlv(0x02, b"\x01")) + b"\x05\x00",
    "indefinite primitive": b"\x04\x80\x01\x02\x00\x00",
    "no end-of-contents": b"\x30\x80\x02\x01\x02",
    "end-of-contents in a definite element": b"\x30\x02\x00\x00",
    "high tag number": b"\x1f\x81\x00\x00",
    "deep nesting": b"\x30\x80" * 1000 + b"\x00\x00" * 1000,
    "many elements": tlv(0x30, b"\x05\x00" * 200),
    "too big": b"\x30\x82\x18\x00" + b"\x00" * 6144,
    "not bytes at all": "text",  # type: ignore[dict-item]
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_der_raises_the_domain_error(data: bytes) -> None:
    with pytest.raises(EnvelopeError) as info:
        open_envelope(private_key(), data)
    assert isinstance(info.value, DecodeError)


def test_every_truncation_of_a_real_answer_is_refused() -> None:
    for n in range(len(AWS_KMS_ENVELOPE)):
        with pytest.raises(EnvelopeError):
            parse_envelope(AWS_KMS_ENVELOPE[:n])


def test_a_recipient_key_is_rsa() -> None:
    """The recipient key is RSA (KMS's only KeyEncryptionAlgorithm is RSAES_OAEP_SHA_256)."""
    with pytest.raises(TypeError):
        RecipientKey(ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_arbitrary_bytes_raise_only_the_domain_error(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        parse_envelope(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_envelopes_open_or_raise_only_the_domain_error(data: st.DataObject) -> None:
    env = bytearray(AWS_KMS_ENVELOPE if data.draw(st.booleans()) else sealed(SEED))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(env) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if action == "flip":
            env[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            env[at] = data.draw(st.sampled_from([0x00, 0x80, 0x81, 0x84, 0xFF, 0x30, 0xA0]))
        elif action == "insert":
            env[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del env[at]
    with contextlib.suppress(EnvelopeError):
        open_envelope(private_key(), bytes(env))
