"""The sealed log key: opening AWS KMS's `CiphertextForRecipient` inside the enclave.

The log has one long-lived signing key per origin. Its 32-byte seed is kept by AWS KMS under a
key whose policy lets `kms:Decrypt` (and `kms:GenerateDataKey`) answer only a `Recipient` whose
attestation document carries this image's PCR0 or a pinned predecessor's. The enclave has no
network, so the exchange is:

1. The enclave makes a one-use RSA key pair (`RecipientKey.generate`) and an attestation document
   whose `public_key` is its SubjectPublicKeyInfo (`recipient_attestation`).
2. The parent calls KMS with `Recipient={"AttestationDocument": doc, "KeyEncryptionAlgorithm":
   "RSAES_OAEP_SHA_256"}`: `GenerateDataKey(NumberOfBytes=32)` at the log's first start (it
   stores the `CiphertextBlob`), `Decrypt(CiphertextBlob=...)` at every later one. It hands the
   enclave the `CiphertextForRecipient` of the answer (KMS leaves `Plaintext` empty).
3. The enclave opens it (`unseal_log_key`): a CMS EnvelopedData (RFC 5652) whose content key is
   RSAES-OAEP (SHA-256, MGF1-SHA-256) encrypted to that RSA key and whose content is
   AES-256-CBC encrypted. It derives the Ed25519 log key from the seed (`derive_log_key`).

The envelope profile accepted here is exactly what KMS sends (docs/decisions/0014, with the AWS
sources): BER with indefinite lengths on the outer elements, EnvelopedData version 2, one
KeyTransRecipientInfo version 2 naming the key by subjectKeyIdentifier, id-RSAES-OAEP with
explicit SHA-256 and MGF1-SHA-256 parameters, id-data content encrypted with aes256-CBC under a
16-byte IV. Anything else is refused. Every decoding failure, and every failure to open the
envelope, is one `EnvelopeError` (a DecodeError) with its cause chained.

What the envelope does not give: authentication of its sender. Anyone holding the document's
public key (the parent does) can build a valid envelope, and CBC lets the parent flip bits of the
first plaintext block without detection. So the seed is trusted only through the key it derives:
`unseal_log_key(..., expected_public=...)` refuses a seed whose log key is not the one the
witnessed log already introduced. (At the log's first start there is nothing to compare with;
decision 0014 says what that leaves open.)

A `RecipientKey` opens one envelope and then forgets its private key, whether or not the opening
succeeded, so the parent cannot use the enclave as a decryption or padding oracle.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.enclave.nsm import MAX_BOUND_FIELD, Nsm
from cloister.verify import der
from cloister.verify.errors import CloisterError, DecodeError, VerificationError

KEY_ENCRYPTION_ALGORITHM: Final = "RSAES_OAEP_SHA_256"  # the only value KMS accepts
MAX_ENVELOPE: Final = 6144  # KMS: CiphertextForRecipient is 1 to 6144 bytes
RSA_SIZES: Final = (2048, 3072, 4096)  # 2048 is what the AWS Nitro Enclaves SDK uses
RSA_EXPONENT: Final = 65537
SEED_SIZE: Final = 32
LOG_KEY_INFO: Final = b"cloister/log-key/v1\x00"  # HKDF info prefix; the origin follows

OID_ENVELOPED_DATA: Final = "1.2.840.113549.1.7.3"
OID_DATA: Final = "1.2.840.113549.1.7.1"
OID_RSAES_OAEP: Final = "1.2.840.113549.1.1.7"
OID_MGF1: Final = "1.2.840.113549.1.1.8"
OID_SHA256: Final = "2.16.840.1.101.3.4.2.1"
OID_AES256_CBC: Final = "2.16.840.1.101.3.4.1.42"

ENVELOPED_DATA_VERSION: Final = 2  # RFC 5652 §6.1: 2 when a KeyTransRecipientInfo is version 2
KTRI_VERSION: Final = 2  # RFC 5652 §6.2.1: 2 when rid is a subjectKeyIdentifier
AES_BLOCK: Final = 16
MAX_SKI: Final = 64

_MAX_DEPTH: Final = 12  # the profile nests 9 deep
_MAX_NODES: Final = 64  # the profile has 31 elements


class EnvelopeError(DecodeError):
    """The bytes are not a KMS envelope this key can open (malformed, other profile, or not ours)."""


class RecipientKeyUsed(CloisterError):
    """A RecipientKey opens one envelope only; this one has been used (or discarded)."""


class SealedKeyMismatch(VerificationError):
    """The unsealed seed derives a log key other than the one the log introduced."""


@dataclass(frozen=True)
class Envelope:
    """The fields of a KMS `CiphertextForRecipient`, parsed and checked against the profile."""

    key_identifier: bytes  # the recipient's subjectKeyIdentifier, as KMS chose it
    encrypted_key: bytes  # the content-encryption key, RSAES-OAEP encrypted
    iv: bytes  # 16 bytes
    ciphertext: bytes  # AES-256-CBC, PKCS#7 padded


def parse_envelope(data: bytes) -> Envelope:
    """Parse a `CiphertextForRecipient`. Raises EnvelopeError."""
    try:
        root = der.parse(data, max_size=MAX_ENVELOPE, max_depth=_MAX_DEPTH, max_nodes=_MAX_NODES, indefinite=True)
        return _content_info(root)
    except der.DerError as exc:
        raise EnvelopeError(f"CiphertextForRecipient: {exc}") from exc


def _content_info(node: der.Node) -> Envelope:
    # ContentInfo ::= SEQUENCE { contentType, content [0] EXPLICIT ANY }
    content_type, content = der.fields(node, "ContentInfo", 2)
    _want_oid(content_type, OID_ENVELOPED_DATA, "ContentInfo.contentType")
    (enveloped,) = der.fields(content, "ContentInfo.content", 1, tag=der.context(0, constructed=True))
    # EnvelopedData ::= SEQUENCE { version, originatorInfo [0] OPTIONAL, recipientInfos,
    #   encryptedContentInfo, unprotectedAttrs [1] OPTIONAL }; KMS sends neither optional field.
    version, recipient_infos, encrypted_content_info = der.fields(enveloped, "EnvelopedData", 3)
    _want_version(version, ENVELOPED_DATA_VERSION, "EnvelopedData.version")
    (ktri,) = der.fields(recipient_infos, "EnvelopedData.recipientInfos", 1, tag=der.SET)
    key_identifier, encrypted_key = _key_trans_recipient_info(ktri)
    iv, ciphertext = _encrypted_content_info(encrypted_content_info)
    return Envelope(key_identifier, encrypted_key, iv, ciphertext)


def _key_trans_recipient_info(node: der.Node) -> tuple[bytes, bytes]:
    # KeyTransRecipientInfo ::= SEQUENCE { version, rid, keyEncryptionAlgorithm, encryptedKey }
    version, rid, algorithm, encrypted_key = der.fields(node, "KeyTransRecipientInfo", 4)
    _want_version(version, KTRI_VERSION, "KeyTransRecipientInfo.version")
    # rid: subjectKeyIdentifier [0] IMPLICIT OCTET STRING (version 2 means this choice).
    ski = der.octets(rid, "KeyTransRecipientInfo.rid", tag=der.context(0, constructed=False))
    if not 0 < len(ski) <= MAX_SKI:
        raise der.DerError(f"KeyTransRecipientInfo.rid is {len(ski)} bytes")
    oaep_oid, params = der.fields(algorithm, "keyEncryptionAlgorithm", 2)
    _want_oid(oaep_oid, OID_RSAES_OAEP, "keyEncryptionAlgorithm")
    # RSAES-OAEP-params ::= SEQUENCE { hashFunc [0], maskGenFunc [1], pSourceFunc [2] } with
    # SHA-1 defaults (RFC 8017 A.2.1): we require explicit SHA-256 and MGF1-SHA-256 and the
    # default (empty) label, which is what KMS sends.
    hash_func, mask_gen = der.fields(params, "RSAES-OAEP-params", 2)
    (hash_alg,) = der.fields(hash_func, "RSAES-OAEP-params.hashFunc", 1, tag=der.context(0, constructed=True))
    _want_sha256(hash_alg, "RSAES-OAEP-params.hashFunc")
    (mgf,) = der.fields(mask_gen, "RSAES-OAEP-params.maskGenFunc", 1, tag=der.context(1, constructed=True))
    mgf_oid, mgf_hash = der.fields(mgf, "maskGenFunc", 2)
    _want_oid(mgf_oid, OID_MGF1, "maskGenFunc")
    _want_sha256(mgf_hash, "maskGenFunc parameters")
    return ski, der.octets(encrypted_key, "KeyTransRecipientInfo.encryptedKey")


def _encrypted_content_info(node: der.Node) -> tuple[bytes, bytes]:
    # EncryptedContentInfo ::= SEQUENCE { contentType, contentEncryptionAlgorithm,
    #   encryptedContent [0] IMPLICIT OCTET STRING OPTIONAL }
    content_type, algorithm, content = der.fields(node, "EncryptedContentInfo", 3)
    _want_oid(content_type, OID_DATA, "EncryptedContentInfo.contentType")
    aes_oid, iv_node = der.fields(algorithm, "contentEncryptionAlgorithm", 2)
    _want_oid(aes_oid, OID_AES256_CBC, "contentEncryptionAlgorithm")
    iv = der.octets(iv_node, "contentEncryptionAlgorithm IV")
    if len(iv) != AES_BLOCK:
        raise der.DerError(f"contentEncryptionAlgorithm IV is {len(iv)} bytes, expected {AES_BLOCK}")
    ciphertext = der.octets(
        content, "EncryptedContentInfo.encryptedContent", tag=der.context(0, constructed=False), segmented=True
    )
    if not ciphertext or len(ciphertext) % AES_BLOCK:
        raise der.DerError(f"encryptedContent is {len(ciphertext)} bytes, not a positive multiple of {AES_BLOCK}")
    return iv, ciphertext


def _want_oid(node: der.Node, want: str, what: str) -> None:
    got = der.oid(node, what)
    if got != want:
        raise der.DerError(f"{what} is {got}, expected {want}")


def _want_version(node: der.Node, want: int, what: str) -> None:
    got = der.integer(node, what)
    if got != want:
        raise der.DerError(f"{what} is {got}, expected {want}")


def _want_sha256(node: der.Node, what: str) -> None:
    # AlgorithmIdentifier { id-sha256, NULL or absent } (RFC 5754 §2 allows both).
    der.expect(node, der.SEQUENCE, what)
    if not 1 <= len(node.children) <= 2:
        raise der.DerError(f"{what}: {len(node.children)} fields, expected 1 or 2")
    _want_oid(node.children[0], OID_SHA256, what)
    if len(node.children) == 2:
        der.null(node.children[1], f"{what} parameters")


def open_envelope(private_key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    """Parse and decrypt a `CiphertextForRecipient` with `private_key`. Raises EnvelopeError.

    Failures to decrypt (wrong key, altered encrypted key, bad padding) are reported alike.
    """
    env = parse_envelope(data)
    size = (private_key.key_size + 7) // 8
    if len(env.encrypted_key) != size:
        raise EnvelopeError(f"encryptedKey is {len(env.encrypted_key)} bytes, the recipient key takes {size}")
    oaep = asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    try:
        cek = private_key.decrypt(env.encrypted_key, oaep)
        if len(cek) != 32:
            raise ValueError(f"content-encryption key is {len(cek)} bytes, AES-256 takes 32")
        decryptor = Cipher(algorithms.AES256(cek), modes.CBC(env.iv)).decryptor()
        padded = decryptor.update(env.ciphertext) + decryptor.finalize()
        unpadder = padding.PKCS7(AES_BLOCK * 8).unpadder()
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise EnvelopeError("CiphertextForRecipient does not open with this recipient key") from exc


class RecipientKey:
    """A one-use RSA key pair whose public half goes into an attestation document.

    `open` may be called once: it forgets the private key before it decrypts, so a second call
    (after success or failure) raises RecipientKeyUsed.
    """

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise TypeError("a recipient key is RSA (KMS's only KeyEncryptionAlgorithm is RSAES_OAEP_SHA_256)")
        if private_key.key_size not in RSA_SIZES:
            raise ValueError(f"RSA key of {private_key.key_size} bits; use one of {RSA_SIZES}")
        if private_key.public_key().public_numbers().e != RSA_EXPONENT:
            raise ValueError("the recipient RSA key must use the public exponent 65537")
        self._private: rsa.RSAPrivateKey | None = private_key
        self._lock = threading.Lock()
        self.public_key_der = private_key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if len(self.public_key_der) > MAX_BOUND_FIELD:
            raise ValueError(f"public key is {len(self.public_key_der)} bytes, the NSM binds at most {MAX_BOUND_FIELD}")

    @classmethod
    def generate(cls, bits: int = 2048) -> RecipientKey:
        if bits not in RSA_SIZES:
            raise ValueError(f"RSA key of {bits} bits; use one of {RSA_SIZES}")
        return cls(rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=bits))

    @property
    def used(self) -> bool:
        return self._private is None

    def open(self, ciphertext_for_recipient: bytes) -> bytes:
        """Decrypt the envelope. Raises EnvelopeError, or RecipientKeyUsed on a second call."""
        with self._lock:
            private, self._private = self._private, None
        if private is None:
            raise RecipientKeyUsed("this recipient key has already opened an envelope")
        return open_envelope(private, ciphertext_for_recipient)

    def discard(self) -> None:
        """Forget the private key without using it."""
        with self._lock:
            self._private = None


def recipient_attestation(
    nsm: Nsm, key: RecipientKey, *, nonce: bytes | None = None, user_data: bytes | None = None
) -> bytes:
    """An attestation document whose `public_key` is `key`: what the parent passes to KMS."""
    return nsm.attestation(public_key=key.public_key_der, nonce=nonce, user_data=user_data)


def derive_log_key(seed: bytes, origin: str) -> ed25519.Ed25519PrivateKey:
    """The log's Ed25519 signing key for `origin`: HKDF-SHA256(seed, info=LOG_KEY_INFO || origin)."""
    if len(seed) != SEED_SIZE:
        raise ValueError(f"log key seed is {len(seed)} bytes, expected {SEED_SIZE}")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LOG_KEY_INFO + origin.encode())
    return ed25519.Ed25519PrivateKey.from_private_bytes(hkdf.derive(seed))


def log_public_key(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def unseal_log_key(
    key: RecipientKey, ciphertext_for_recipient: bytes, *, origin: str, expected_public: bytes | None
) -> ed25519.Ed25519PrivateKey:
    """Open the envelope, derive the log key, and check it against the log's introduced key.

    `expected_public` is the raw Ed25519 log key the witnessed log already carries for `origin`
    (None only at the log's first start). Raises EnvelopeError, RecipientKeyUsed or
    SealedKeyMismatch.
    """
    seed = key.open(ciphertext_for_recipient)
    if len(seed) != SEED_SIZE:
        raise EnvelopeError(f"the sealed seed is {len(seed)} bytes, expected {SEED_SIZE}")
    log_key = derive_log_key(seed, origin)
    if expected_public is not None and log_public_key(log_key) != expected_public:
        raise SealedKeyMismatch(f"the unsealed seed does not derive the log key of {origin}")
    return log_key
