"""`cloister audit`: verify a Cloister log from the outside, trusting neither the relay nor its storage.

    cloister audit checkpoint --log URL [--trust-root aws|mock|PEM] [--expect-pcr I=HEX ...]
                              [--witness NAME=VKEY ... [--quorum K]]
    cloister audit inclusion  --log URL (--index N | --grant FILE) [--bodies [--auditor-token-file F] [--body-key K]]
    cloister audit body       --log URL --index N --auditor-token-file FILE [--key X25519-PEM]
    cloister audit consistency --log URL --from SIZE [--to SIZE]
    cloister audit replay     --log URL|DIR [--json [--no-calls]] [--no-progress] [--jobs N] [--generic --key VKEY]
    cloister audit report     --log URL|DIR [--from T] [--to T] [--format html|json|csv] [-o FILE]
                              [--witness NAME=VKEY ... [--quorum K]]
    cloister audit receipt    --log URL --index N > receipt
    cloister audit verify-receipt FILE [--trust-root ...] [--expect-pcr ...]
    cloister audit verify-note --key VKEY [--key ...] FILE

The commands that talk to a relay share --trust-root (default aws), --expect-pcr, --allow-debug,
--origin, --state and --timeout. Every checkpoint they verify is remembered per origin under
--state and proven consistent with the one remembered before.

Exit status: 0 verified; 1 bad data (the log, a tile, a note, a receipt does not verify; the
message says what and where); 2 unusable arguments; 3 the log could not be read (network,
timeout, HTTP error); 4 a fork: the log signed two views that cannot both be true.
Registration imports nothing heavy; the handlers load cloister.audit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_BAD, EXIT_USAGE, EXIT_FETCH, EXIT_FORK = 0, 1, 2, 3, 4
MAX_INPUT = 2 << 20  # grants, receipts and notes are far smaller


class _Usage(Exception):
    """Unusable input or arguments: one line on stderr, exit 2."""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "audit",
        help="verify the audit log: attested checkpoints, proofs, full replays, receipts",
        description="Verify a Cloister audit log from the outside. Exit 0 verified, 1 bad data, 2 unusable "
        "arguments, 3 the log could not be read, 4 fork detected.",
    )
    verbs = p.add_subparsers(dest="audit_verb", metavar="VERB", required=True)

    v = _verb(
        verbs,
        "checkpoint",
        _checkpoint,
        "fetch and verify an attested checkpoint; detect forks",
        "Fetch the latest checkpoint with an attestation for a fresh nonce, verify both, and prove it "
        "consistent with the checkpoint remembered for this log (from tiles). A fork exits 4. With --witness, "
        "also verify the witnesses' cosignatures on the relay's checkpoint.cosigned against the pinned keys.",
    )
    _log_args(v)
    v.add_argument(
        "--witness",
        action="append",
        default=[],
        metavar="NAME=VKEY",
        help="pin a C2SP witness's cosignature key (repeatable); the cosigned checkpoint must verify",
    )
    v.add_argument(
        "--quorum", type=int, default=None, metavar="K", help="cosignatures required (default: every --witness)"
    )

    v = _verb(
        verbs,
        "inclusion",
        _inclusion,
        "prove that one entry (or a grant's entry) is in the log",
        "Verify an attested checkpoint, read the entry from its bundle, prove its inclusion from the hash "
        "tiles and print it as JSON. With --grant, also check that the entry is the allow the grant describes.",
    )
    _log_args(v)
    which = v.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=_nonneg, metavar="N", help="the entry's index")
    which.add_argument("--grant", metavar="FILE", help="a grant (COSE_Sign1, raw or base64): check its decision entry")
    v.add_argument(
        "--bodies",
        action="store_true",
        help="also fetch the bodies the entry commits to and check their SHA-256 (if the relay kept them "
        "and you hold its auditor token)",
    )
    _body_args(v, key_option="--body-key", required=False)

    v = _verb(
        verbs,
        "body",
        _body,
        "fetch one entry's body (arguments or result), open it, and check it against the entry",
        "Verify an attested checkpoint, prove the entry's inclusion, fetch the body it commits to (a decision's "
        "arguments, an outcome's result) with the relay's auditor token, open it with the auditor's X25519 "
        "private key if it is stored sealed, and check its SHA-256 (RFC 8785) against the entry. Prints JSON.",
    )
    _log_args(v)
    v.add_argument("--index", type=_nonneg, required=True, metavar="N", help="the decision's or outcome's index")
    _body_args(v, key_option="--key", required=True)

    v = _verb(
        verbs,
        "consistency",
        _consistency,
        "prove append-only growth between two tree sizes",
        "Verify an attested checkpoint and prove, from the hash tiles, that the tree of --from entries is a "
        "prefix of the tree of --to entries (default: the checkpoint's size).",
    )
    _log_args(v)
    v.add_argument("--from", dest="size_from", type=_nonneg, required=True, metavar="SIZE")
    v.add_argument("--to", dest="size_to", type=_nonneg, metavar="SIZE")

    v = _verb(
        verbs,
        "replay",
        _replay,
        "recompute the whole log and check every entry",
        "Read every entry bundle and hash tile, recompute the root and compare it with the verified "
        "checkpoint, decode every entry, and check the structure across entries (outcomes, key "
        "introductions, policy versions). --log may be a relay URL or a storage directory.",
    )
    _log_args(v, url_only=False)
    v.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    v.add_argument("--no-calls", action="store_true", help="with --json: leave out the per-call records (`calls`)")
    v.add_argument(
        "--no-recheck-signatures",
        action="store_true",
        help="trust the enclave's recorded verdict on upstream response signatures instead of verifying each "
        "again (about 100-140 us per signed outcome); missing or invalid ones are still reported",
    )
    v.add_argument(
        "--jobs",
        type=int,
        default=0,
        metavar="N",
        help="worker processes (default: the number of CPUs; 1 = in this process)",
    )
    v.add_argument(
        "--accept-pcr0",
        action="append",
        default=[],
        metavar="HEX",
        help="an earlier image's PCR0 that may have run this log (repeatable): key entries may carry "
        "it or --expect-pcr's PCR0, as the enclave's own predecessor_pcr0 allows upgrades",
    )
    v.add_argument(
        "--generic",
        action="store_true",
        help="any C2SP tlog-tiles log: verify the tree and the checkpoint with --key, do not decode entries",
    )
    v.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="VKEY",
        help="with --generic: a note verifier key name+id+base64 (repeatable)",
    )

    v = _verb(
        verbs,
        "report",
        _report,
        "write an evidence report (HTML, JSON or CSV) of a verified log",
        "Verify the log as `replay` does (attested checkpoint or key entries, every entry and tile), then write "
        "one self-contained file: the checkpoint, witness cosignatures (with --witness), policy versions and "
        "their signers, key introductions, every call with its decision, reason, payment and outcome (ISO "
        "times, receipt links), denials by reason, payments by agent, charts, and what was verified and what "
        "was taken on trust. Exit 0 verified, 1 written but NOT verified (the file says why).",
    )
    _log_args(v, url_only=False)
    v.add_argument(
        "--from", dest="time_from", metavar="T", help="calls decided at or after T (ISO 8601, UTC if no zone)"
    )
    v.add_argument("--to", dest="time_to", metavar="T", help="calls decided before T (ISO 8601)")
    v.add_argument("--format", choices=("html", "json", "csv"), default="html", help="default html")
    v.add_argument("-o", "--output", metavar="FILE", help="write here (default: standard output)")
    v.add_argument("--jobs", type=int, default=0, metavar="N", help="replay worker processes (default: CPUs)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    v.add_argument(
        "--accept-pcr0", action="append", default=[], metavar="HEX", help="an earlier image's PCR0 (as replay)"
    )
    v.add_argument(
        "--witness", action="append", default=[], metavar="NAME=VKEY", help="pin a witness (as checkpoint; URL only)"
    )
    v.add_argument("--quorum", type=int, default=None, metavar="K", help="cosignatures required")

    v = _verb(
        verbs,
        "receipt",
        _receipt,
        "print an offline-verifiable proof of one entry",
        "Print a self-contained receipt for one entry: a C2SP tlog-proof whose extra data carries the entry "
        "and the attestation that binds the checkpoint (see cloister/audit/receipt.py).",
    )
    _log_args(v)
    v.add_argument("--index", type=_nonneg, required=True, metavar="N")

    v = _verb(
        verbs,
        "verify-receipt",
        _verify_receipt,
        "verify a receipt offline",
        "Verify a receipt without network: the attestation as of its own time, the log key it binds, the "
        "checkpoint signature, the entry's inclusion. Prints the entry.",
    )
    v.add_argument("file", metavar="FILE|-")
    _trust_args(v)
    v.add_argument("--json", action="store_true", help="print the result as JSON")

    v = _verb(
        verbs,
        "verify-note",
        _verify_note,
        "verify any C2SP signed note",
        "Verify a C2SP signed note (e.g. a checkpoint of any transparency log) against verifier keys.",
    )
    v.add_argument("file", metavar="FILE|-")
    v.add_argument(
        "--key",
        action="append",
        required=True,
        metavar="VKEY",
        help="verifier key, name+hex id+base64 (repeatable), or @FILE holding one per line",
    )
    v.add_argument("--json", action="store_true", help="print the result as JSON")


def _body_args(v: argparse.ArgumentParser, *, key_option: str, required: bool) -> None:
    v.add_argument(
        "--auditor-token-file",
        required=required,
        metavar="FILE",
        help="the relay's auditor token (its auditor_token_file): the relay serves bodies to nobody else",
    )
    v.add_argument(
        key_option,
        dest="body_key",
        metavar="PEM",
        help="the auditor's X25519 private key (PEM, e.g. openssl genpkey -algorithm X25519), to open bodies "
        "the relay stores sealed (body_encryption_public_key)",
    )


def _verb(verbs: Any, name: str, impl: Any, help_text: str, description: str) -> argparse.ArgumentParser:
    v: argparse.ArgumentParser = verbs.add_parser(name, help=help_text, description=description)
    v.set_defaults(handler=_run, audit_impl=impl)
    return v


def _trust_args(v: argparse.ArgumentParser) -> None:
    v.add_argument(
        "--trust-root",
        default="aws",
        metavar="aws|mock|PEM",
        help="attestation trust anchor: AWS Nitro Enclaves Root-G1 (default), the mock NSM's root "
        "($CLOISTER_STATE/mock-nsm/root.pem, state dir .cloister by default), or a PEM file",
    )
    v.add_argument("--expect-pcr", action="append", default=[], metavar="I=HEX", help="require PCR I (repeatable)")
    v.add_argument("--allow-debug", action="store_true", help="accept debug-mode enclaves (PCR0 all zero)")
    v.add_argument("--origin", help="require this log origin")


def _log_args(v: argparse.ArgumentParser, *, url_only: bool = True) -> None:
    v.add_argument(
        "--log",
        required=True,
        metavar="URL" if url_only else "URL|DIR",
        help="the log: the relay's URL (http://host:port means its /log/)"
        + ("" if url_only else ", or a storage directory in the tlog-tiles layout"),
    )
    _trust_args(v)
    v.add_argument(
        "--state",
        type=Path,
        metavar="DIR",
        help="where remembered checkpoints live (default $CLOISTER_STATE/audit, else .cloister/audit)",
    )
    v.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per request (default 30)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")


def _nonneg(text: str) -> int:
    try:
        n = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


# --- The handler: one place maps errors to exit statuses -----------------------------------


def _run(args: argparse.Namespace) -> int:
    from cloister.audit.errors import FetchError, ForkDetected
    from cloister.audit.trustroot import TrustRootError
    from cloister.verify.errors import DecodeError, VerificationError

    prog = f"cloister audit {args.audit_verb}"
    try:
        code: int = args.audit_impl(args)
        return code
    except (_Usage, TrustRootError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ForkDetected as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FORK
    except FetchError as exc:
        print(f"{prog}: cannot read the log: {exc}", file=sys.stderr)
        return EXIT_FETCH
    except (DecodeError, VerificationError) as exc:
        reason = getattr(exc, "reason", None)
        detail = getattr(exc, "detail", None) or str(exc)
        prefix = f"attestation rejected: {reason}: " if reason and hasattr(exc, "detail") else ""
        print(f"{prog}: FAILED: {prefix}{detail}", file=sys.stderr)
        return EXIT_BAD
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # the local side: --state, an output file
        print(f"{prog}: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        # Never a traceback for an auditor; CLOISTER_DEBUG=1 shows it, to report the bug.
        if os.environ.get("CLOISTER_DEBUG"):
            raise
        print(
            f"{prog}: internal error ({type(exc).__name__}: {exc}); set CLOISTER_DEBUG=1 for details", file=sys.stderr
        )
        return EXIT_BAD


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)  # the CLI reads the clock; the verifiers take it as a parameter


def _source(args: argparse.Namespace, *, url_only: bool = True) -> Any:
    from cloister.audit.source import SourceSpec, open_source

    if args.timeout <= 0:
        raise _Usage("--timeout must be positive")
    spec = SourceSpec(args.log, timeout=args.timeout)
    if url_only and not spec.is_url:
        raise _Usage(f"--log {args.log!r}: this command needs the relay's http(s) URL (it asks for an attestation)")
    try:
        return open_source(spec)
    except ValueError as exc:
        raise _Usage(str(exc)) from exc


def _trust(args: argparse.Namespace) -> tuple[Any, dict[int, bytes]]:
    from cloister.audit.trustroot import load_trust_root, parse_pcr_spec

    pcrs = dict(parse_pcr_spec(s) for s in args.expect_pcr)
    return load_trust_root(args.trust_root), pcrs


def _store(args: argparse.Namespace) -> Any:
    from cloister.audit.state import CheckpointStore, default_state_dir

    return CheckpointStore(args.state if args.state is not None else default_state_dir())


def _attested(args: argparse.Namespace, source: Any) -> tuple[Any, Any]:
    """An attested checkpoint, proven consistent with (and then remembered as) the last one seen."""
    from cloister.audit.attested import check_remembered, fetch_attested_checkpoint

    root, pcrs = _trust(args)
    now = _now()
    attested = fetch_attested_checkpoint(
        source,
        root=root,
        now=now,
        nonce=os.urandom(32),
        expected_pcrs=pcrs,
        allow_debug=args.allow_debug,
        origin=args.origin,
    )
    consistency = check_remembered(
        _store(args),
        checkpoint=attested.checkpoint,
        note=attested.note,
        log_key=attested.binding.log_key,
        now=now,
        source=source,
    )
    return attested, consistency


def _b64(h: bytes) -> str:
    import base64

    return base64.b64encode(h).decode("ascii")


def _emit(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _read_input(name: str, what: str) -> bytes:
    from cloister.cli.input import InputError, read_capped

    try:
        return read_capped(name, MAX_INPUT, f"a {what}")
    except InputError as exc:
        raise _Usage(str(exc)) from exc


# --- checkpoint -------------------------------------------------------------------------------


def _attestation_json(attested: Any, root_name: str) -> dict[str, Any]:
    doc = attested.document
    return {
        "module_id": doc.module_id,
        "timestamp": doc.timestamp.isoformat(),
        "pcrs": {str(i): v.hex() for i, v in sorted(doc.pcrs.items()) if i in (0, 1, 2, 8)},
        "trust_root": root_name,
        "log_key": attested.binding.log_verifier().vkey,
    }


def _consistency_json(c: Any) -> dict[str, Any]:
    prev = c.previous
    return {
        "status": c.status,
        "remembered_size": prev.size if prev else None,
        "remembered_root": _b64(prev.root) if prev else None,
        "proof": [_b64(h) for h in c.proof],
    }


def _witness_policy(args: argparse.Namespace) -> Any:
    from cloister.verify.cosignature import CosignaturePolicy, Ed25519CosignatureVerifier
    from cloister.verify.errors import DecodeError

    if not args.witness:
        if args.quorum is not None:
            raise _Usage("--quorum goes with --witness NAME=VKEY")
        return None
    verifiers = []
    for spec in args.witness:
        name, sep, vkey = spec.partition("=")
        try:
            verifier = Ed25519CosignatureVerifier.from_vkey(vkey)
        except DecodeError as exc:
            raise _Usage(f"--witness {spec[:80]!r}: {exc}") from exc
        if not sep or verifier.name != name:
            raise _Usage(f"--witness {spec[:80]!r}: want NAME=VKEY, the vkey's name being NAME")
        verifiers.append(verifier)
    try:
        return CosignaturePolicy(tuple(verifiers), len(verifiers) if args.quorum is None else args.quorum)
    except ValueError as exc:
        raise _Usage(str(exc)) from exc


def _witnessed(args: argparse.Namespace, source: Any, policy: Any, note: bytes, attested: Any) -> Any:
    from cloister.audit.attested import check_cosigned
    from cloister.verify.errors import VerificationError

    try:
        return check_cosigned(source, note, attested, policy, now=_now())
    except VerificationError as exc:
        raise VerificationError(f"witnesses: {exc}") from exc


def _witnesses_json(w: Any, policy: Any) -> dict[str, Any]:
    from datetime import UTC, datetime

    return {
        "size": w.checkpoint.size,
        "root": _b64(w.checkpoint.root_hash),
        "quorum": policy.quorum,
        "pinned": [v.vkey for v in policy.witnesses],
        "cosigned": {n: datetime.fromtimestamp(t, UTC).isoformat() for n, t in sorted(w.cosigned.items())},
        "note": w.note.decode("utf-8"),
    }


def _print_witnesses(w: Any, policy: Any, attested_size: int) -> None:
    from datetime import UTC, datetime

    behind = attested_size - w.checkpoint.size
    where = "the attested checkpoint" if behind == 0 else f"size {w.checkpoint.size}, {behind} entries behind it"
    print(
        f"  cosigned by {len(w.cosigned)} of {len(policy.witnesses)} pinned witnesses (quorum {policy.quorum}) "
        f"at {where}:"
    )
    for name, t in sorted(w.cosigned.items()):
        print(f"    {name}  at {datetime.fromtimestamp(t, UTC).isoformat()}")


def _checkpoint(args: argparse.Namespace) -> int:
    from cloister.audit.attested import fetch_cosigned_note

    policy = _witness_policy(args)
    source = _source(args)
    # The cosigned checkpoint first: the attested one, fetched after, is at least as new.
    cosigned_note = fetch_cosigned_note(source) if policy is not None else b""
    attested, consistency = _attested(args, source)
    cp = attested.checkpoint
    witnessed = _witnessed(args, source, policy, cosigned_note, attested) if policy is not None else None
    root_name = _trust(args)[0].name
    if args.json:
        _emit(
            {
                "verified": True,
                "origin": cp.origin,
                "size": cp.size,
                "root": _b64(cp.root_hash),
                "extensions": list(cp.extensions),
                "note": attested.note.decode("utf-8"),
                "attestation": _attestation_json(attested, root_name),
                "consistency": _consistency_json(consistency),
                **({"witnesses": _witnesses_json(witnessed, policy)} if witnessed is not None else {}),
            }
        )
        return EXIT_OK
    doc = attested.document
    print(f"checkpoint verified: {cp.origin}")
    print(f"  size {cp.size}, root {_b64(cp.root_hash)}")
    for ext in cp.extensions:
        print(f"  extension: {ext}")
    print(f"  signed by {attested.binding.log_verifier().vkey}")
    print(
        f"  attested for a fresh nonce by enclave {doc.module_id}, PCR0 {doc.pcrs.get(0, b'').hex()}, "
        f"at {doc.timestamp.isoformat(timespec='seconds')}, trust root {root_name}"
    )
    print(f"  {_consistency_line(consistency)}")
    if witnessed is not None:
        _print_witnesses(witnessed, policy, cp.size)
    return EXIT_OK


def _consistency_line(c: Any) -> str:
    if c.status == "first":
        return "first checkpoint seen for this log: remembered"
    if c.status == "same":
        return f"same as the remembered checkpoint (size {c.previous.size})"
    return f"consistent with the remembered checkpoint of size {c.previous.size} ({len(c.proof)}-hash proof)"


# --- inclusion --------------------------------------------------------------------------------


def _inclusion(args: argparse.Namespace) -> int:
    from cloister.audit.proofs import prove_inclusion
    from cloister.audit.render import entry_json
    from cloister.verify.entries import parse_entry

    source = _source(args)
    claims = grant_bytes = None
    if args.grant is not None:
        from cloister.verify.grant import read_grant

        grant_bytes = _decode_binary(_read_input(args.grant, "grant"), "grant")
        claims = read_grant(grant_bytes)
    attested, _ = _attested(args, source)
    cp = attested.checkpoint
    index = args.index if claims is None else claims.log_index
    if claims is not None and claims.origin != cp.origin:
        from cloister.verify.errors import VerificationError

        raise VerificationError(f"the grant names log {claims.origin!r}, but the relay serves {cp.origin!r}")
    proof = prove_inclusion(source, cp, index)
    entry = parse_entry(proof.entry.data)
    out: dict[str, Any] = {
        "index": index,
        "included": True,
        "tree_size": cp.size,
        "root": _b64(cp.root_hash),
        "leaf_hash": _b64(proof.leaf_hash),
        "bundle": proof.entry.bundle_path,
        "proof": [_b64(h) for h in proof.proof],
        "entry": entry_json(entry, index),
    }
    if claims is not None and grant_bytes is not None:
        out["grant"] = _check_grant(claims, grant_bytes, proof.leaf_hash, entry, attested)
    if args.bodies:
        from cloister.audit.bodies import read_checked_body

        token, key = _body_credentials(args)
        out["bodies"] = read_checked_body(source, index, entry, token=token, key=key)
    _emit(out)
    print(f"entry {index} is included in the attested checkpoint of size {cp.size} ({cp.origin})", file=sys.stderr)
    return EXIT_OK


def _decode_binary(data: bytes, what: str) -> bytes:
    """Raw bytes, or base64 (one line or wrapped), told apart by the alphabet."""
    import base64
    import binascii
    import re

    text = data.strip()
    if not text:
        raise _Usage(f"the {what} file is empty")
    if re.fullmatch(rb"[A-Za-z0-9+/=_\-\s]+", text):
        compact = b"".join(text.split())
        try:
            if b"-" in compact or b"_" in compact:
                return base64.urlsafe_b64decode(compact + b"=" * (-len(compact) % 4))
            return base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _Usage(f"the {what} looks like base64 but does not decode: {exc}") from exc
    return data


def _check_grant(claims: Any, grant: bytes, leaf: bytes, entry: Any, attested: Any) -> dict[str, Any]:
    """The logged decision is exactly the one the grant describes."""
    from cloister.verify.entries import DecisionEntry
    from cloister.verify.errors import VerificationError

    index = claims.log_index
    # 1. The grant names this very entry (its leaf hash), not just its index.
    if claims.entry_hash != leaf:
        raise VerificationError(
            f"entry {index}'s leaf hash {_b64(leaf)} is not the grant's entry hash {_b64(claims.entry_hash)}"
        )
    # 2. It is a decision that issued a grant.
    if not isinstance(entry, DecisionEntry) or entry.grant_nonce is None:
        raise VerificationError(f"entry {index} is not a decision that issued a grant")
    # 3. Field by field, the decision is the grant's.
    pairs = [
        ("agent", entry.agent, claims.agent),
        ("server", entry.server, claims.server),
        ("tool", entry.tool, claims.tool),
        ("args_sha256", entry.args_sha256, claims.args_sha256),
        ("nonce", entry.grant_nonce, claims.nonce),
        ("expiry", entry.grant_expiry_ms, claims.expires_ms),
        ("policy_sha256", entry.policy_sha256, claims.policy_sha256),
    ]
    for name, logged, granted in pairs:
        if logged != granted:
            raise VerificationError(f"entry {index} and the grant differ in {name}")
    # 4. The signature, when the running enclave issued it (older grant keys are in key entries).
    signature = _grant_signature(grant, attested)
    return {
        "entry_hash": "matches",
        "decision": entry.decision,
        "mode": entry.mode,
        "fields": "match",
        "signature": signature,
    }


def _grant_signature(grant: bytes, attested: Any) -> str:
    """The grant's signature, checked by the verifier upstreams use (cloister.verify.grant)."""
    from cloister.verify.errors import VerificationError
    from cloister.verify.grant import GrantError, verify_grant_signature

    try:
        verify_grant_signature(grant, attested.binding.grant_keys())
    except GrantError as exc:
        if exc.reason == "unknown-key":
            return "not checked: signed by an earlier enclave's grant key (see its key entry)"
        if exc.reason == "bad-signature":
            raise VerificationError("the grant's signature does not verify with the attested grant key") from exc
        raise
    return "verified with the attested enclave's grant key"


