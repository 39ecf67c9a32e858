"""`cloister policy`: write, check, sign, push, compare and explain policy bundles.

    cloister policy validate DIR [--strict] [--json]
    cloister policy schema DIR
    cloister policy keygen --out FILE
    cloister policy sign DIR --key ADMIN_KEY --version N --origin ORIGIN [--not-after ISO8601] --out BUNDLE [--json]
    cloister policy push BUNDLE --relay URL --admin-token-file FILE [--timeout S] [--json]
    cloister policy diff OLD NEW [--json]
    cloister policy explain --bundle DIR|BUNDLE --agent A [--role R ...] --server S --tool T
                            [--args JSON|@FILE] [--at ISO8601] [--attestation LEVEL] [--payment JSON|AMOUNT]
                            [--json]

Exit status: 0 success (valid, signed, in force, identical, allowed); 1 the answer is no
(invalid, refused, different, denied); 2 unusable arguments or input; 3 (push) the relay or
the enclave could not be reached. The logic is in `cloister.policytools`; registration
imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "policy",
        help="validate, sign, push, diff and explain policy bundles",
        description="Policy bundles: validate, sign, push to a relay, compare, and explain decisions offline. "
        "See docs/policy.md.",
    )
    verbs = p.add_subparsers(dest="policy_verb", metavar="VERB", required=True)

    v = verbs.add_parser(
        "validate",
        help="check a bundle directory as the enclave will, with file and line",
        description="Check a bundle directory: exit 0 if valid, 1 if not (every problem is listed "
        "as FILE:LINE[:COL]: error|warning: MESSAGE), 2 if DIR cannot be read.",
    )
    v.add_argument("dir", type=Path, metavar="DIR")
    v.add_argument("--strict", action="store_true", help="fail on warnings too")
    v.add_argument("--json", action="store_true", help="print findings and summary as JSON")
    v.set_defaults(handler=_validate)

    sc = verbs.add_parser(
        "schema",
        help="print a Cedar schema generated from the bundle's entities",
        description="Print the Cedar schema `validate` uses when the bundle has no "
        "schema.cedarschema: a starting point to save as schema.cedarschema.",
    )
    sc.add_argument("dir", type=Path, metavar="DIR")
    sc.set_defaults(handler=_schema)

    k = verbs.add_parser(
        "keygen",
        help="create an admin key pair for signing bundles",
        description="Write an Ed25519 admin key: FILE (private, PEM, mode 0600) and FILE.pub "
        "(public, PEM), and print the hex to pin in the enclave's admin_keys.",
    )
    k.add_argument("--out", type=Path, required=True, metavar="FILE")
    k.set_defaults(handler=_keygen)

    s = verbs.add_parser(
        "sign",
        help="validate a bundle directory, then sign it with an admin key",
        description="Validate DIR (an invalid bundle is not signed: exit 1), sign it with the "
        "admin key as version N for the log ORIGIN, loadable until --not-after, and write the signed "
        "bundle to BUNDLE.",
    )
    s.add_argument("dir", type=Path, metavar="DIR")
    s.add_argument("--key", type=Path, required=True, metavar="ADMIN_KEY", help="Ed25519 private key (PEM)")
    s.add_argument(
        "--version",
        type=int,
        required=True,
        metavar="N",
        help="the bundle version: above the one in force, or the enclave refuses it",
    )
    s.add_argument(
        "--origin",
        required=True,
        metavar="ORIGIN",
        help="the log this bundle is for: the `origin` in that enclave's enclave.toml; any other enclave refuses it",
    )
    s.add_argument(
        "--not-after",
        default=None,
        metavar="ISO8601",
        help="the last time an enclave may load it, with its zone, e.g. 2026-06-01T00:00:00Z "
        "(default: 90 days from now; at most 366 days ahead)",
    )
    s.add_argument("--out", type=Path, required=True, metavar="BUNDLE")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=_sign)

    u = verbs.add_parser(
        "push",
        help="send a signed bundle to a relay, for its enclave to load",
        description="POST BUNDLE to <URL>/admin/policy. Exit 0 when the enclave put it in force, "
        "1 when it refused (the reason is printed), 3 when the relay or the enclave is unreachable.",
    )
    u.add_argument("bundle", type=Path, metavar="BUNDLE")
    u.add_argument("--relay", required=True, metavar="URL", help="the relay's base URL, e.g. http://127.0.0.1:8440")
    u.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds to wait (default 30)")
    u.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="FILE",
        help="the relay's admin token (its admin_token_file): the relay refuses pushes without it",
    )
    u.add_argument("--json", action="store_true")
    u.set_defaults(handler=_push)

    pn = verbs.add_parser(
        "pin",
        help="print the current tool-definition pins of an upstream, for entities.toml",
        description="Ask a relay for the SHA-256 of each tool definition an upstream lists now "
        "(name, description, input schema, annotations) and print a `pins = {...}` line to "
        "paste under [servers.NAME] in entities.toml. Review the tools before pinning them: "
        "the relay is not trusted, the enclave recomputes the hashes when it checks pins.",
    )
    pn.add_argument("--relay", required=True, metavar="URL", help="the relay's base URL")
    pn.add_argument("--server", required=True, metavar="NAME", help="the upstream's name")
    pn.add_argument("--tool", action="append", default=[], metavar="TOOL", help="pin only these tools (repeatable)")
    pn.add_argument("--admin-token-file", type=Path, metavar="FILE", help="the relay's admin token (admin_token_file)")
    pn.set_defaults(handler=_pin)

    d = verbs.add_parser(
        "diff",
        help="compare two bundles (directories or signed files)",
        description="Show versions, a summary of what changes in meaning (policies by @id, "
        "entities, limits, settings) and a unified diff per file. Exit 0 if identical, 1 if not.",
    )
    d.add_argument("old", type=Path, metavar="OLD")
    d.add_argument("new", type=Path, metavar="NEW")
    d.add_argument("--json", action="store_true")
    d.set_defaults(handler=_diff)

    e = verbs.add_parser(
        "explain",
        help="decide one call offline and show why",
        description="Evaluate a call with the enclave's own policy engine: the decision, the "
        "policies that made it, discovery, and the limits that apply with this call's cost. "
        "Exit 0 if allowed, 1 if denied, 2 for bad arguments or a bundle that does not parse.",
    )
    e.add_argument("--bundle", type=Path, required=True, metavar="DIR|BUNDLE")
    e.add_argument("--agent", required=True)
    e.add_argument(
        "--role",
        action="append",
        default=[],
        metavar="R",
        help="a role the token claims (repeatable; default: every role the bundle grants the agent)",
    )
    e.add_argument("--server", required=True)
    e.add_argument("--tool", required=True)
    e.add_argument("--args", default="{}", metavar="JSON|@FILE", help="the tool arguments (default {})")
    e.add_argument("--at", default=None, metavar="ISO8601", help="the time of the call (default now)")
    e.add_argument(
        "--attestation",
        default=None,
        metavar="LEVEL",
        help="resource.attestation for the server (default: the identity kind the bundle pins for it, "
        "as if its evidence had verified); a server that pins an identity and is at another level, such "
        "as 'unverified', is quarantined, as in the enclave",
    )
    e.add_argument(
        "--payment",
        default="",
        metavar="JSON|AMOUNT",
        help="the x402 payment the call carries: its payload as JSON, priced from the server's accepted payments "
        "(a bare AMOUNT only for a server that names none); charged against x402 spend caps when decided",
    )
    e.add_argument("--json", action="store_true")
    e.set_defaults(handler=_explain)


def _err(args: argparse.Namespace, message: str) -> None:
    print(f"cloister policy {args.policy_verb}: {message}", file=sys.stderr)


def _dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


# ---- validate / schema -----------------------------------------------------------------------


def _read_dir(args: argparse.Namespace) -> dict[str, bytes] | None:
    """The bundle directory's files, or None after saying why they cannot be read."""
    from cloister.enclave.bundle import BundleError, read_bundle_dir

    try:
        return read_bundle_dir(args.dir)
    except (BundleError, OSError) as exc:
        _err(args, str(exc))
        return None


