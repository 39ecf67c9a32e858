"""A local stand-in for AWS KMS, for mock mode and CI. Development only: never in the image.

It implements the part of KMS the sealed log key uses (docs/decisions/0014), as AWS documents it:

- `Encrypt`, `Decrypt` and `GenerateDataKey` on symmetric keys held in a state directory, each
  with a key policy;
- the `Recipient` exchange: `Recipient={"AttestationDocument": ..., "KeyEncryptionAlgorithm":
  "RSAES_OAEP_SHA_256"}`. The document is verified with `cloister.verify.attestation` under the
  configured trust root (the mock NSM's root in mock mode) at the stand-in's clock, and must be
  at most `max_document_age` old. Its PCRs become the request's `kms:RecipientAttestation:*`
  condition keys (`ImageSha384` is PCR0, exactly as AWS defines it; in mock mode PCR0 is
  `cloister.dev.measure`'s measurement of the TCB). The answer carries `CiphertextForRecipient`,
  a CMS EnvelopedData to the document's RSA `public_key` in the BER layout KMS uses
  (`envelope_to`), and no `Plaintext`;
- key policies in AWS's JSON grammar, evaluated as IAM does: an explicit Deny wins, else any
  matching Allow, else deny; a statement holds when every condition operator holds, an operator
  when every key holds, a key when any value matches; a key the request lacks makes its
  condition false. Supported: Effect, Action (with `*` wildcards), Resource "*", Condition with
  StringEquals / StringEqualsIgnoreCase on `kms:RecipientAttestation:ImageSha384` and
  `kms:RecipientAttestation:PCR<0..31>`. Anything else is refused when the policy is stored,
  so a policy never silently means less than it says. Principal is accepted and not evaluated:
  the stand-in has no IAM identities.

Over HTTP (`make_server`, `python -m cloister.dev.kms serve`) it speaks the KMS JSON 1.1 protocol
that boto3 uses: `POST /` with `X-Amz-Target: TrentService.<Operation>`, JSON bodies with base64
blobs, errors as `{"__type": ..., "Message": ...}` with status 400. SigV4 `Authorization` headers
are accepted without verification: anyone who can reach the loopback port can call it.

Its `CiphertextBlob` format is its own (AES-256-GCM under the key's material, the key id and the
encryption context as associated data); AWS's is not public and nothing depends on it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import fnmatch
import hashlib
import json
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import load_der_public_key

from cloister.dev.files import write_atomic
from cloister.enclave.sealing import (
    KEY_ENCRYPTION_ALGORITHM,
    OID_AES256_CBC,
    OID_DATA,
    OID_ENVELOPED_DATA,
    OID_MGF1,
    OID_RSAES_OAEP,
    OID_SHA256,
)
from cloister.verify.attestation import (
    AttestationDocument,
    AttestationError,
    AttestationPolicy,
    MalformedAttestation,
    TrustRoot,
    verify_attestation,
)

DEFAULT_REGION: Final = "us-east-1"
DEFAULT_ACCOUNT: Final = "000000000000"
DEFAULT_MAX_DOCUMENT_AGE: Final = timedelta(minutes=5)
MAX_PLAINTEXT: Final = 4096  # KMS Encrypt: plaintext of 1 to 4096 bytes
MAX_CIPHERTEXT_BLOB: Final = 6144
MAX_ATTESTATION_DOCUMENT: Final = 262144  # KMS RecipientInfo.AttestationDocument
MAX_DATA_KEY: Final = 1024  # KMS GenerateDataKey NumberOfBytes
MAX_REQUEST: Final = 1 << 20
MIN_RECIPIENT_RSA_BITS: Final = 2048
MAX_RECIPIENT_RSA_BITS: Final = 4096
POLICY_VERSION: Final = "2012-10-17"
JSON_CONTENT_TYPE: Final = "application/x-amz-json-1.1"

_BLOB_MAGIC: Final = b"\x01CLK"
_BLOB_AAD: Final = b"cloister-dev-kms/v1\x00"
_KEY_ID_RE: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_ACTION_RE: Final = re.compile(r"^kms:[A-Za-z*]+$")
_CONDITION_KEY_RE: Final = re.compile(r"^kms:recipientattestation:(imagesha384|pcr([0-9]|[12][0-9]|3[01]))$")
_PCR_HEX_RE: Final = re.compile(r"^(?:[0-9a-fA-F]{64}|[0-9a-fA-F]{96}|[0-9a-fA-F]{128})$")
OPERATORS: Final = frozenset({"StringEquals", "StringEqualsIgnoreCase"})
_STATEMENT_FIELDS: Final = frozenset({"Sid", "Effect", "Principal", "Action", "Resource", "Condition"})


class KmsError(Exception):
    """An error as KMS reports it: `code` is the `__type` boto3 exposes as Error.Code."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class PolicyError(ValueError):
    """A key policy the stand-in refuses to store (unknown field, operator or condition key)."""


