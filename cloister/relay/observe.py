"""What the call path reports once a call is decided or done, fanned out to metrics
(cloister.relay.metrics), traces (cloister.relay.telemetry) and the JSON call log
(cloister.relay.calllog). Each sink is optional; with none, a report is a few attribute tests.

The call path calls these from its existing phase timings (`marks`, time.perf_counter() at each
boundary): nothing here runs while the enclave, storage or an upstream is being waited on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from cloister.relay.calllog import MAX_NAME
from cloister.wire import enclave_pb2 as pb

if TYPE_CHECKING:
    from cloister.relay.calllog import CallLog
    from cloister.relay.metrics import Registry
    from cloister.relay.telemetry import Tracing
    from cloister.relay.upstreams import UpstreamError

__all__ = ["CallObserver", "upstream_result"]

log = logging.getLogger("cloister.relay")

_PHASE_NAMES = ("decision", "decision_persist", "upstream", "outcome", "outcome_persist")


def deny_code(verdict: pb.AuthorizeResponse) -> str:
    """The denial class as a fixed label (the proto enum's name), never free text."""
    try:
        name = pb.DenyCode.Name(verdict.denial)
    except ValueError:
        return "unknown"
    return name.removeprefix("DENY_CODE_").lower()


def upstream_result(result: Any, failure: UpstreamError | None) -> str:
    if failure is not None:
        return failure.kind if failure.kind in ("timeout", "unavailable", "unwitnessed", "error") else "error"
    return "tool_error" if getattr(result, "is_error", False) else "ok"


def _durations(marks: Sequence[float]) -> dict[str, float]:
    return {name: round(1000 * (b - a), 3) for name, a, b in zip(_PHASE_NAMES, marks, marks[1:], strict=False)}


@contextmanager
def _never_fails() -> Iterator[None]:
    """Observing a call never changes its answer: the call is decided and logged already."""
    try:
        yield
    except Exception:
        log.exception("reporting a call to metrics, traces or the call log failed")


class CallObserver:
    def __init__(
        self, metrics: Registry | None = None, tracing: Tracing | None = None, call_log: CallLog | None = None
    ) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.call_log = call_log

    def unavailable(self, server: str, tool: str) -> None:
        """No decision (the enclave unavailable or refusing): nothing was forwarded."""
        with _never_fails():
            self._unavailable(server, tool)

    def _unavailable(self, server: str, tool: str) -> None:
        if self.metrics is not None:
            self.metrics.calls.call(server, tool, "unavailable")
        if self.call_log is not None:
            self.call_log.write({"server": server, "tool": tool, "decision": "unavailable"})

    def denied(
        self, server: str, tool: str, verdict: pb.AuthorizeResponse, marks: Sequence[float], args: bytes
    ) -> None:
        with _never_fails():
            self._sinks(server, tool, verdict, marks, args, None, None, None)

    def completed(
        self,
        server: str,
        tool: str,
        verdict: pb.AuthorizeResponse,
        marks: Sequence[float],
        args: bytes,
        outcome: pb.OutcomeResponse,
        result: Any,
        failure: UpstreamError | None,
    ) -> None:
        with _never_fails():
            self._sinks(server, tool, verdict, marks, args, outcome, result, failure)

    def _sinks(
        self,
        server: str,
        tool: str,
        verdict: pb.AuthorizeResponse,
        marks: Sequence[float],
        args: bytes,
        outcome: pb.OutcomeResponse | None,
        result: Any,
        failure: UpstreamError | None,
    ) -> None:
        allowed = verdict.decision == pb.ALLOW
        decision = "allow" if allowed else "deny"
        code = "" if allowed else deny_code(verdict)
        upstream = upstream_result(result, failure) if outcome is not None else None
        if self.metrics is not None:
            m = self.metrics
            m.calls.call(server, tool, decision)
            if not allowed:
                m.calls.denied(code)
            if upstream is not None:
                m.calls.upstream_result(server, upstream)
            m.calls.phases(list(marks), decision)
            if verdict.limits:
                m.calls.limits(verdict.limits)
            last = outcome.log if outcome is not None else verdict.log
            m.note_sequenced(last.first_index + len(last.entries))
        if self.tracing is not None:
            self._spans(server, tool, verdict, decision, code, marks, outcome, upstream)
        if self.call_log is not None:
            self.call_log.write(
                {
                    "agent": verdict.agent,
                    "server": server,
                    "tool": tool,
                    "decision": decision,
                    "deny_code": code,
                    "reason": verdict.reason,
                    "policies": list(verdict.policy_ids),
                    "decision_index": verdict.log_index,
                    "outcome_index": outcome.log_index if outcome is not None else None,
                    "duration_ms": _durations(marks),
                    "total_ms": round(1000 * (marks[-1] - marks[0]), 3) if len(marks) > 1 else 0.0,
                    "upstream": None
                    if upstream is None
                    else {"result": upstream, "error": str(failure)[:1000] if failure is not None else ""},
                },
                args,
            )

    def _spans(
        self,
        server: str,
        tool: str,
        verdict: pb.AuthorizeResponse,
        decision: str,
        code: str,
        marks: Sequence[float],
        outcome: pb.OutcomeResponse | None,
        upstream: str | None,
    ) -> None:
        assert self.tracing is not None
        decided = {
            "cloister.log_index": verdict.log_index,
            "cloister.decision": decision,
            "cloister.deny_code": code,
            "cloister.policy_ids": list(verdict.policy_ids),
            "cloister.agent": verdict.agent,
        }
        server, tool = server[:MAX_NAME], tool[:MAX_NAME]  # an agent's names, bounded in every span
        common = {"cloister.server": server, "cloister.tool": tool, **decided}
        if outcome is not None:
            common["cloister.outcome_index"] = outcome.log_index
        phases: list[dict[str, Any]] = [
            decided,
            {"cloister.log_index": verdict.log_index},
            {"cloister.server": server, "cloister.tool": tool, "cloister.upstream.result": upstream or ""},
            {"cloister.outcome_index": outcome.log_index if outcome is not None else -1},
            {"cloister.log_index": outcome.log_index if outcome is not None else -1},
        ]
        self.tracing.call_spans(marks, common, phases)