def _validate(args: argparse.Namespace) -> int:
    from cloister.policytools.validate import validate_files

    if (files := _read_dir(args)) is None:
        return 2
    v = validate_files(files)
    failed = not v.ok or (args.strict and bool(v.warnings))
    if args.json:
        _dump(
            {
                "findings": [f.as_json() for f in v.findings],
                "summary": v.summary(),
                "strict": args.strict,
                "valid": not failed,
            }
        )
        return 1 if failed else 0
    for f in v.findings:
        print(f)
    print(_summary_text(v.summary(), args.dir, failed))
    return 1 if failed else 0


def _summary_text(s: dict[str, Any], where: Path, failed: bool) -> str:
    if failed:
        extra = f" and {s['warnings']} warning(s) (--strict)" if s["warnings"] and not s["errors"] else ""
        return f"invalid: {where}: {s['errors']} error(s){extra}"
    per_file = ", ".join(f"{k}: {n}" for k, n in s["policies"].items())
    lines = [
        f"valid: {where}: bundle {s['name']!r}, mode {s['mode']}"
        + ("  (log-only: decides and logs, but blocks nothing)" if s["mode"] == "log-only" else ""),
        f"  policies: {sum(s['policies'].values())} ({per_file})",
        f"  agents {s['agents']}, roles {s['roles']}, servers {s['servers']}, tools {s['tools']}, "
        f"limits {s['limits']}, issuers {s['issuers']}",
        f"  schema: {s['schema']}" + (f"; {s['warnings']} warning(s)" if s["warnings"] else ""),
    ]
    return "\n".join(lines)