# --- key policies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    operator: str
    key: str  # lower case: IAM condition key names are case-insensitive
    values: tuple[str, ...]

    def holds(self, context: Mapping[str, str]) -> bool:
        value = context.get(self.key)
        if value is None:
            return False  # a key the request lacks fails a (non-IfExists) condition
        if self.operator == "StringEqualsIgnoreCase":
            return value.lower() in {v.lower() for v in self.values}
        return value in self.values


@dataclass(frozen=True)
class Statement:
    effect: str
    actions: tuple[str, ...]  # lower case patterns
    conditions: tuple[Condition, ...]

    def applies(self, action: str, context: Mapping[str, str]) -> bool:
        name = action.lower()
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.actions):
            return False
        return all(c.holds(context) for c in self.conditions)


@dataclass(frozen=True)
class KeyPolicy:
    statements: tuple[Statement, ...]

    @classmethod
    def parse(cls, document: Any) -> KeyPolicy:
        if not isinstance(document, Mapping):
            raise PolicyError("a key policy is a JSON object")
        unknown = set(document) - {"Version", "Id", "Statement"}
        if unknown:
            raise PolicyError(f"unsupported policy fields {sorted(unknown)}")
        if document.get("Version") != POLICY_VERSION:
            raise PolicyError(f'policy Version must be "{POLICY_VERSION}"')
        raw = document.get("Statement")
        items = [raw] if isinstance(raw, Mapping) else raw
        if not isinstance(items, list) or not items:
            raise PolicyError("policy Statement must be an object or a non-empty list")
        return cls(tuple(_statement(s, i) for i, s in enumerate(items)))

    def allows(self, action: str, context: Mapping[str, str]) -> bool:
        """IAM's rule for one policy: an explicit Deny wins, then any Allow, else deny."""
        allowed = False
        for statement in self.statements:
            if statement.applies(action, context):
                if statement.effect == "Deny":
                    return False
                allowed = True
        return allowed


def _statement(raw: Any, index: int) -> Statement:
    where = f"Statement[{index}]"
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where} is not an object")
    unknown = set(raw) - _STATEMENT_FIELDS
    if unknown:
        raise PolicyError(f"{where}: unsupported fields {sorted(unknown)} (the stand-in evaluates none of them)")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyError(f'{where}: Effect must be "Allow" or "Deny"')
    if raw.get("Resource", "*") != "*":
        raise PolicyError(f'{where}: a key policy\'s Resource is "*"')
    actions = _strings(raw.get("Action"), f"{where}.Action")
    for action in actions:
        if not _ACTION_RE.match(action):
            raise PolicyError(f"{where}: action {action!r} is not kms:<Name>")
    return Statement(effect, tuple(a.lower() for a in actions), _conditions(raw.get("Condition", {}), where))


def _conditions(raw: Any, where: str) -> tuple[Condition, ...]:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}.Condition is not an object")
    out: list[Condition] = []
    for operator, pairs in raw.items():
        if operator not in OPERATORS:
            raise PolicyError(f"{where}: condition operator {operator!r} is not supported ({sorted(OPERATORS)})")
        if not isinstance(pairs, Mapping) or not pairs:
            raise PolicyError(f"{where}.Condition.{operator} must map condition keys to values")
        for key, value in pairs.items():
            name = str(key).lower()
            if not _CONDITION_KEY_RE.match(name):
                raise PolicyError(
                    f"{where}: condition key {key!r} is not supported "
                    "(kms:RecipientAttestation:ImageSha384 or kms:RecipientAttestation:PCR0..PCR31)"
                )
            values = _strings(value, f"{where}.Condition.{operator}.{key}")
            for v in values:
                if not _PCR_HEX_RE.match(v):
                    raise PolicyError(f"{where}: {key} value {v!r} is not a 32, 48 or 64 byte hex digest")
                if operator == "StringEquals" and v != v.lower():
                    raise PolicyError(f"{where}: {key} value {v!r} has upper case and StringEquals never matches it")
            out.append(Condition(operator, name, tuple(values)))
    return tuple(out)


