"""`cloister enclave`: not implemented yet."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("enclave", help="(not implemented yet)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    print("cloister enclave: not implemented yet")
    return 2