def _schema(args: argparse.Namespace) -> int:
    from cloister.enclave.bundle import BundleError, parse_bundle_files
    from cloister.policytools.schema import generate_schema, input_schemas

    if (files := _read_dir(args)) is None:
        return 2
    try:
        bundle = parse_bundle_files(files)
    except BundleError as exc:
        _err(args, f"{exc} (run `cloister policy validate {args.dir}`)")
        return 1
    generated = generate_schema(bundle, input_schemas(files)[0])
    sys.stdout.write(generated.text)
    for note in generated.notes:
        print(f"// note: {note}")
    return 0


# ---- keys, signing, pushing ----------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    from cloister.policytools.signing import keygen
    from cloister.policytools.source import InputError

    try:
        info = keygen(args.out)
    except InputError as exc:
        _err(args, str(exc))
        return 2
    print(f"private key: {info.private_path} (mode 0600; keep it offline)")
    print(f"public key:  {info.public_path}")
    print(f"key id:      {info.key_id}")
    print(f'pin it in the enclave\'s config: admin_keys = ["{info.public_hex}"]')
    return 0


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _sign(args: argparse.Namespace, *, clock: Callable[[], datetime] = _utc_now) -> int:
    from cloister.policytools.signing import load_private_key, resolve_not_after, sign_dir
    from cloister.policytools.source import InputError
    from cloister.verify.bundle import iso_time
    from cloister.verify.errors import DecodeError

    if not 0 < args.version < 1 << 63:
        _err(args, f"--version must be a positive integer, got {args.version}")
        return 2
    try:
        not_after = resolve_not_after(args.not_after, clock())
        key = load_private_key(args.key)
        validation, signed = sign_dir(args.dir, key, args.version, args.out, origin=args.origin, not_after=not_after)
    except InputError as exc:
        _err(args, str(exc))
        return 2
    except DecodeError as exc:
        _err(args, str(exc))
        return 1
    if signed is None:
        for f in validation.findings:
            print(f, file=sys.stderr)
        _err(args, f"not signed: {args.dir} has {len(validation.errors)} error(s)")
        return 1
    if args.json:
        _dump(
            {
                "out": str(signed.out),
                "version": signed.version,
                "bundle_sha256": signed.sha256,
                "admin_key_id": signed.key_id,
                "admin_public_key": signed.public_hex,
                "origin": signed.origin,
                "not_after": iso_time(signed.not_after),
                "bytes": signed.size,
                "warnings": [f.as_json() for f in validation.warnings],
            }
        )
        return 0
    for f in validation.warnings:
        print(f, file=sys.stderr)
    print(f"signed {args.dir} -> {signed.out} ({signed.size} bytes)")
    print(f"  version:    {signed.version}")
    print(f"  origin:     {signed.origin}  (only the enclave whose enclave.toml names this origin loads it)")
    print(f"  not after:  {iso_time(signed.not_after)}  (no enclave loads it later; sign again before then)")
    print(f"  sha256:     {signed.sha256}  (the enclave logs it with every decision)")
    print(f'  admin key:  {signed.key_id}  (the enclave must pin admin_keys = ["{signed.public_hex}"])')
    return 0


