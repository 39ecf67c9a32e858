"""One structured JSON line per call, for operators' log pipelines (decision 0020).

    {"ts": "2026-12-06T08:01:02.345Z", "event": "call", "agent": "refund-bot", "server": "refunds",
     "tool": "refund.create", "decision": "allow", "deny_code": "", "reason": "...", "policies": [...],
     "decision_index": 41, "outcome_index": 42, "duration_ms": {"decision": 0.41, ...},
     "total_ms": 3.2, "upstream": {"result": "ok", "error": ""}, "paid": ""}

Where it goes: `CLOISTER_CALL_LOG` = `stderr` (the default), `stdout`, `off`, or a file path
(appended, line-buffered). Arguments are never logged unless `CLOISTER_CALL_LOG_ARGUMENTS=1`
(then as the canonical JSON the enclave decided on); results never are. Every field an agent
chooses is cut to a bound, and JSON escaping keeps each record on one line.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from cloister.verify.errors import CloisterError

__all__ = ["CallLog", "SettingError", "call_log_from_env"]

MAX_NAME = 256  # server and tool names as the agent sent them
MAX_TEXT = 1000  # reasons and errors


class SettingError(CloisterError, ValueError):
    """An observability setting (CLOISTER_CALL_LOG, OTEL_*) the relay cannot honour: it stops at start."""


def iso_ms(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CallLog:
    def __init__(
        self, stream: IO[str], *, with_arguments: bool = False, clock: Callable[[], float] = time.time
    ) -> None:
        self.stream = stream
        self.with_arguments = with_arguments
        self.clock = clock
        self._lock = threading.Lock()

    def write(self, record: Mapping[str, Any], arguments: bytes = b"") -> None:
        line: dict[str, Any] = {"ts": iso_ms(self.clock()), "event": "call", **record}
        for key in ("server", "tool", "agent"):
            if isinstance(line.get(key), str):
                line[key] = line[key][:MAX_NAME]
        for key in ("reason",):
            if isinstance(line.get(key), str):
                line[key] = line[key][:MAX_TEXT]
        if self.with_arguments and arguments:
            line["arguments"] = arguments.decode("utf-8", "replace")
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # a closed or full stream never fails a call
                pass


def call_log_from_env(env: Mapping[str, str], *, clock: Callable[[], float] = time.time) -> CallLog | None:
    where = env.get("CLOISTER_CALL_LOG", "stderr").strip() or "stderr"
    with_arguments = env.get("CLOISTER_CALL_LOG_ARGUMENTS", "").strip().lower() in ("1", "true", "yes")
    if where == "off":
        return None
    if where == "stderr":
        return CallLog(sys.stderr, with_arguments=with_arguments, clock=clock)
    if where == "stdout":
        return CallLog(sys.stdout, with_arguments=with_arguments, clock=clock)
    try:
        stream = Path(where).open("a", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives as long as the relay)
    except OSError as exc:
        raise SettingError(f"CLOISTER_CALL_LOG={where!r}: cannot open it for appending: {exc.strerror}") from exc
    return CallLog(stream, with_arguments=with_arguments, clock=clock)
