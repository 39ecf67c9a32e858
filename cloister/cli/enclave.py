"""`cloister enclave`: run the enclave service (the trusted half). See `cloister.enclave.__main__`.

`cloister.cli` hands `cloister enclave ...` straight to `cloister.enclave.__main__.main`; this module only
makes the command appear in `cloister --help`.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "enclave", help="run the enclave: --listen vsock:PORT|unix:PATH|tcp:HOST:PORT --config FILE [--mock-nsm DIR]"
    )
    p.set_defaults(handler=lambda _args: 2)
