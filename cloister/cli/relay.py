"""`cloister relay --config FILE`: run the parent relay (MCP for agents, log API for auditors)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "relay", help="run the relay: MCP at /mcp for agents, the log at /log for auditors"
    )
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="relay configuration (TOML)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import os

    from cloister.relay.config import load_relay_config
    from cloister.relay.relay import run

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s relay %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpx2", "mcp", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from cloister.verify.errors import CloisterError
    from cloister.wire.bridge import Endpoint, choose_mode, set_switch_interval

    config = load_relay_config(args.config)
    # 0.5 ms only where a Python bridge runs (vsock); Python's default where gRPC dials the
    # enclave itself (decision 0022: the short interval measured slower there).
    try:
        set_switch_interval(choose_mode(Endpoint.parse(config.enclave), os.environ.get("CLOISTER_BRIDGE", "auto")))
    except CloisterError as bad:
        print(f"cloister relay: {bad}", file=sys.stderr)
        return 2
    failures: list[BaseException] = []
    try:
        run(config)  # on uvloop where installed (decision 0023)
    except* CloisterError as group:
        failures.extend(group.exceptions)
    except* KeyboardInterrupt:
        pass
    for exc in failures:
        print(f"cloister relay: {exc}", file=sys.stderr)
    return 1 if failures else 0
