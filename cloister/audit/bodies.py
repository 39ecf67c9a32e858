"""Reading and checking the bodies log entries commit to: a decision's arguments, an outcome's result.

A relay serves a body only to holders of its auditor token, exactly as it stored it: plain JSON,
or sealed to the auditor key (`cloister.audit.sealed`). Either way nothing is believed until it
checks: a sealed body must open with the auditor's private key for this entry and kind, and the
bytes must hash (RFC 8785 canonical JSON, SHA-256) to the commitment in the entry, which the
caller has proven into an attested checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cloister.audit.errors import MissingData, NotAuthorized
from cloister.audit.sealed import BodyOpener, is_sealed, parse_sealed
from cloister.audit.source import MAX_BODY, HttpSource, LogSource
from cloister.verify.canonical import canonical_sha256, parse_json
from cloister.verify.entries import DecisionEntry, OutcomeEntry
from cloister.verify.errors import VerificationError

__all__ = ["MAX_STORED_BODY", "CheckedBody", "body_commitment", "check_body", "fetch_body", "read_checked_body"]

MAX_STORED_BODY = MAX_BODY + 1024  # a sealed body adds its header and tag


@dataclass(frozen=True)
class CheckedBody:
    index: int
    kind: str
    sealed_to: str | None  # the auditor key id (hex) when the body was stored sealed
    value: Any  # the JSON value, whose canonical SHA-256 is the entry's commitment

    def as_json(self) -> dict[str, Any]:
        sealed = {"sealed": True, "sealed_to": self.sealed_to} if self.sealed_to is not None else {}
        return {"status": "verified", **sealed, "body": self.value}


def body_commitment(entry: Any) -> tuple[str, bytes] | None:
    """(kind, SHA-256) of the body an entry commits to, or None (an outcome without a result, others)."""
    if isinstance(entry, DecisionEntry):
        return "args", entry.args_sha256
    if isinstance(entry, OutcomeEntry) and entry.result_sha256 is not None:
        return "result", entry.result_sha256
    return None


def fetch_body(source: LogSource, index: int, kind: str, token: str | None) -> bytes:
    """The stored body as served (`body/<index>/<kind>`); MissingData when none is kept (or it was
    redacted), NotAuthorized when the relay wants (another) auditor token."""
    path = f"body/{index}/{kind}"
    if isinstance(source, HttpSource):
        return source.read(path, max_size=MAX_STORED_BODY, bearer=token)
    return source.read(path, max_size=MAX_STORED_BODY)


def check_body(
    data: bytes, *, index: int, kind: str, commitment: bytes, key: X25519PrivateKey | BodyOpener | None
) -> CheckedBody:
    """Open (if sealed, CLS1 or CLS2) and check a body against the entry's commitment.
    VerificationError if a sealed body cannot be opened with `key`, or if the body is not the one
    committed to. A caller checking many bodies passes one `BodyOpener`, which sets up each CLS2
    sealing context once."""
    what = f"body/{index}/{kind}"
    sealed_to = None
    if is_sealed(data):
        sealed_to = parse_sealed(data).key_id.hex()
        if key is None:
            raise VerificationError(
                f"{what} is sealed to auditor key {sealed_to}: give the X25519 private key to open it"
            )
        opener = key if isinstance(key, BodyOpener) else BodyOpener(key, max_contexts=1)
        data = opener.open(index, kind, data)
    value = parse_json(data, what=what, max_bytes=MAX_BODY)
    if canonical_sha256(value) != commitment:
        raise VerificationError(
            f"{what}: the body's SHA-256 (RFC 8785 canonical JSON) is not the one entry {index} commits to"
        )
    return CheckedBody(index, kind, sealed_to, value)


def read_checked_body(
    source: LogSource, index: int, entry: Any, *, token: str | None, key: X25519PrivateKey | BodyOpener | None
) -> dict[str, Any]:
    """What `cloister audit inclusion --bodies` reports for an entry's body: verified, not retained,
    or not authorized; a body that is served but does not check raises VerificationError."""
    committed = body_commitment(entry)
    if committed is None:
        return {}
    kind, commitment = committed
    try:
        data = fetch_body(source, index, kind, token)
    except MissingData:
        return {kind: {"status": "not retained"}}
    except NotAuthorized as exc:
        return {kind: {"status": "not authorized", "detail": str(exc)}}
    return {kind: check_body(data, index=index, kind=kind, commitment=commitment, key=key).as_json()}