def _strings(raw: Any, where: str) -> list[str]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise PolicyError(f"{where} must be a string or a non-empty list of strings")
    return list(items)


def recipient_context(document: AttestationDocument | None) -> dict[str, str]:
    """The `kms:RecipientAttestation:*` keys of a request (lower-case names, lower-case hex)."""
    if document is None:
        return {}
    context = {f"kms:recipientattestation:pcr{i}": value.hex() for i, value in document.pcrs.items()}
    if 0 in document.pcrs:
        context["kms:recipientattestation:imagesha384"] = document.pcrs[0].hex()
    return context


def log_key_policy(
    pcr0s: Sequence[bytes],
    *,
    allow_encrypt: bool = False,
    principal: str = f"arn:aws:iam::{DEFAULT_ACCOUNT}:role/cloister-parent",
) -> dict[str, Any]:
    """The sealed log key's policy: Decrypt and GenerateDataKey only for a Recipient whose image
    digest (PCR0) is one of `pcr0s` (this image's, then its pinned predecessors').

    `allow_encrypt` adds an unconditioned Encrypt statement (sealing a seed the caller holds, as
    tests do); the production flow seals with GenerateDataKey and needs no Encrypt.
    """
    if not pcr0s:
        raise ValueError("at least one PCR0")
    statements: list[dict[str, Any]] = [
        {
            "Sid": "CloisterEnclaveUnseal",
            "Effect": "Allow",
            "Principal": {"AWS": principal},
            "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
            "Resource": "*",
            "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": [p.hex() for p in pcr0s]}},
        }
    ]
    if allow_encrypt:
        statements.append(
            {
                "Sid": "CloisterSeal",
                "Effect": "Allow",
                "Principal": {"AWS": principal},
                "Action": "kms:Encrypt",
                "Resource": "*",
            }
        )
    return {"Version": POLICY_VERSION, "Id": "cloister-log-key", "Statement": statements}


# --- the CMS envelope, as KMS lays it out --------------------------------------------------------


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def _indefinite(tag: int, *parts: bytes) -> bytes:
    return bytes([tag, 0x80]) + b"".join(parts) + b"\x00\x00"


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _sha256_algorithm() -> bytes:
    return _tlv(0x30, _oid(OID_SHA256) + b"\x05\x00")


def envelope_to(public_key: rsa.RSAPublicKey, spki_der: bytes, plaintext: bytes) -> bytes:
    """`plaintext` as a CiphertextForRecipient to `public_key`, in the layout KMS returns.

    ContentInfo(envelopedData) > EnvelopedData v2 > one KeyTransRecipientInfo v2 (rid: a
    subjectKeyIdentifier, here SHA-256 of the SubjectPublicKeyInfo; id-RSAES-OAEP with explicit
    SHA-256 / MGF1-SHA-256) > EncryptedContentInfo (id-data, aes256-CBC, 16-byte IV, content as
    one OCTET STRING segment); the outer elements use indefinite lengths, as in KMS's answers.
    """
    cek, iv = os.urandom(32), os.urandom(16)
    oaep = asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    encrypted_key = public_key.encrypt(cek, oaep)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES256(cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padder.update(plaintext) + padder.finalize()) + encryptor.finalize()
    oaep_params = _tlv(
        0x30,
        _tlv(0xA0, _sha256_algorithm()) + _tlv(0xA1, _tlv(0x30, _oid(OID_MGF1) + _sha256_algorithm())),
    )
    ktri = _tlv(
        0x30,
        _tlv(0x02, b"\x02")
        + _tlv(0x80, hashlib.sha256(spki_der).digest())
        + _tlv(0x30, _oid(OID_RSAES_OAEP) + oaep_params)
        + _tlv(0x04, encrypted_key),
    )
    content_info = _indefinite(
        0x30,
        _oid(OID_DATA),
        _tlv(0x30, _oid(OID_AES256_CBC) + _tlv(0x04, iv)),
        _indefinite(0xA0, _tlv(0x04, ciphertext)),
    )
    enveloped = _indefinite(0x30, _tlv(0x02, b"\x02"), _tlv(0x31, ktri), content_info)
    return _indefinite(0x30, _oid(OID_ENVELOPED_DATA), _indefinite(0xA0, enveloped))


