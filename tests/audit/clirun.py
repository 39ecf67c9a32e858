"""Run the `cloister` CLI in this process and capture what it prints."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

from cloister.cli import main


@dataclass
class Run:
    code: int
    out: str
    err: str
    raw: bytes  # stdout as bytes (receipts are written as bytes)


def cli(*argv: str) -> Run:
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    err = io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    out.flush()
    data = raw.getvalue()
    return Run(code, data.decode("utf-8", "replace"), err.getvalue(), data)