def _pin(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    base = args.relay.rstrip("/")
    if not base.startswith(("http://", "https://")):
        print("cloister policy pin: --relay must be an http(s) URL", file=sys.stderr)
        return 2
    url = f"{base}/admin/pins?{urllib.parse.urlencode({'server': args.server})}"
    request = urllib.request.Request(url)  # noqa: S310 (scheme checked above)
    if args.admin_token_file:
        from cloister.policytools.signing import read_admin_token
        from cloister.policytools.source import InputError

        try:
            request.add_header("Authorization", f"Bearer {read_admin_token(args.admin_token_file)}")
        except InputError as exc:
            print(f"cloister policy pin: {exc}", file=sys.stderr)
            return 2
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:  # noqa: S310 (scheme checked above)
            body = json.loads(resp.read(1 << 20))
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read(1 << 16)).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        print(f"cloister policy pin: {reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        print(f"cloister policy pin: cannot reach {base}: {exc}", file=sys.stderr)
        return 3
    pins: dict[str, str] = body.get("pins", {})
    missing = [t for t in args.tool if t not in pins]
    if missing:
        print(f"cloister policy pin: {args.server!r} does not list {', '.join(missing)}", file=sys.stderr)
        return 1
    chosen = {t: pins[t] for t in (args.tool or sorted(pins))}
    inner = ", ".join(
        f'"{t}" = "{h}"' if not t.replace("_", "").isalnum() else f'{t} = "{h}"' for t, h in chosen.items()
    )
    print(f"# [servers.{args.server}] in entities.toml; review these tool definitions before pinning them")
    print(f"pins = {{ {inner} }}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from cloister.policytools.signing import push, read_admin_token
    from cloister.policytools.source import InputError
    from cloister.verify.errors import DecodeError

    try:
        token = read_admin_token(args.admin_token_file) if args.admin_token_file else None
        result = push(args.bundle, args.relay, timeout=args.timeout, admin_token=token)
    except InputError as exc:
        _err(args, str(exc))
        return 2
    except DecodeError as exc:
        _err(args, str(exc))
        return 1
    if args.json:
        _dump(
            {
                "outcome": result.outcome,
                "message": result.message,
                "version": result.version,
                "bundle_sha256": result.sha256,
                "http_status": result.http_status,
            }
        )
        return result.exit_code
    if result.outcome == "in-force":
        print(f"in force: version {result.version}, sha256 {result.sha256}")
    elif result.outcome == "refused":
        _err(args, f"refused: {result.message}")
    else:
        _err(args, result.message)
    return result.exit_code


# ---- diff, explain ---------------------------------------------------------------------------------


def _diff(args: argparse.Namespace) -> int:
    from cloister.policytools.diff import diff_bundles, render
    from cloister.policytools.source import InputError, load_source
    from cloister.verify.errors import DecodeError

    try:
        old, new = load_source(args.old), load_source(args.new)
    except (InputError, DecodeError) as exc:
        _err(args, str(exc))
        return 2
    d = diff_bundles(old, new)
    if args.json:
        _dump(d.as_json())
    else:
        sys.stdout.write(render(d))
    return 0 if d.identical else 1


def _explain(args: argparse.Namespace) -> int:
    from cloister.policytools.explain import explain, parse_at, render
    from cloister.policytools.source import InputError, load_source
    from cloister.policytools.validate import validate_files
    from cloister.verify.errors import DecodeError

    try:
        src = load_source(args.bundle)
        at = parse_at(args.at)
        arguments = _read_args(args.args)
    except (InputError, DecodeError) as exc:
        _err(args, str(exc))
        return 2
    validation = validate_files(src.files)
    if validation.bundle is None:
        for f in validation.errors:
            print(f, file=sys.stderr)
        _err(args, f"{args.bundle} does not parse; nothing to explain")
        return 2
    ex = explain(
        validation,
        agent=args.agent,
        roles=args.role or None,
        server=args.server,
        tool=args.tool,
        arguments_json=arguments,
        at=at,
        attestation=args.attestation,
        payment=args.payment,
    )
    ex.notes.insert(0, f"bundle: {src.describe()}" + ("; its signature is not checked here" if src.signed else ""))
    if args.json:
        _dump(ex.as_json())
    else:
        sys.stdout.write(render(ex))
    return 0 if ex.decision == "allow" else 1


def _read_args(text: str) -> str:
    from cloister.policytools.source import InputError

    if text.startswith("@"):
        try:
            return Path(text[1:]).read_text()
        except OSError as exc:
            raise InputError(f"--args {text}: cannot read: {exc.strerror}") from exc
    return text
