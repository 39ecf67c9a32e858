"""Admin keys, signing a validated bundle, and pushing a signed bundle to a relay.

The relay's `POST /admin/policy` takes the signed bundle's bytes and forwards them to the
enclave, which alone decides (pinned admin key, version above the one in force). It answers
`{"version": N, "bundle_sha256": hex}` (200) or `{"error": "..."}` (400, 409, 413: refused;
503: the enclave is unavailable).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from cloister.enclave.bundle import read_bundle_dir
from cloister.policytools.findings import Validation
from cloister.policytools.source import InputError, read_signed
from cloister.policytools.validate import validate_files
from cloister.verify.bundle import admin_key_id, origin_problem, read_bundle_header, sign_bundle
from cloister.verify.cose import parse_cose_sign1
from cloister.verify.errors import DecodeError

MAX_ANSWER = 1 << 16
DEFAULT_VALIDITY = timedelta(days=90)  # `sign` without --not-after
MAX_VALIDITY = timedelta(days=366)


@dataclass(frozen=True)
class AdminKeyInfo:
    private_path: Path
    public_path: Path
    public_hex: str  # what enclave.toml's admin_keys pins
    key_id: str  # what a signed bundle's header names


def key_info(key: ed25519.Ed25519PublicKey) -> tuple[str, str]:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex(), admin_key_id(key)


def keygen(out: Path) -> AdminKeyInfo:
    """A new admin key: `out` (PKCS#8 PEM, mode 0600, never overwritten) and `out.pub` (PEM)."""
    pub_path = out.with_name(out.name + ".pub")
    for p in (out, pub_path):
        if p.exists():
            raise InputError(f"{p}: already exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        pub_path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    except OSError as exc:
        raise InputError(f"{out}: cannot write: {exc.strerror}") from exc
    public_hex, kid = key_info(key.public_key())
    return AdminKeyInfo(private_path=out, public_path=pub_path, public_hex=public_hex, key_id=kid)


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such key file") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"{path}: admin keys are Ed25519; this is a {type(key).__name__}")
    return key


@dataclass(frozen=True)
class Signed:
    out: Path
    version: int
    sha256: str  # of the payload: the hash the enclave logs and checkpoints name
    key_id: str
    public_hex: str
    size: int
    origin: str  # the only log whose enclave loads it
    not_after: int  # Unix seconds: no enclave loads it later


def resolve_not_after(text: str | None, now: datetime) -> int:
    """`--not-after` as Unix seconds: an ISO 8601 time with its zone, or `now` + DEFAULT_VALIDITY.

    Refused: a time without a zone (whose zone would be a guess), one not after `now`, one more
    than MAX_VALIDITY ahead (bundles are meant to expire; sign again instead).
    """
    if text is None:
        return int((now + DEFAULT_VALIDITY).timestamp())
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise InputError(f"--not-after {text!r}: not an ISO 8601 time (e.g. 2026-06-01T00:00:00Z)") from exc
    if at.tzinfo is None or "T" not in text.upper():
        raise InputError(f"--not-after {text!r}: give a date, a time and a zone, e.g. 2026-06-01T00:00:00Z")
    if at <= now:
        raise InputError(f"--not-after {text!r} is not in the future (it is {now:%Y-%m-%dT%H:%M:%SZ})")
    if at - now > MAX_VALIDITY:
        raise InputError(
            f"--not-after {text!r} is more than {MAX_VALIDITY.days} days away; bundles are meant to expire: "
            "sign a new version before then"
        )
    return int(at.timestamp())


def sign_dir(
    bundle_dir: Path,
    key: ed25519.Ed25519PrivateKey,
    version: int,
    out: Path,
    *,
    origin: str,
    not_after: int,
) -> tuple[Validation, Signed | None]:
    """Validate, then sign for the log `origin`, loadable until `not_after` (Unix seconds).

    An invalid bundle is not signed (the Validation says why)."""
    if not bundle_dir.is_dir():
        raise InputError(f"{bundle_dir}: not a directory")
    problem = origin_problem(origin)
    if problem is not None:
        raise InputError(f"--origin: {problem}")
    files = read_bundle_dir(bundle_dir)
    validation = validate_files(files)
    if not validation.ok:
        return validation, None
    data = sign_bundle(files, version, key, origin=origin, not_after=not_after)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(out)  # never leave a half-written bundle under the name given
    except OSError as exc:
        raise InputError(f"{out}: cannot write: {exc.strerror}") from exc
    payload = parse_cose_sign1(data, max_size=len(data)).payload
    public_hex, kid = key_info(key.public_key())
    return validation, Signed(
        out=out,
        version=version,
        sha256=hashlib.sha256(payload).hexdigest(),
        key_id=kid,
        public_hex=public_hex,
        size=len(data),
        origin=origin,
        not_after=not_after,
    )


@dataclass(frozen=True)
class PushResult:
    outcome: Literal["in-force", "refused", "unavailable", "unreachable"]
    message: str
    version: int | None = None
    sha256: str | None = None
    http_status: int | None = None

    @property
    def exit_code(self) -> int:
        return {"in-force": 0, "refused": 1, "unavailable": 3, "unreachable": 3}[self.outcome]


def read_admin_token(path: Path) -> str:
    """The relay's admin token from a file (its admin_token_file); InputError if unreadable or empty."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--admin-token-file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not token:
        raise InputError(f"--admin-token-file: {path} is empty")
    return token


def push(bundle: Path, relay: str, *, timeout: float = 30.0, admin_token: str | None = None) -> PushResult:
    """POST a signed bundle to `<relay>/admin/policy` with the relay's admin token (it refuses a
    push without it) and report what the enclave said."""
    if not relay.startswith(("http://", "https://")):
        raise InputError(f"--relay {relay!r}: must be an http(s) URL")
    data = read_signed(bundle)
    try:
        read_bundle_header(data)  # refuse to send what is not a bundle at all
    except DecodeError as exc:
        raise DecodeError(f"{bundle}: not a signed bundle: {exc}") from exc
    url = relay.rstrip("/") + "/admin/policy"
    req = urllib.request.Request(  # noqa: S310 (scheme checked above)
        url,
        data=data,
        method="POST",
        headers={"Content-Type": "application/octet-stream"},
    )
    if admin_token is not None:
        req.add_header("Authorization", f"Bearer {admin_token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            status, body = resp.status, resp.read(MAX_ANSWER)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(MAX_ANSWER)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return PushResult("unreachable", f"cannot reach {url}: {reason}")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        text = body[:200].decode("utf-8", "replace").strip()
        return PushResult(
            "refused" if status < 500 else "unavailable",
            f"{url} answered HTTP {status} without the expected JSON: {text!r}",
            http_status=status,
        )
    if status == 200 and isinstance(answer.get("version"), int):
        return PushResult(
            "in-force",
            f"version {answer['version']} is in force",
            version=answer["version"],
            sha256=str(answer.get("bundle_sha256", "")),
            http_status=status,
        )
    error = str(answer.get("error") or answer)
    if status == 503:
        return PushResult("unavailable", error, http_status=status)
    if status == 404:
        error = f"{url} not found (is --relay the relay's base URL?): {error}"
    return PushResult("refused", error, http_status=status)