# --- the key store and the operations ------------------------------------------------------------


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    arn: str
    material: bytes
    policy: KeyPolicy
    policy_document: dict[str, Any]


@dataclass(frozen=True)
class _Recipient:
    document: AttestationDocument
    public_key: rsa.RSAPublicKey
    spki_der: bytes


class LocalKms:
    """The stand-in's keys and operations. Thread-safe; state lives in `state_dir/keys/`."""

    def __init__(
        self,
        state_dir: Path,
        *,
        trust_root: TrustRoot,
        clock: Callable[[], datetime],
        max_document_age: timedelta = DEFAULT_MAX_DOCUMENT_AGE,
        region: str = DEFAULT_REGION,
        account: str = DEFAULT_ACCOUNT,
        allow_debug: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.trust_root = trust_root
        self.clock = clock
        self.max_document_age = max_document_age
        self.region = region
        self.account = account
        self.allow_debug = allow_debug
        self._lock = threading.Lock()

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    # --- key management (the stand-in's own; AWS's CreateKey is not served) ---

    def create_key(self, policy: Mapping[str, Any]) -> str:
        """A new symmetric key with `policy`; returns its key id."""
        _parse_policy(policy)
        key_id = str(uuid.uuid4())
        record = {
            "KeyId": key_id,
            "Arn": self._arn(key_id),
            "Material": base64.b64encode(os.urandom(32)).decode(),
            "Policy": dict(policy),
            "CreationDate": self.clock().astimezone(UTC).isoformat(),
        }
        with self._lock:
            self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(self.keys_dir / f"{key_id}.json", json.dumps(record, indent=2).encode(), 0o600)
        return key_id

    def put_key_policy(self, key_id: str, policy: Mapping[str, Any]) -> None:
        _parse_policy(policy)
        with self._lock:
            path = self._key_path(key_id)
            record = json.loads(path.read_bytes())
            record["Policy"] = dict(policy)
            write_atomic(path, json.dumps(record, indent=2).encode(), 0o600)

    def key(self, key_id: str) -> KeyRecord:
        with self._lock:
            raw = json.loads(self._key_path(key_id).read_bytes())
        return KeyRecord(
            raw["KeyId"], raw["Arn"], base64.b64decode(raw["Material"]), _parse_policy(raw["Policy"]), raw["Policy"]
        )

    # --- the KMS operations ---

    def encrypt(
        self, key_id: str, plaintext: bytes, *, encryption_context: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        record = self.key(key_id)
        context = _encryption_context(encryption_context)
        if not 0 < len(plaintext) <= MAX_PLAINTEXT:
            raise KmsError("ValidationException", f"Plaintext must be 1 to {MAX_PLAINTEXT} bytes")
        self._authorize(record, "kms:Encrypt", None)
        return {
            "CiphertextBlob": _seal(record, plaintext, context),
            "KeyId": record.arn,
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
        recipient: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        blob_key_id = _blob_key_id(ciphertext_blob)
        record = self.key(blob_key_id)
        if key_id is not None and self._resolve(key_id) != record.key_id:
            raise KmsError(
                "IncorrectKeyException",
                "The key ID in the request does not identify the key that encrypted the ciphertext",
            )
        context = _encryption_context(encryption_context)
        verified = self._recipient(recipient)
        self._authorize(record, "kms:Decrypt", verified)
        plaintext = _open(record, ciphertext_blob, context)
        out: dict[str, Any] = {"KeyId": record.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        if verified is None:
            out["Plaintext"] = plaintext
        else:
            out["CiphertextForRecipient"] = envelope_to(verified.public_key, verified.spki_der, plaintext)
        return out

    def generate_data_key(
        self,
        key_id: str,
        *,
        number_of_bytes: int | None = None,
        key_spec: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
        recipient: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        record = self.key(key_id)
        size = _data_key_size(number_of_bytes, key_spec)
        context = _encryption_context(encryption_context)
        verified = self._recipient(recipient)
        self._authorize(record, "kms:GenerateDataKey", verified)
        data_key = os.urandom(size)
        out: dict[str, Any] = {"CiphertextBlob": _seal(record, data_key, context), "KeyId": record.arn}
        if verified is None:
            out["Plaintext"] = data_key
        else:
            out["CiphertextForRecipient"] = envelope_to(verified.public_key, verified.spki_der, data_key)
        return out

    # --- the JSON protocol ---

    def handle(self, target: str, body: Any) -> dict[str, Any]:
        """One request as boto3 sends it (`TrentService.<Op>`, blobs in base64); the JSON answer."""
        if not isinstance(body, dict):
            raise KmsError("SerializationException", "the request body is not a JSON object")
        operation = target.removeprefix("TrentService.")
        if operation == "Encrypt":
            out = self.encrypt(
                _required_str(body, "KeyId"),
                _blob(body, "Plaintext", MAX_PLAINTEXT),
                encryption_context=body.get("EncryptionContext"),
            )
        elif operation == "Decrypt":
            out = self.decrypt(
                _blob(body, "CiphertextBlob", MAX_CIPHERTEXT_BLOB),
                key_id=_optional_str(body, "KeyId"),
                encryption_context=body.get("EncryptionContext"),
                recipient=_recipient_field(body),
            )
        elif operation == "GenerateDataKey":
            out = self.generate_data_key(
                _required_str(body, "KeyId"),
                number_of_bytes=body.get("NumberOfBytes"),
                key_spec=_optional_str(body, "KeySpec"),
                encryption_context=body.get("EncryptionContext"),
                recipient=_recipient_field(body),
            )
        else:
            raise KmsError("UnknownOperationException", f"the stand-in does not serve {target!r}")
        return {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in out.items()}

    # --- internals ---

    def _arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def _resolve(self, key_id: str) -> str:
        prefix = f"arn:aws:kms:{self.region}:{self.account}:key/"
        bare = key_id.removeprefix(prefix)
        if not _KEY_ID_RE.match(bare):
            raise KmsError("NotFoundException", f"Key '{key_id}' does not exist (the stand-in takes key ids and ARNs)")
        return bare

    def _key_path(self, key_id: str) -> Path:
        path = self.keys_dir / f"{self._resolve(key_id)}.json"
        if not path.exists():
            raise KmsError("NotFoundException", f"Key '{self._arn(self._resolve(key_id))}' does not exist")
        return path

    def _recipient(self, recipient: Mapping[str, Any] | None) -> _Recipient | None:
        """Verify a Recipient: its algorithm, its document (root, time, age), its RSA key."""
        if recipient is None:
            return None
        if recipient.get("KeyEncryptionAlgorithm") != KEY_ENCRYPTION_ALGORITHM:
            raise KmsError(
                "ValidationException", f"Recipient.KeyEncryptionAlgorithm must be {KEY_ENCRYPTION_ALGORITHM}"
            )
        document = recipient.get("AttestationDocument")
        if not isinstance(document, bytes) or not 0 < len(document) <= MAX_ATTESTATION_DOCUMENT:
            raise KmsError(
                "ValidationException", f"Recipient.AttestationDocument must be 1 to {MAX_ATTESTATION_DOCUMENT} bytes"
            )
        now = self.clock()
        policy = AttestationPolicy(
            root=self.trust_root, at=now, now=now, max_age=self.max_document_age, allow_debug=self.allow_debug
        )
        try:
            verified = verify_attestation(document, policy)
        except MalformedAttestation as exc:
            raise KmsError(
                "ValidationException", f"Recipient.AttestationDocument is not an attestation document: {exc}"
            ) from exc
        except AttestationError as exc:
            raise KmsError(
                "AccessDeniedException", f"the Recipient attestation document does not verify: {exc}"
            ) from exc
        return _Recipient(verified, *_recipient_key(verified))

    def _authorize(self, record: KeyRecord, action: str, recipient: _Recipient | None) -> None:
        context = recipient_context(recipient.document if recipient is not None else None)
        if not record.policy.allows(action, context):
            raise KmsError(
                "AccessDeniedException",
                f"User is not authorized to perform: {action} on resource: {record.arn} "
                f"because no resource-based policy allows the {action} action",
            )


def _parse_policy(policy: Any) -> KeyPolicy:
    try:
        return KeyPolicy.parse(policy)
    except PolicyError as exc:
        raise KmsError("MalformedPolicyDocumentException", str(exc)) from exc


def _recipient_key(document: AttestationDocument) -> tuple[rsa.RSAPublicKey, bytes]:
    spki = document.public_key
    if spki is None:
        raise KmsError("ValidationException", "the Recipient attestation document carries no public_key")
    try:
        key = load_der_public_key(spki)
    except (ValueError, TypeError) as exc:
        raise KmsError("ValidationException", "the document's public_key is not a DER SubjectPublicKeyInfo") from exc
    if not isinstance(key, rsa.RSAPublicKey) or not MIN_RECIPIENT_RSA_BITS <= key.key_size <= MAX_RECIPIENT_RSA_BITS:
        raise KmsError("ValidationException", "the document's public_key must be an RSA key of 2048 to 4096 bits")
    return key, spki


def _encryption_context(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise KmsError("ValidationException", "EncryptionContext must map strings to strings")
    return dict(raw)


def _data_key_size(number_of_bytes: Any, key_spec: str | None) -> int:
    if (number_of_bytes is None) == (key_spec is None):
        raise KmsError("ValidationException", "give exactly one of NumberOfBytes and KeySpec")
    if key_spec is not None:
        sizes = {"AES_256": 32, "AES_128": 16}
        if key_spec not in sizes:
            raise KmsError("ValidationException", "KeySpec must be AES_256 or AES_128")
        return sizes[key_spec]
    if (
        not isinstance(number_of_bytes, int)
        or isinstance(number_of_bytes, bool)
        or not 0 < number_of_bytes <= MAX_DATA_KEY
    ):
        raise KmsError("ValidationException", f"NumberOfBytes must be 1 to {MAX_DATA_KEY}")
    return number_of_bytes


def _aad(key_id: str, context: Mapping[str, str]) -> bytes:
    canonical = json.dumps(dict(sorted(context.items())), separators=(",", ":"), ensure_ascii=False)
    return _BLOB_AAD + key_id.encode() + b"\x00" + canonical.encode()


def _seal(record: KeyRecord, plaintext: bytes, context: Mapping[str, str]) -> bytes:
    nonce = os.urandom(12)
    sealed = AESGCM(record.material).encrypt(nonce, plaintext, _aad(record.key_id, context))
    key_id = record.key_id.encode()
    return _BLOB_MAGIC + bytes([len(key_id)]) + key_id + nonce + sealed


def _blob_key_id(blob: bytes) -> str:
    if len(blob) < len(_BLOB_MAGIC) + 1 or not blob.startswith(_BLOB_MAGIC):
        raise KmsError("InvalidCiphertextException", "")
    n = blob[len(_BLOB_MAGIC)]
    start = len(_BLOB_MAGIC) + 1
    key_id = blob[start : start + n].decode("ascii", errors="replace")
    if not _KEY_ID_RE.match(key_id):
        raise KmsError("InvalidCiphertextException", "")
    return key_id


def _open(record: KeyRecord, blob: bytes, context: Mapping[str, str]) -> bytes:
    start = len(_BLOB_MAGIC) + 1 + len(record.key_id)
    nonce, sealed = blob[start : start + 12], blob[start + 12 :]
    try:
        return AESGCM(record.material).decrypt(nonce, sealed, _aad(record.key_id, context))
    except (InvalidTag, ValueError) as exc:
        raise KmsError("InvalidCiphertextException", "") from exc


def _required_str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise KmsError("ValidationException", f"{name} is required")
    return value


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise KmsError("ValidationException", f"{name} must be a string")
    return value


def _blob(body: Mapping[str, Any], name: str, max_size: int) -> bytes:
    value = body.get(name)
    if not isinstance(value, str):
        raise KmsError("ValidationException", f"{name} is required (base64)")
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise KmsError("SerializationException", f"{name} is not base64") from exc
    if not 0 < len(raw) <= max_size:
        raise KmsError("ValidationException", f"{name} must be 1 to {max_size} bytes")
    return raw


def _recipient_field(body: Mapping[str, Any]) -> dict[str, Any] | None:
    raw = body.get("Recipient")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise KmsError("ValidationException", "Recipient must be an object")
    out: dict[str, Any] = {"KeyEncryptionAlgorithm": raw.get("KeyEncryptionAlgorithm")}
    if raw.get("AttestationDocument") is not None:
        out["AttestationDocument"] = _blob(raw, "AttestationDocument", MAX_ATTESTATION_DOCUMENT)
    return out


# --- HTTP ------------------------------------------------------------------------------------------


class KmsHttpServer(ThreadingHTTPServer):
    """The stand-in on 127.0.0.1, speaking the KMS JSON 1.1 protocol."""

    daemon_threads = True

    def __init__(self, kms: LocalKms, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.kms = kms

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: KmsHttpServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        try:
            body = self._read_json()
            answer = self.server.kms.handle(self.headers.get("X-Amz-Target", ""), body)
        except KmsError as exc:
            self._send(exc.status, {"__type": exc.code, "Message": exc.message}, error=exc.code)
            return
        except Exception as exc:  # the stand-in answers like KMS, never with a traceback page
            self._send(
                500, {"__type": "KMSInternalException", "Message": type(exc).__name__}, error="KMSInternalException"
            )
            return
        self._send(200, answer)

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError as exc:
            raise KmsError("SerializationException", "Content-Length is required") from exc
        if not 0 <= length <= MAX_REQUEST:
            raise KmsError("SerializationException", f"request bodies are at most {MAX_REQUEST} bytes")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise KmsError("SerializationException", "the request body is not JSON") from exc

    def _send(self, status: int, payload: Mapping[str, Any], *, error: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", JSON_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if error is not None:
            self.send_header("x-amzn-ErrorType", error)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: requests carry attestation documents, nothing worth a log line each


def make_server(kms: LocalKms, port: int = 0) -> KmsHttpServer:
    return KmsHttpServer(kms, port)


# --- command line ----------------------------------------------------------------------------------


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def _trust_root(args: argparse.Namespace) -> TrustRoot:
    if args.aws_root:
        return TrustRoot.aws()
    if args.root is None:
        raise SystemExit("give --root PEM (the mock NSM's root.pem) or --aws-root")
    return TrustRoot.from_pem(Path(args.root).read_bytes())


def _policy_arg(args: argparse.Namespace) -> dict[str, Any]:
    if args.policy is not None:
        policy: dict[str, Any] = json.loads(Path(args.policy).read_text())
        return policy
    if not args.pcr0:
        raise SystemExit("give --policy FILE or at least one --pcr0 HEX")
    return log_key_policy([bytes.fromhex(p) for p in args.pcr0], allow_encrypt=args.allow_encrypt)


def _serve(args: argparse.Namespace) -> int:
    kms = LocalKms(
        Path(args.state),
        trust_root=_trust_root(args),
        clock=_wall_clock,
        max_document_age=timedelta(seconds=args.max_document_age),
        region=args.region,
    )
    server = make_server(kms, args.port)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(
        json.dumps({"event": "ready", "endpoint": server.url, "region": args.region, "state": str(args.state)}),
        flush=True,
    )
    with server:
        server.serve_forever(poll_interval=0.2)
    return 0


def _create_key(args: argparse.Namespace) -> int:
    kms = LocalKms(Path(args.state), trust_root=_no_root(), clock=_wall_clock, region=args.region)
    key_id = kms.create_key(_policy_arg(args))
    print(json.dumps({"KeyId": key_id, "Arn": kms.key(key_id).arn}))
    return 0


def _put_key_policy(args: argparse.Namespace) -> int:
    kms = LocalKms(Path(args.state), trust_root=_no_root(), clock=_wall_clock, region=args.region)
    kms.put_key_policy(args.key_id, _policy_arg(args))
    return 0


def _no_root() -> TrustRoot:
    return TrustRoot(b"", "none (key management only)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloister.dev.kms", description="A local AWS KMS stand-in (dev only)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the KMS JSON protocol on 127.0.0.1")
    serve.add_argument("--state", required=True, help="state directory (keys/)")
    serve.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    serve.add_argument("--root", help="PEM trust root for Recipient documents (the mock NSM's root.pem)")
    serve.add_argument("--aws-root", action="store_true", help="trust AWS's Nitro root instead")
    serve.add_argument("--max-document-age", type=float, default=DEFAULT_MAX_DOCUMENT_AGE.total_seconds())
    serve.set_defaults(handler=_serve)
    for name, handler, help_text in (
        ("create-key", _create_key, "create a symmetric key; prints its KeyId"),
        ("put-key-policy", _put_key_policy, "replace a key's policy"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--state", required=True)
        if name == "put-key-policy":
            p.add_argument("--key-id", required=True)
        p.add_argument("--policy", help="a key policy (JSON file)")
        p.add_argument("--pcr0", action="append", help="hex PCR0 allowed to unseal (repeat for predecessors)")
        p.add_argument("--allow-encrypt", action="store_true", help="also allow an unconditioned kms:Encrypt")
        p.set_defaults(handler=handler)
    for p in sub.choices.values():
        p.add_argument("--region", default=DEFAULT_REGION)
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
    except KmsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
