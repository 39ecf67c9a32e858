"""The logs a witness follows, from a TOML file:

    [[log]]
    origin = "cloister.example/log"
    vkeys = ["cloister.example/log+1234abcd+AaBb..."]   # the log's Ed25519 note keys (type 0x01)

An origin appears once; each has at least one key. Checkpoints of any other origin get 404.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from cloister.verify.checkpoint import Checkpoint
from cloister.verify.errors import DecodeError
from cloister.verify.merkle import EMPTY_ROOT
from cloister.verify.note import Ed25519NoteVerifier
from cloister.witness.state import WitnessSetupError

__all__ = ["Logs", "load_logs", "parse_logs"]

Logs = dict[str, tuple[Ed25519NoteVerifier, ...]]


def _parse_log(i: int, entry: Any) -> tuple[str, tuple[Ed25519NoteVerifier, ...]]:
    where = f"[[log]] number {i + 1}"
    if not isinstance(entry, dict):
        raise WitnessSetupError(f"{where} is not a table")
    extra = set(entry) - {"origin", "vkeys"}
    if extra:
        raise WitnessSetupError(f"{where} has unknown keys: {', '.join(sorted(extra))}")
    origin, vkeys = entry.get("origin"), entry.get("vkeys")
    if not isinstance(origin, str):
        raise WitnessSetupError(f'{where} needs origin = "<the log\'s origin line>"')
    if not isinstance(vkeys, list) or not vkeys or not all(isinstance(k, str) for k in vkeys):
        raise WitnessSetupError(f'{where} ({origin!r}) needs vkeys = ["<log verifier key>", ...]')
    try:
        Checkpoint(origin, 0, EMPTY_ROOT)  # the origin must be a valid checkpoint origin line
        keys = tuple(Ed25519NoteVerifier.from_vkey(k) for k in vkeys)
    except DecodeError as e:
        raise WitnessSetupError(f"{where} ({origin!r}): {e}") from e
    return origin, keys


def parse_logs(data: dict[str, Any]) -> Logs:
    extra = set(data) - {"log"}
    if extra:
        raise WitnessSetupError(f"logs file has unknown keys: {', '.join(sorted(extra))} (want [[log]] tables)")
    entries = data.get("log", [])
    if not isinstance(entries, list):
        raise WitnessSetupError("logs file: 'log' must be an array of tables ([[log]])")
    logs: Logs = {}
    for i, entry in enumerate(entries):
        origin, keys = _parse_log(i, entry)
        if origin in logs:
            raise WitnessSetupError(f"logs file lists origin {origin!r} twice")
        logs[origin] = keys
    if not logs:
        raise WitnessSetupError("logs file lists no log ([[log]] with origin and vkeys)")
    return logs


def load_logs(path: Path) -> Logs:
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise WitnessSetupError(f"cannot read the logs file {path}: {e}") from e
    return parse_logs(data)
