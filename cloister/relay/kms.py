"""The parent's side of the sealed log key: the KMS calls, through boto3 (docs/decisions/0014).

The parent never holds the seed. It passes the enclave's attestation document as `Recipient`
and hands the enclave `CiphertextForRecipient`; it keeps only `CiphertextBlob` (the seed sealed
under the KMS key), which it stores beside the log. These helpers refuse an answer that carries
a `Plaintext` (KMS ignoring the Recipient would put the seed in the parent's hands) or lacks a
`CiphertextForRecipient`.

The relay's start-up (cloister.relay.lifecycle) makes these calls. They work the same against
AWS KMS (`kms_client(region)`) and the local stand-in (`local_kms_client(endpoint_url)`,
cloister.dev.kms, mock mode). boto3 is synchronous: callers run them in a worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

from cloister.verify.errors import CloisterError

KEY_ENCRYPTION_ALGORITHM: Final = "RSAES_OAEP_SHA_256"
SEED_SIZE: Final = 32
# The stand-in verifies no signatures; boto3 still signs, so it needs some credentials.
STAND_IN_CREDENTIALS: Final = ("cloister-dev", "cloister-dev-secret")


class KmsApi(Protocol):
    """The three boto3 KMS client methods used here (boto3's client satisfies it)."""

    def encrypt(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def decrypt(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def generate_data_key(self, **kwargs: Any) -> Mapping[str, Any]: ...


class KmsResponseError(CloisterError):
    """KMS answered without a field it must send, or with a Plaintext to a Recipient request."""


@dataclass(frozen=True)
class SealedSeed:
    """What GenerateDataKey with a Recipient returns: the sealed copy for storage (`ciphertext_blob`,
    which only KMS opens) and the copy only the enclave opens (`ciphertext_for_recipient`)."""

    key_id: str
    ciphertext_blob: bytes
    ciphertext_for_recipient: bytes


def kms_client(region: str, *, endpoint_url: str | None = None) -> KmsApi:
    """A boto3 KMS client with boto3's usual credential chain (the parent's instance role)."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=10)
    return cast(KmsApi, boto3.client("kms", region_name=region, endpoint_url=endpoint_url, config=config))


def local_kms_client(endpoint_url: str, *, region: str = "us-east-1") -> KmsApi:
    """A boto3 KMS client for the local stand-in, with throwaway credentials and no retries."""
    import boto3
    from botocore.config import Config

    key, secret = STAND_IN_CREDENTIALS
    config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=10)
    client = boto3.client(
        "kms",
        region_name=region,
        endpoint_url=endpoint_url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=config,
    )
    return cast(KmsApi, client)


def _recipient(attestation_document: bytes) -> dict[str, Any]:
    return {"AttestationDocument": attestation_document, "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM}


def _for_recipient(response: Mapping[str, Any], operation: str) -> bytes:
    if response.get("Plaintext"):
        raise KmsResponseError(f"KMS {operation} answered a Recipient request with a Plaintext")
    envelope = response.get("CiphertextForRecipient")
    if not isinstance(envelope, bytes) or not envelope:
        raise KmsResponseError(f"KMS {operation} answered without CiphertextForRecipient")
    return envelope


def _context(encryption_context: Mapping[str, str] | None) -> dict[str, Any]:
    return {"EncryptionContext": dict(encryption_context)} if encryption_context else {}


def generate_sealed_seed(
    client: KmsApi,
    key_id: str,
    attestation_document: bytes,
    *,
    encryption_context: Mapping[str, str] | None = None,
) -> SealedSeed:
    """A new 32-byte seed from KMS, sealed under `key_id` and encrypted to the enclave's key."""
    response = client.generate_data_key(
        KeyId=key_id,
        NumberOfBytes=SEED_SIZE,
        Recipient=_recipient(attestation_document),
        **_context(encryption_context),
    )
    blob = response.get("CiphertextBlob")
    if not isinstance(blob, bytes) or not blob:
        raise KmsResponseError("KMS GenerateDataKey answered without CiphertextBlob")
    return SealedSeed(str(response.get("KeyId", key_id)), blob, _for_recipient(response, "GenerateDataKey"))


def decrypt_for_recipient(
    client: KmsApi,
    ciphertext_blob: bytes,
    attestation_document: bytes,
    *,
    key_id: str | None = None,
    encryption_context: Mapping[str, str] | None = None,
) -> bytes:
    """KMS Decrypt with the enclave's document as Recipient; returns CiphertextForRecipient."""
    kwargs: dict[str, Any] = {"CiphertextBlob": ciphertext_blob, "Recipient": _recipient(attestation_document)}
    if key_id is not None:
        kwargs["KeyId"] = key_id
    response = client.decrypt(**kwargs, **_context(encryption_context))
    return _for_recipient(response, "Decrypt")


def encrypt(
    client: KmsApi, key_id: str, plaintext: bytes, *, encryption_context: Mapping[str, str] | None = None
) -> bytes:
    """KMS Encrypt; returns CiphertextBlob. (The parent then sees `plaintext`: tests and
    ceremonies only; the enclave's seed is made with `generate_sealed_seed`.)"""
    response = client.encrypt(KeyId=key_id, Plaintext=plaintext, **_context(encryption_context))
    blob = response.get("CiphertextBlob")
    if not isinstance(blob, bytes) or not blob:
        raise KmsResponseError("KMS Encrypt answered without CiphertextBlob")
    return blob
