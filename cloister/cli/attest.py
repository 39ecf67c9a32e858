"""`cloister attest`: check AWS Nitro Enclaves attestation documents.

    cloister attest verify FILE|- [--root aws|mock|PEM_PATH] [--at ISO8601|doc] [--max-age SECONDS]
                           [--expect-pcr I=HEX ...] [--nonce HEX] [--allow-debug] [--json]

Exit status: 0 when every check holds, 1 when the document is rejected
(`attestation rejected: <reason>: <message>` on stderr), 2 for unusable input or arguments.
Registration imports nothing heavy; the verifier is loaded by the handler.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta
from typing import Any, Literal

MAX_INPUT = 64 * 1024  # a document is at most 16 KiB; base64 and line breaks stay well below this


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "attest",
        help="verify AWS Nitro Enclaves attestation documents",
        description="Verify AWS Nitro Enclaves attestation documents.",
    )
    verbs = p.add_subparsers(dest="attest_verb", metavar="VERB", required=True)
    _register_verify(verbs)
    _register_enclave(verbs)


def _register_enclave(verbs: Any) -> None:
    e: argparse.ArgumentParser = verbs.add_parser(
        "enclave",
        help="check a running Cloister enclave through its relay, from a client's side",
        description="Fetch the enclave's attestation from a relay with a fresh nonce, verify it, and print "
        "the keys it binds. Exit 0 if every check holds, 1 if rejected, 2 for bad arguments, 3 if the relay "
        "cannot be reached.",
    )
    e.add_argument("--relay", required=True, metavar="URL", help="the relay's base URL, e.g. http://127.0.0.1:8440")
    e.add_argument("--trust-root", default="aws", metavar="aws|mock|PEM_PATH", help="trust anchor (default aws)")
    e.add_argument("--expect-pcr", action="append", default=[], metavar="I=HEX", help="require PCR I (repeatable)")
    e.add_argument("--allow-debug", action="store_true", help="accept debug-mode documents (PCR0 all zero)")
    e.add_argument("--json", action="store_true", help="print the verified facts as JSON")
    e.set_defaults(handler=_enclave)


def _enclave(args: argparse.Namespace) -> int:
    import base64
    import json
    import secrets
    import urllib.error
    import urllib.request
    from datetime import UTC

    from cloister.audit.trustroot import TrustRootError, load_trust_root, parse_pcr_spec
    from cloister.verify.attestation import AttestationError, AttestationPolicy
    from cloister.verify.enclave_identity import verify_enclave
    from cloister.verify.errors import DecodeError, VerificationError

    try:
        root = load_trust_root(args.trust_root)
        pcrs = dict(parse_pcr_spec(spec) for spec in args.expect_pcr)
    except TrustRootError as exc:
        print(f"cloister attest enclave: {exc}", file=sys.stderr)
        return 2
    nonce = secrets.token_bytes(16)
    url = f"{args.relay.rstrip('/')}/attestation?nonce={nonce.hex()}"
    if not url.startswith(("http://", "https://")):
        print("cloister attest enclave: --relay must be an http(s) URL", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=15) as resp:  # noqa: S310 (scheme checked above)
            body = json.loads(resp.read(1 << 20))
        document = base64.b64decode(body["document"], validate=True)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        print(f"cloister attest enclave: cannot fetch {url}: {exc}", file=sys.stderr)
        return 3
    except (ValueError, KeyError, TypeError) as exc:
        print(f"cloister attest enclave: the relay's answer is not an attestation: {exc}", file=sys.stderr)
        return 1
    now = datetime.now(UTC)  # the CLI reads the clock; the verifier never does
    policy = AttestationPolicy(
        root=root,
        at=now,
        now=now,
        max_age=timedelta(minutes=5),
        expected_pcrs=pcrs,
        nonce=nonce,
        allow_debug=args.allow_debug,
    )
    try:
        verified = verify_enclave(document, policy)
    except (AttestationError, VerificationError, DecodeError) as exc:
        reason = getattr(exc, "reason", "malformed")
        print(f"attestation rejected: {reason}: {exc}", file=sys.stderr)
        return 1
    b, doc = verified.binding, verified.document
    facts: dict[str, Any] = {
        "origin": b.origin,
        "log_key": b.log_key.hex(),
        "log_verifier_key": b.log_verifier().vkey,
        "grant_key": b.grant_key.hex(),
        "module_id": doc.module_id,
        "timestamp": doc.timestamp.isoformat(),
        "pcrs": {str(i): doc.pcrs[i].hex() for i in (0, 1, 2) if i in doc.pcrs},
        "trust_root": root.name,
        "nonce": nonce.hex(),
    }
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        pinned = "as expected" if pcrs else "not pinned (pass --expect-pcr)"
        print(f"enclave verified: {root.name}, fresh nonce, PCRs {pinned}")
        for key, value in facts.items():
            if key != "pcrs":
                print(f"  {key:17} {value}")
        for index in (0, 1, 2):
            if index in doc.pcrs:
                print(f"  PCR{index:<14} {doc.pcrs[index].hex()}")
    return 0


def _register_verify(verbs: Any) -> None:
    v: argparse.ArgumentParser = verbs.add_parser(
        "verify",
        help="verify one attestation document (base64 or raw CBOR)",
        description="Verify one attestation document, base64 (one line or wrapped) or raw CBOR. "
        "Exit 0 if every check holds, 1 if it is rejected, 2 for unusable input.",
    )
    v.add_argument("file", metavar="FILE|-", help="the document; - reads standard input")
    v.add_argument(
        "--root",
        default="aws",
        metavar="aws|mock|PEM_PATH",
        help="trust anchor: AWS Nitro Enclaves Root-G1 (default), the mock NSM's root "
        "($CLOISTER_STATE/mock-nsm/root.pem, default state dir .cloister), or a PEM file",
    )
    v.add_argument(
        "--at",
        metavar="ISO8601|doc",
        help="time at which the certificates must be valid: now (default), an ISO 8601 time "
        "(UTC if it has no offset), or 'doc' for the document's own timestamp",
    )
    v.add_argument("--max-age", type=float, metavar="SECONDS", help="reject documents older than this (vs. now)")
    v.add_argument(
        "--expect-pcr",
        action="append",
        default=[],
        metavar="I=HEX",
        help="require PCR I to equal HEX (repeatable)",
    )
    v.add_argument("--nonce", metavar="HEX", help="require the document's nonce to equal HEX")
    v.add_argument("--allow-debug", action="store_true", help="accept debug-mode documents (PCR0 all zero)")
    v.add_argument("--json", action="store_true", help="print the verified document as JSON")
    v.set_defaults(handler=_verify)


class _Usage(Exception):
    """Unusable input or arguments: one line on stderr, exit 2."""


def _verify(args: argparse.Namespace) -> int:
    try:
        return _verify_or_raise(args)
    except _Usage as exc:
        print(f"cloister attest verify: {exc}", file=sys.stderr)
        return 2


def _verify_or_raise(args: argparse.Namespace) -> int:
    from datetime import UTC

    from cloister.verify.attestation import DOCUMENT_TIME, AttestationPolicy, verify_attestation
    from cloister.verify.errors import DecodeError, VerificationError

    now = datetime.now(UTC)  # the CLI reads the clock; the verifier never does
    at: datetime | Literal["document"] = now
    if args.at == "doc":
        at = DOCUMENT_TIME
    elif args.at is not None:
        at = _parse_time(args.at)
    if args.max_age is not None and args.max_age < 0:
        raise _Usage("--max-age must not be negative")
    max_age = None if args.max_age is None else timedelta(seconds=args.max_age)
    expected = dict(_parse_pcr(spec) for spec in args.expect_pcr)
    nonce = None if args.nonce is None else _parse_hex("--nonce", args.nonce)
    document = _decode_input(_read_input(args.file))
    try:
        root = _load_root(args.root)
        policy = AttestationPolicy(
            root=root,
            at=at,
            now=now,
            max_age=max_age,
            expected_pcrs=expected,
            nonce=nonce,
            allow_debug=args.allow_debug,
        )
        doc = verify_attestation(document, policy)
    except (DecodeError, VerificationError) as exc:
        reason = getattr(exc, "reason", "error")
        detail = getattr(exc, "detail", str(exc))
        print(f"attestation rejected: {reason}: {detail}", file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps(_as_json(doc, root.name, root.sha256, at), indent=2))
    else:
        pcr0 = doc.pcrs.get(0, b"").hex()
        print(f"attestation verified: module {doc.module_id}, {_iso(doc.timestamp)}, PCR0 {pcr0}, root {root.name}")
    return 0


def _parse_time(text: str) -> datetime:
    from datetime import UTC

    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _Usage(f"--at: {text!r} is neither an ISO 8601 time nor 'doc'") from exc
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _parse_hex(flag: str, text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise _Usage(f"{flag}: {text!r} is not hex") from exc


def _parse_pcr(spec: str) -> tuple[int, bytes]:
    from cloister.audit.trustroot import TrustRootError, parse_pcr_spec

    try:
        return parse_pcr_spec(spec)
    except TrustRootError as exc:
        raise _Usage(str(exc)) from exc


def _read_input(name: str) -> bytes:
    from cloister.cli.input import InputError, read_capped

    try:
        return read_capped(name, MAX_INPUT, "an attestation document")
    except InputError as exc:
        raise _Usage(str(exc)) from exc


def _decode_input(data: bytes) -> bytes:
    """Base64 (one line or wrapped) or raw CBOR, told apart by the alphabet; returns the CBOR bytes."""
    import base64
    import binascii
    import re

    from cloister.verify.cose import decode_cbor
    from cloister.verify.errors import DecodeError

    text = data.strip()
    if not text:
        raise _Usage("the input is empty")
    if re.fullmatch(rb"[A-Za-z0-9+/=\s]+", text):
        try:
            data = base64.b64decode(b"".join(text.split()), validate=True)
        except binascii.Error as exc:
            raise _Usage(f"the input looks like base64 but does not decode: {exc}") from exc
    try:
        decode_cbor(data, what="input")
    except DecodeError as exc:
        raise _Usage(f"the input is neither base64 nor a CBOR item ({exc})") from exc
    return data


def _load_root(choice: str) -> Any:
    # Shared with `cloister audit --trust-root` (cloister.audit.trustroot).
    from cloister.audit.trustroot import TrustRootError, load_trust_root

    try:
        return load_trust_root(choice)
    except TrustRootError as exc:
        raise _Usage(str(exc)) from exc


def _as_json(doc: Any, root_name: str, root_sha256: str, at: Any) -> dict[str, Any]:
    from cryptography import x509

    def hexor(b: bytes | None) -> str | None:
        return None if b is None else b.hex()

    ders = [*doc.cabundle, doc.certificate]
    certs = []
    for i, der in enumerate(ders):
        c = x509.load_der_x509_certificate(der)
        role = "root" if i == 0 else "leaf" if i == len(ders) - 1 else "intermediate"
        certs.append(
            {
                "role": role,
                "subject": c.subject.rfc4514_string(),
                "issuer": c.issuer.rfc4514_string(),
                "serial": format(c.serial_number, "x"),
                "not_before": _iso(c.not_valid_before_utc),
                "not_after": _iso(c.not_valid_after_utc),
            }
        )
    return {
        "verified": True,
        "root": {"name": root_name, "sha256": root_sha256},
        "checked_at": "document" if isinstance(at, str) else _iso(at),
        "module_id": doc.module_id,
        "digest": doc.digest,
        "timestamp": _iso(doc.timestamp),
        "timestamp_ms": doc.timestamp_ms,
        "pcrs": {str(i): v.hex() for i, v in sorted(doc.pcrs.items())},
        "public_key": hexor(doc.public_key),
        "user_data": hexor(doc.user_data),
        "nonce": hexor(doc.nonce),
        "certificates": certs,
    }


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
