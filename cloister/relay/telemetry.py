"""OpenTelemetry traces for the relay, off unless the operator asks (decision 0020).

On when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`) or an OTLP endpoint is set
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), unless `OTEL_SDK_DISABLED=true`.
Everything else is the SDK's own reading of the standard variables: `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` (service.name defaults to `cloister-relay`), `OTEL_TRACES_SAMPLER[_ARG]`,
`OTEL_EXPORTER_OTLP_*` (endpoint, headers, timeout) and `OTEL_BSP_*` (batching).

Off, nothing is imported and the call path only tests `tracing is None`. On, the MCP SDK's own
spans come alive too: `tools/call <name>` (a SERVER span whose parent is the agent's
`params._meta.traceparent`, if any) and `MCP send tools/call` to the upstream, which carries
`traceparent` in the upstream request's `params._meta` (SEP-414), so the upstream's spans join the
agent's trace. Cloister adds the call path's phases under the server span, made after the call
from the timings the call path already takes (no extra work while the call runs):

    tools/call refunds___refund.create          (MCP SDK)
      cloister.enclave.authorize                log index, decision, deny code, policy ids, agent
      cloister.log.persist                      the decision entry durable
      cloister.upstream                         server, tool, result   [MCP send tools/call: sibling]
      cloister.enclave.record_outcome           outcome index
      cloister.log.persist                      the outcome entry durable

The enclave has no network, so it exports no spans: `cloister.enclave.authorize` is the relay's
view of the Authorize call (vsock round trip included).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cloister import __version__
from cloister.relay.calllog import SettingError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("cloister.relay")

__all__ = ["Tracing", "tracing_from_env"]

_PHASE_SPANS = (
    "cloister.enclave.authorize",
    "cloister.log.persist",
    "cloister.upstream",
    "cloister.enclave.record_outcome",
    "cloister.log.persist",
)


def _exporters(env: Mapping[str, str]) -> list[str]:
    names = env.get("OTEL_TRACES_EXPORTER")
    if names is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        names = "otlp" if endpoint else "none"
    return [n.strip().lower() for n in names.split(",") if n.strip() and n.strip().lower() != "none"]


def tracing_from_env(env: Mapping[str, str] | None = None, *, install_global: bool = True) -> Tracing | None:
    """Tracing as the OTEL_* variables ask, or None (the default: off).

    An exporter this relay does not have is an error at start (SettingError), not a silent no-op."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = _exporters(env)
    if not names:
        return None
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol not in (None, "http/protobuf"):
                raise SettingError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: this relay exports http/protobuf only")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            raise SettingError(f"OTEL_TRACES_EXPORTER={name[:40]!r}: this relay knows otlp, console and none")
    return Tracing.with_exporters(exporters, env=env, install_global=install_global)


class Tracing:
    def __init__(self, provider: TracerProvider, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.provider = provider
        self.clock_ns = clock_ns  # wall time for span timestamps (the SDK's own spans use it too)
        self.tracer = provider.get_tracer("cloister.relay", __version__)

    @classmethod
    def with_exporters(
        cls, exporters: Sequence[SpanExporter], *, env: Mapping[str, str] | None = None, install_global: bool = True
    ) -> Tracing:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        env = os.environ if env is None else env
        named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
        provider = TracerProvider(resource=Resource.create({} if named else {"service.name": "cloister-relay"}))
        for exporter in exporters:
            batched = (
                type(exporter).__name__ != "ConsoleSpanExporter" and type(exporter).__name__ != "InMemorySpanExporter"
            )
            provider.add_span_processor(BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter))
        if install_global:
            # The MCP SDK's spans and its traceparent injection use the global provider.
            trace.set_tracer_provider(provider)
        log.info("OpenTelemetry tracing on (%s)", ", ".join(type(e).__name__ for e in exporters))
        return cls(provider)

    def call_spans(
        self, marks: Sequence[float], attributes: Mapping[str, Any], phase_attributes: Sequence[Mapping[str, Any]]
    ) -> None:
        """The call path's phases as child spans of the current span (the MCP SDK's `tools/call`),
        from `marks` (time.perf_counter() at each phase boundary)."""
        from opentelemetry import trace

        offset_ns = self.clock_ns() - int(time.perf_counter() * 1e9)
        current = trace.get_current_span()
        if current.is_recording():
            current.set_attributes(dict(attributes))
        for i, (name, a, b) in enumerate(zip(_PHASE_SPANS, marks, marks[1:], strict=False)):
            span = self.tracer.start_span(
                name,
                start_time=offset_ns + int(a * 1e9),
                attributes=dict(phase_attributes[i]) if i < len(phase_attributes) else None,
            )
            span.end(end_time=offset_ns + int(b * 1e9))

    def shutdown(self) -> None:
        self.provider.shutdown()
