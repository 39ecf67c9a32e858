"""`cloister token issue --agent ID --role ROLE [--ttl SECONDS]`: mint a development token.

The token is signed by the dev issuer key in the state directory, which `cloister up` puts
into the example bundle's issuers, and names the state's log origin as its audience (the
example issuer's default: a token minted for one deployment is refused by every other).
Production agents get tokens from a real issuer named in the bundle's issuers.toml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("token", help="development tokens for agents")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    issue = verbs.add_parser("issue", help="mint a bearer token signed by the dev issuer key")
    issue.add_argument("--agent", required=True, help="the agent id (the token's sub claim)")
    issue.add_argument("--role", action="append", default=[], help="a role to claim (repeatable)")
    issue.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600, max 86400)")
    issue.add_argument("--state", type=Path, default=None, help="state directory (default .cloister)")
    issue.set_defaults(handler=_issue)


def _issue(args: argparse.Namespace) -> int:
    from cloister.dev.state import DevState, default_state_dir

    if not 0 < args.ttl <= 86400:
        print("cloister token issue: --ttl must be between 1 and 86400 seconds", file=sys.stderr)
        return 2
    state = DevState((args.state or default_state_dir()).resolve())
    if not (state.root / "keys" / "issuer.key").exists():
        print(
            f"cloister token issue: no dev issuer key in {state.root}/keys; run `cloister up` first (or pass --state)",
            file=sys.stderr,
        )
        return 2
    print(state.mint_token(args.agent, args.role, args.ttl))
    return 0
