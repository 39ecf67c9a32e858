"""The `cloister` console script.

Each subcommand lives in `cloister/cli/<name>.py` and exposes `register(subparsers)`.
Registration must stay cheap: a command imports grpc, mcp or the enclave only inside its
handler, so `cloister attest verify` on an auditor's laptop never loads the relay.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cloister.verify.errors import CloisterError

COMMANDS = ("up", "enclave", "relay", "token", "attest", "audit", "policy", "witness", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloister",
        description="MCP control plane with an attested policy engine and audit log.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"cloister.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["enclave"]:
        # The enclave has its own entry points, with their own options: the image's (real NSM),
        # or the development launcher that supplies a mock NSM from outside the image.
        if any(a == "--mock-nsm" or a.startswith("--mock-nsm=") for a in argv[1:]):
            from cloister.dev.enclave import main as enclave_main
        else:
            from cloister.enclave.__main__ import main as enclave_main
        return enclave_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except CloisterError as exc:
        print(f"cloister {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
