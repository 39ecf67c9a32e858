"""The relay's observability, wired in one place (decision 0020): Prometheus metrics at
`/metrics`, OpenTelemetry traces (off unless OTEL_* asks), the JSON call log, and the proof clock
that times each upstream's last verified identity.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cloister.relay.calllog import call_log_from_env
from cloister.relay.metrics import CONTENT_TYPE_LATEST, ProofClock, Registry
from cloister.relay.observe import CallObserver
from cloister.relay.state import RelayState
from cloister.relay.telemetry import Tracing, tracing_from_env
from cloister.relay.upstreams import IdentityReporter, Upstreams
from cloister.relay.witnessing import Witnessing

__all__ = ["Observability"]


class _TimedReporter:
    """The upstreams' identity reporter, noting when the enclave last verified each one."""

    def __init__(self, inner: IdentityReporter, proofs: ProofClock) -> None:
        self.inner = inner
        self.proofs = proofs

    async def challenge(self, server: str, *, reconnect: bool) -> tuple[bytes, str] | None:
        return await self.inner.challenge(server, reconnect=reconnect)

    async def report(self, server: str, **kwargs: Any) -> str:
        status = await self.inner.report(server, **kwargs)
        self.proofs.reported(server, status)
        return status


class Observability:
    def __init__(
        self,
        state: RelayState,
        upstreams: Upstreams,
        witnessing: Witnessing | None,
        *,
        env: Mapping[str, str] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.metrics = Registry()
        self.metrics.attach(state, upstreams, witnessing)
        self.tracing = tracing if tracing is not None else tracing_from_env(env)
        self.observer = CallObserver(self.metrics, self.tracing, call_log_from_env(env))
        for u in upstreams.by_name.values():
            if u.reporter is not None:
                u.reporter = _TimedReporter(u.reporter, self.metrics.proofs)

    def routes(self) -> list[Route]:
        return [Route("/metrics", self.exposition)]

    async def exposition(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def close(self) -> None:
        if self.tracing is not None:
            self.tracing.shutdown()