def _body_credentials(args: argparse.Namespace) -> tuple[str | None, Any]:
    """The auditor token and X25519 private key named on the command line (either may be absent)."""
    from cloister.audit.sealed import load_private_key
    from cloister.verify.errors import DecodeError

    token = key = None
    if args.auditor_token_file:
        try:
            token = Path(args.auditor_token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise _Usage(f"--auditor-token-file: cannot read {args.auditor_token_file}: {exc}") from exc
        if not token:
            raise _Usage(f"--auditor-token-file: {args.auditor_token_file} is empty")
    if args.body_key:
        try:
            key = load_private_key(Path(args.body_key))
        except (OSError, DecodeError) as exc:
            raise _Usage(f"the X25519 private key: {exc}") from exc
    return token, key


# --- body -------------------------------------------------------------------------------------


def _body(args: argparse.Namespace) -> int:
    from cloister.audit.bodies import body_commitment, check_body, fetch_body
    from cloister.audit.proofs import prove_inclusion
    from cloister.audit.render import entry_json
    from cloister.verify.entries import parse_entry
    from cloister.verify.errors import VerificationError

    source = _source(args)
    token, key = _body_credentials(args)
    attested, _ = _attested(args, source)
    cp = attested.checkpoint
    proof = prove_inclusion(source, cp, args.index)
    entry = parse_entry(proof.entry.data)
    committed = body_commitment(entry)
    if committed is None:
        raise VerificationError(f"entry {args.index} commits to no body (it is not a decision or a result)")
    kind, commitment = committed
    data = fetch_body(source, args.index, kind, token)
    checked = check_body(data, index=args.index, kind=kind, commitment=commitment, key=key)
    _emit(
        {
            "index": args.index,
            "kind": kind,
            "tree_size": cp.size,
            "commitment": commitment.hex(),
            "entry": entry_json(entry, args.index),
            "sealed": checked.sealed_to is not None,
            **checked.as_json(),
        }
    )
    sealed = f", opened with key {checked.sealed_to}" if checked.sealed_to else " (stored unsealed)"
    print(
        f"the {kind} body of entry {args.index} matches its commitment{sealed}; the entry is in the attested "
        f"checkpoint of size {cp.size}",
        file=sys.stderr,
    )
    return EXIT_OK


# --- consistency ------------------------------------------------------------------------------


def _consistency(args: argparse.Namespace) -> int:
    from cloister.audit.proofs import prove_consistency

    source = _source(args)
    attested, _ = _attested(args, source)
    cp = attested.checkpoint
    size_to = cp.size if args.size_to is None else args.size_to
    if not args.size_from <= size_to <= cp.size:
        raise _Usage(f"need --from ({args.size_from}) <= --to ({size_to}) <= the checkpoint's size ({cp.size})")
    p = prove_consistency(source, cp, args.size_from, size_to)
    if args.json:
        _emit(
            {
                "consistent": True,
                "origin": cp.origin,
                "checkpoint_size": cp.size,
                "from": p.size1,
                "to": p.size2,
                "root_from": _b64(p.root1),
                "root_to": _b64(p.root2),
                "proof": [_b64(h) for h in p.proof],
            }
        )
        return EXIT_OK
    print(f"log {cp.origin}, attested checkpoint of size {cp.size}")
    print(f"  root at {p.size1}: {_b64(p.root1)}")
    print(f"  root at {p.size2}: {_b64(p.root2)}")
    print(f"  consistency proof ({len(p.proof)} hashes):")
    for h in p.proof:
        print(f"    {_b64(h)}")
    print("consistent")
    return EXIT_OK


# --- replay -----------------------------------------------------------------------------------


def _replay(args: argparse.Namespace) -> int:
    import time

    from cloister.audit.attested import check_remembered
    from cloister.audit.full_replay import replay_log
    from cloister.audit.render import Progress, replay_json, replay_text
    from cloister.audit.source import SourceSpec

    if args.timeout <= 0:
        raise _Usage("--timeout must be positive")
    spec = SourceSpec(args.log, timeout=args.timeout)
    keys = _verifier_keys(args.key) if args.generic else []
    if args.generic and not keys:
        raise _Usage("--generic needs at least one --key VKEY to verify the checkpoint")
    if args.key and not args.generic:
        raise _Usage("--key is for --generic logs; Cloister logs are verified through their key entries")
    root = pcrs = None
    if not args.generic:
        root, pcrs = _trust(args)
    jobs = args.jobs or (os.cpu_count() or 1)
    store = _store(args) if not args.generic else None
    progress = Progress(not args.no_progress)
    now = _now()
    started = time.monotonic()
    try:
        try:
            accepted = frozenset(bytes.fromhex(h) for h in args.accept_pcr0)
        except ValueError as exc:
            raise _Usage(f"--accept-pcr0: not hex: {exc}") from exc
        replayed = replay_log(
            spec,
            now=now,
            nonce=os.urandom(32),
            root=root,
            expected_pcrs=pcrs,
            accepted_pcr0=accepted,
            allow_debug=args.allow_debug,
            origin=args.origin,
            generic_keys=keys,
            remembered=store.load if store is not None else None,
            jobs=jobs,
            progress=progress,
            recheck_signatures=not args.no_recheck_signatures,
        )
    except ValueError as exc:
        from cloister.verify.errors import DecodeError

        if isinstance(exc, DecodeError):
            raise
        raise _Usage(str(exc)) from exc
    finally:
        progress.close()
    elapsed = time.monotonic() - started
    result, cp = replayed.result, replayed.checkpoint
    # A rate is only meaningful for logs big enough to take a while.
    rate = cp.size / elapsed if elapsed > 0.2 and cp.size >= 10_000 else None
    consistency = None
    if replayed.ok and store is not None:
        old = store.load(cp.origin)
        prefix = result.prefix_roots.get(old.size) if old is not None else None
        # The replay recomputed the prefix root at the remembered size; no tile proof is needed.
        fallback = None if prefix is not None else _source(args, url_only=False)
        consistency = check_remembered(
            store,
            checkpoint=cp,
            note=replayed.note,
            log_key=result.last_key.log_key,
            now=now,
            prefix_root=prefix,
            source=fallback,
        )
    if args.json:
        out = replay_json(result, checkpoint_root=cp.root_hash, rate=rate)
        out.update(
            {
                "origin": cp.origin,
                "verified": replayed.ok,
                "signed_by": replayed.signer,
                "consistency": _consistency_json(consistency) if consistency else None,
            }
        )
        _add_calls(out, args, spec, cp, result.root)
        _emit(out)
    else:
        print(
            f"log {cp.origin}: {cp.size:,} entries replayed in {elapsed:.2f}s"
            + (f" ({rate:,.0f} entries/s)" if rate else "")
        )
        print(
            f"  root {_b64(result.root) if result.root else '(not recomputable)'}; "
            f"checkpoint {'signed by ' + replayed.signer if replayed.signer else 'NOT VERIFIED'}"
        )
        if consistency is not None:
            print(f"  {_consistency_line(consistency)}")
        text = replay_text(result)
        if text:
            print(text)
    if not replayed.ok:
        for p in result.problems:
            print(f"PROBLEM: {p}", file=sys.stderr)
        if result.problem_count > len(result.problems):
            print(f"... and {result.problem_count - len(result.problems)} more problems", file=sys.stderr)
        print(
            f"cloister audit replay: FAILED: {result.problem_count} problem(s)"
            + ("" if replayed.verified else "; the checkpoint is not verified"),
            file=sys.stderr,
        )
        return EXIT_BAD
    print("replay verified: every entry decodes, the tree matches the signed checkpoint", file=sys.stderr)
    return EXIT_OK


def _verifier_keys(specs: list[str]) -> list[Any]:
    from cloister.verify.errors import DecodeError
    from cloister.verify.note import Ed25519NoteVerifier

    texts: list[str] = []
    for spec in specs:
        if spec.startswith("@"):
            texts += [
                line.strip()
                for line in _read_input(spec[1:], "key file").decode("utf-8", "replace").splitlines()
                if line.strip() and not line.startswith("#")
            ]
        else:
            texts.append(spec.strip())
    keys = []
    seen = set()
    for text in texts:
        try:
            key = Ed25519NoteVerifier.from_vkey(text)
        except DecodeError as exc:
            raise _Usage(f"--key {text[:80]!r}: {exc}") from exc
        if (key.name, key.key_id) not in seen:
            seen.add((key.name, key.key_id))
            keys.append(key)
    return keys


# --- receipts ---------------------------------------------------------------------------------


def _receipt(args: argparse.Namespace) -> int:
    from cloister.audit.proofs import prove_inclusion
    from cloister.audit.receipt import make_receipt

    source = _source(args)
    attested, _ = _attested(args, source)
    proof = prove_inclusion(source, attested.checkpoint, args.index)
    receipt = make_receipt(
        index=args.index,
        proof=proof.proof,
        checkpoint_note=attested.note,
        entry=proof.entry.data,
        attestation=attested.document_bytes,
    )
    sys.stdout.buffer.write(receipt)
    sys.stdout.flush()
    print(
        f"receipt for entry {args.index} of {attested.checkpoint.origin} (checkpoint size {attested.checkpoint.size})",
        file=sys.stderr,
    )
    return EXIT_OK


def _verify_receipt(args: argparse.Namespace) -> int:
    from cloister.audit.receipt import verify_receipt
    from cloister.audit.render import entry_json

    data = _read_input(args.file, "receipt")
    root, pcrs = _trust(args)
    r = verify_receipt(data, root=root, expected_pcrs=pcrs, allow_debug=args.allow_debug, origin=args.origin)
    doc = r.document
    out = {
        "verified": True,
        "origin": r.checkpoint.origin,
        "index": r.index,
        "checkpoint_size": r.checkpoint.size,
        "root": _b64(r.checkpoint.root_hash),
        "signed_by": r.binding.log_verifier().vkey,
        "attestation": {
            "module_id": doc.module_id,
            "timestamp": doc.timestamp.isoformat(),
            "pcr0": doc.pcrs.get(0, b"").hex(),
            "trust_root": root.name,
        },
        "entry": entry_json(r.entry, r.index),
    }
    if args.json:
        _emit(out)
    else:
        print(f"receipt verified: entry {r.index} of {r.checkpoint.origin} (checkpoint size {r.checkpoint.size})")
        print(
            f"  signed by {out['signed_by']}, attested by enclave {doc.module_id} (PCR0 "
            f"{doc.pcrs.get(0, b'').hex()[:24]}...) at {doc.timestamp.isoformat(timespec='seconds')}"
        )
        print(json.dumps(out["entry"], indent=2, ensure_ascii=False))
    return EXIT_OK


# --- verify-note ------------------------------------------------------------------------------


def _verify_note(args: argparse.Namespace) -> int:
    from cloister.verify.checkpoint import parse_checkpoint
    from cloister.verify.errors import DecodeError
    from cloister.verify.note import verify_note

    keys = _verifier_keys(args.key)
    data = _read_input(args.file, "signed note")
    verified = verify_note(data, keys)
    signers = [f"{s.name}+{s.key_id:08x}" for s in verified.signatures]
    out: dict[str, Any] = {"verified": True, "signed_by": signers, "signatures": len(verified.note.signatures)}
    try:
        cp = parse_checkpoint(verified.text)
        out["checkpoint"] = {
            "origin": cp.origin,
            "size": cp.size,
            "root": _b64(cp.root_hash),
            "extensions": list(cp.extensions),
        }
    except DecodeError:
        out["checkpoint"] = None  # a note, not a checkpoint: fine
    if args.json:
        _emit(out)
        return EXIT_OK
    print(f"note verified: signed by {', '.join(signers)} ({len(verified.note.signatures)} signature line(s))")
    if out["checkpoint"]:
        c = out["checkpoint"]
        print(f"  checkpoint: {c['origin']}, size {c['size']}, root {c['root']}")
    return EXIT_OK


def _add_calls(out: dict[str, Any], args: argparse.Namespace, spec: Any, cp: Any, root: bytes | None) -> None:
    """Per-call records (ISO times) for `replay --json`, read again and checked against the
    replayed checkpoint's root; only once the tree replayed to it."""
    from cloister.audit.calls import collect
    from cloister.audit.report import read_verified_entries
    from cloister.audit.source import open_source

    if args.generic or args.no_calls or root != cp.root_hash:
        return
    out["calls"] = [c.json() for c in collect(read_verified_entries(open_source(spec), cp.size, cp.root_hash)).calls]


# --- report -----------------------------------------------------------------------------------


def _time_ms(text: str | None, what: str) -> int | None:
    from datetime import UTC, datetime

    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise _Usage(f"{what} {text[:60]!r}: not an ISO 8601 time (2026-12-06T08:00:00Z)") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


def _report(args: argparse.Namespace) -> int:
    from cloister.audit.calls import LogFacts, iso
    from cloister.audit.full_replay import replay_log
    from cloister.audit.render import Progress, replay_json
    from cloister.audit.report import ReportInput, build_report, collect_verified, render_csv, render_html, report_json
    from cloister.audit.source import SourceSpec, open_source

    if args.timeout <= 0:
        raise _Usage("--timeout must be positive")
    from_ms, to_ms = _time_ms(args.time_from, "--from"), _time_ms(args.time_to, "--to")
    if from_ms is not None and to_ms is not None and from_ms >= to_ms:
        raise _Usage("--from must be before --to")
    spec = SourceSpec(args.log, timeout=args.timeout)
    policy = _witness_policy(args)
    if policy is not None and not spec.is_url:
        raise _Usage("--witness needs a relay URL (the cosigned checkpoint is served beside the log)")
    root, pcrs = _trust(args)
    try:
        accepted = frozenset(bytes.fromhex(h) for h in args.accept_pcr0)
    except ValueError as exc:
        raise _Usage(f"--accept-pcr0: not hex: {exc}") from exc
    source = open_source(spec)
    cosigned_note = b""
    if policy is not None:
        from cloister.audit.attested import fetch_cosigned_note

        cosigned_note = fetch_cosigned_note(source)
    now = _now()
    progress = Progress(not args.no_progress)
    try:
        replayed = replay_log(
            spec,
            now=now,
            nonce=os.urandom(32),
            root=root,
            expected_pcrs=pcrs,
            accepted_pcr0=accepted,
            allow_debug=args.allow_debug,
            origin=args.origin,
            jobs=args.jobs or (os.cpu_count() or 1),
            progress=progress,
        )
    finally:
        progress.close()
    result, cp = replayed.result, replayed.checkpoint
    problems = [str(p) for p in result.problems]
    witnesses = None
    if policy is not None and replayed.attested is not None:
        witnesses = _witnesses_json(_witnessed(args, source, policy, cosigned_note, replayed.attested), policy)
    facts = LogFacts()
    if result.root == cp.root_hash:
        facts = collect_verified(source, cp.size, cp.root_hash, from_ms=from_ms, to_ms=to_ms)
    attested = replayed.attested
    how = (
        "was attested by the running enclave for a fresh nonce (attestation verified against the trust root"
        + (" and the expected PCRs" if pcrs else "")
        + "), and signed by the log key that the log's last key entry introduced"
        if attested is not None
        else "was signed by the log key introduced by the last key entry before it, whose attestation "
        "verified against the trust root (the storage directory itself is not trusted)"
    )
    pcr0 = (
        attested.document.pcrs.get(0, b"").hex()
        if attested is not None
        else (result.keys[-1].pcr0 if result.keys else "")
    )
    inp = ReportInput(
        log=args.log,
        origin=cp.origin,
        size=cp.size,
        root_b64=_b64(cp.root_hash),
        note=replayed.note.decode("utf-8", "replace"),
        signer=replayed.signer,
        verified=replayed.ok,
        problems=problems,
        how=how,
        trust_root=str(args.trust_root),
        pcr0=pcr0,
        generated=iso(int(now.timestamp() * 1000)),
        window=(args.time_from, args.time_to),
        witnesses=witnesses,
        key_checks=[
            {
                "index": k.index,
                "time": iso(k.time_ms),
                "log_vkey": k.log_vkey,
                "pcr0": k.pcr0,
                "previous_size": k.previous_size,
                "verified": k.verified,
            }
            for k in result.keys
        ],
        response_signatures=replay_json(result, checkpoint_root=cp.root_hash, rate=None)["response_signatures"],
        log_url=source.where("").rstrip("/") if spec.is_url else None,
    )
    report = build_report(inp, facts)
    render = {"html": render_html, "json": report_json, "csv": render_csv}[args.format]
    text = render(report)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8", newline="")
        print(
            f"wrote {args.output}: {len(report['calls'])} calls, "
            + ("VERIFIED" if replayed.ok else f"NOT VERIFIED ({result.problem_count} problems)"),
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
    return EXIT_OK if replayed.ok else EXIT_BAD
