"""`cloister witness`: a standalone C2SP tlog-witness.

    cloister witness init  --state DIR --name NAME           create the key; print the witness vkey
    cloister witness vkey  --state DIR                       print the witness vkey again
    cloister witness serve --state DIR --listen HOST:PORT --logs logs.toml

The vkey (`<name>+<key id>+<base64(0x04 || key)>`) is what a log or a client pins to verify this
witness's cosignatures. Registration imports nothing heavy; the handlers load cloister.witness.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "witness",
        help="run a C2SP tlog-witness that cosigns checkpoints of the logs it follows",
        description="A standalone witness (c2sp.org/tlog-witness): it verifies each checkpoint's log signature "
        "and consistency with the last one it cosigned, then cosigns it (c2sp.org/tlog-cosignature, Ed25519).",
    )
    verbs = p.add_subparsers(dest="witness_verb", metavar="VERB", required=True)

    v = verbs.add_parser("init", help="create a state directory and its cosigning key; print the vkey")
    v.add_argument("--state", type=Path, required=True, help="the witness's state directory (created, mode 0700)")
    v.add_argument("--name", required=True, help="the witness name, a schema-less URL (e.g. witness.example/w1)")
    v.set_defaults(handler=_init)

    v = verbs.add_parser("vkey", help="print the witness vkey")
    v.add_argument("--state", type=Path, required=True, help="the witness's state directory")
    v.set_defaults(handler=_vkey)

    v = verbs.add_parser("serve", help="serve POST /add-checkpoint")
    v.add_argument("--state", type=Path, required=True, help="the witness's state directory (from init)")
    v.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to bind, e.g. 127.0.0.1:7380")
    v.add_argument("--logs", type=Path, required=True, help="TOML file: [[log]] origin = ..., vkeys = [...]")
    v.set_defaults(handler=_serve)


def _init(args: argparse.Namespace) -> int:
    from cloister.witness.state import init_state

    print(init_state(args.state, args.name).vkey)
    return 0


def _vkey(args: argparse.Namespace) -> int:
    from cloister.witness.state import load_key

    print(load_key(args.state).vkey)
    return 0


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen {value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _serve(args: argparse.Namespace) -> int:
    from cloister.witness.config import load_logs
    from cloister.witness.protocol import Witness
    from cloister.witness.server import make_server
    from cloister.witness.state import WitnessState

    try:
        host, port = _listen(args.listen)
    except ValueError as e:
        print(f"cloister witness serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logs = load_logs(args.logs)
    state = WitnessState.open(args.state, logs)
    try:
        # The one place the wall clock enters: cosignature timestamps, POSIX seconds.
        witness = Witness(state, logs, clock=lambda: int(time.time()))
        server = make_server(witness, host, port)
        print(f"witness {witness.vkey} for {len(logs)} log(s) listening on {server.url}", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
    finally:
        state.close()
    return 0
