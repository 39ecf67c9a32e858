"""Reading a command's input file (or standard input) with a size cap, for the CLIs."""

from __future__ import annotations

import sys
from pathlib import Path


class InputError(ValueError):
    """The input cannot be read or is too large; the message says which and why."""


def read_capped(name: str, limit: int, what: str) -> bytes:
    """The bytes of file `name` ("-" for standard input), refusing more than `limit` bytes."""
    try:
        if name == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with Path(name).open("rb") as f:
                data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise InputError(f"{name}: more than {limit} bytes, not {what}")
    return data
