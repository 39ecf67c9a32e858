"""Prometheus metrics for operators (`GET /metrics`, prometheus-client's text exposition).

Two kinds, named as Prometheus conventions say (`cloister_` prefix, base units, `_total` for
counters, `_seconds` for durations, `_entries` for log sizes):

- per call, counted on the call path (`CallMetrics`): calls by server, tool and decision, denials
  by code, upstream results, and one latency histogram per phase of the call path;
- read when scraped (`RelayCollector`): log sizes (sequenced, durable, published, witnessed) and
  lags, the enclave's readiness and policy version, the attestation's age, each upstream's state
  and the age of its last identity proof, and the last remaining budget per limit.

Labels an agent can choose (server and tool names of denied calls) are capped (`LabelCap`): past
MAX_LABEL_SETS distinct values the rest count as `_other`, so no agent can grow the exposition
(or the relay's memory) without bound. Every relay has its own registry (tests run many).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from cloister import __version__

if TYPE_CHECKING:
    from cloister.relay.state import RelayState
    from cloister.relay.upstreams import Upstreams
    from cloister.relay.witnessing import Witnessing

__all__ = ["CONTENT_TYPE_LATEST", "MAX_LABEL_SETS", "PHASES", "CallMetrics", "LabelCap", "Registry", "RelayCollector"]

MAX_LABEL_SETS = 500  # distinct (server, tool) pairs before the rest count as "_other"
MAX_LABEL_LEN = 64
MAX_LIMITS = 100  # limit ids whose remaining budget is exported
OTHER = "_other"
# The call path's phases, in order (cloister.relay.call_path's `marks`).
PHASES = ("decision", "decision_persist", "upstream", "outcome", "outcome_persist")
# What cloister.relay.upstreams.Upstream.state may be (anything else is exported as "other").
UPSTREAM_STATES = ("connecting", "up", "quarantined", "down", "stopped")
# Latency buckets from 100 µs (an enclave decision on a warm host) to 60 s (a slow upstream).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class LabelCap:
    """Label values an agent may influence, bounded: the first `limit` distinct tuples are kept
    as they are (each value cut to MAX_LABEL_LEN), later new ones become OTHER."""

    def __init__(self, limit: int = MAX_LABEL_SETS) -> None:
        self.limit = limit
        self._seen: set[tuple[str, ...]] = set()

    def __call__(self, *values: str) -> tuple[str, ...]:
        key = tuple(v[:MAX_LABEL_LEN] for v in values)
        if key in self._seen:
            return key
        if len(self._seen) >= self.limit:
            return tuple(OTHER for _ in values)
        self._seen.add(key)
        return key


class CallMetrics:
    """What the call path counts: registered in `registry`, updated once per call."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "cloister_calls",
            "tools/call requests by server, tool and the enclave's decision (unavailable: no decision, fail closed)",
            ["server", "tool", "decision"],
            registry=registry,
        )
        self.denials = Counter(
            "cloister_denials", "Denied calls by the enclave's denial class", ["code"], registry=registry
        )
        self.upstream = Counter(
            "cloister_upstream_calls",
            "Allowed calls by upstream and what came back (ok, tool_error, error, timeout, unavailable, unwitnessed)",
            ["server", "result"],
            registry=registry,
        )
        self.phase = Histogram(
            "cloister_call_phase_duration_seconds",
            "Time spent in each phase of a call: decision (the enclave's Authorize, as the relay sees it), "
            "decision_persist, upstream, outcome (RecordOutcome), outcome_persist",
            ["phase"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "cloister_call_duration_seconds",
            "Time from the enclave request to the outcome being durable (or the denial persisted)",
            ["decision"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.cap = LabelCap()
        # Pre-bound children: the hot path does no label lookup for them.
        self._phase = [self.phase.labels(p) for p in PHASES]
        self._duration = {d: self.duration.labels(d) for d in ("allow", "deny")}
        self.limit_remaining: dict[str, float] = {}
        # Children by their raw label values (bounded like the cap): the hot path skips the
        # registry's lock and label checks for a pair it has seen.
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Counter, key: tuple[str, ...], labels: Callable[[], tuple[str, ...]]) -> Any:
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels())
            if len(self._children) < 4 * MAX_LABEL_SETS:
                self._children[key] = child
        return child

    def call(self, server: str, tool: str, decision: str) -> None:
        self._child(self.calls, ("c", server, tool, decision), lambda: (*self.cap(server, tool), decision)).inc()

    def denied(self, code: str) -> None:
        self._child(self.denials, ("d", code), lambda: (code,)).inc()

    def upstream_result(self, server: str, result: str) -> None:
        self._child(self.upstream, ("u", server, result), lambda: (self.cap(server, "")[0], result)).inc()

    def phases(self, marks: list[float], decision: str) -> None:
        for child, a, b in zip(self._phase, marks, marks[1:], strict=False):
            child.observe(b - a)
        if len(marks) > 1:
            self._duration[decision].observe(marks[-1] - marks[0])

    def limits(self, states: Iterable[Any]) -> None:
        for s in states:
            if s.limit_id in self.limit_remaining or len(self.limit_remaining) < MAX_LIMITS:
                try:
                    self.limit_remaining[s.limit_id[:MAX_LABEL_LEN]] = float(s.remaining)
                except ValueError:  # not a number: nothing to plot
                    continue


@dataclass
class ProofClock:
    """When each upstream last had its identity verified by the enclave (monotonic seconds)."""

    clock: Callable[[], float] = time.monotonic
    verified_at: dict[str, float] = field(default_factory=dict)

    def reported(self, server: str, status: str) -> None:
        if status == "verified":
            self.verified_at[server] = self.clock()


class RelayCollector:
    """Gauges read from the relay's state at scrape time: nothing on the call path."""

    def __init__(
        self,
        state: RelayState,
        upstreams: Upstreams,
        witnessing: Witnessing | None,
        calls: CallMetrics,
        proofs: ProofClock,
        *,
        sequenced: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.upstreams = upstreams
        self.witnessing = witnessing
        self.calls = calls
        self.proofs = proofs
        self.sequenced = sequenced
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("cloister_build", "The relay's version", value={"version": __version__})
        yield from self._log()
        yield from self._enclave()
        yield from self._upstreams()
        remaining = GaugeMetricFamily(
            "cloister_limit_remaining",
            "What a rate limit or spend cap had left at the last decision that reported it (per limit id)",
            labels=["limit"],
        )
        for limit, value in sorted(self.calls.limit_remaining.items()):
            remaining.add_metric([limit], value)
        yield remaining

    def _log(self) -> Iterator[Metric]:
        try:
            writer = self.state.writer
        except RuntimeError:  # storage not open yet
            writer = None
        durable = writer.persisted_size if writer is not None else 0
        published = writer.store.published_size if writer is not None else 0
        sizes = GaugeMetricFamily(
            "cloister_log_size_entries",
            "Log size by stage: sequenced (seen from the enclave), durable (persisted with a checkpoint), "
            "published (tiles readable at /log/), witnessed (cosigned by a quorum)",
            labels=["stage"],
        )
        sizes.add_metric(["sequenced"], max(self.sequenced(), durable))
        sizes.add_metric(["durable"], durable)
        sizes.add_metric(["published"], published)
        ws = self.state.witness_state
        witnessed = ws.witnessed_size if ws is not None and ws.required else None
        if witnessed is not None:
            sizes.add_metric(["witnessed"], witnessed)
        yield sizes
        yield GaugeMetricFamily(
            "cloister_log_publication_lag_entries",
            "Durable entries not yet published as tiles",
            value=max(durable - published, 0),
        )
        if witnessed is not None:
            yield GaugeMetricFamily(
                "cloister_log_witness_lag_entries",
                "Durable entries beyond the newest quorum-cosigned checkpoint of this run",
                value=max(durable - witnessed, 0),
            )

    def _enclave(self) -> Iterator[Metric]:
        info, ws = self.state.health_info, self.state.witness_state
        ready = bool(info and info.ready)
        yield GaugeMetricFamily("cloister_enclave_ready", "1 when the enclave runs a log", value=int(ready))
        granting = ready and (ws is None or ws.granting)
        yield GaugeMetricFamily(
            "cloister_enclave_granting",
            "1 when the enclave grants calls (ready, and its witnesses keep up: decision 0015)",
            value=int(granting),
        )
        yield GaugeMetricFamily(
            "cloister_policy_version", "Version of the policy bundle in force", value=info.policy_version if info else 0
        )
        if self.state.attested_at:
            yield GaugeMetricFamily(
                "cloister_attestation_age_seconds",
                "Age of the enclave attestation the relay sends beside grants",
                value=max(self.clock() - self.state.attested_at, 0.0),
            )

    def _upstreams(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("cloister_upstream_up", "1 when the upstream session is connected", labels=["server"])
        states = GaugeMetricFamily(
            "cloister_upstream_state",
            "1 for the upstream's current state (connecting, up, quarantined, down, stopped, other)",
            labels=["server", "state"],
        )
        verified = GaugeMetricFamily(
            "cloister_upstream_identity_verified",
            "1 when the enclave verified the upstream's identity (nitro, tls or checksum)",
            labels=["server"],
        )
        age = GaugeMetricFamily(
            "cloister_upstream_proof_age_seconds",
            "Seconds since the enclave last verified the upstream's identity",
            labels=["server"],
        )
        now = self.clock()
        for name, u in sorted(self.upstreams.by_name.items()):
            up.add_metric([name], int(u.state == "up"))
            current = u.state if u.state in UPSTREAM_STATES else "other"
            for s in (*UPSTREAM_STATES, "other"):
                states.add_metric([name, s], int(s == current))
            verified.add_metric([name], int(str(u.identity).endswith("verified")))
            at = self.proofs.verified_at.get(name)
            if at is not None:
                age.add_metric([name], max(now - at, 0.0))
        yield up
        yield states
        yield verified
        yield age


class Registry:
    """A relay's metrics: the per-call counters and the scrape-time collector, in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = CallMetrics(self.registry)
        self.proofs = ProofClock()
        self.sequenced = 0

    def note_sequenced(self, size: int) -> None:
        if size > self.sequenced:
            self.sequenced = size

    def attach(self, state: RelayState, upstreams: Upstreams, witnessing: Witnessing | None) -> None:
        self.registry.register(
            RelayCollector(state, upstreams, witnessing, self.calls, self.proofs, sequenced=lambda: self.sequenced)
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
