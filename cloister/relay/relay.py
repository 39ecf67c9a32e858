"""The relay: the untrusted half that agents, upstream servers and auditors talk to.

- Agents speak MCP (official SDK, streamable HTTP at `/mcp`) with `Authorization: Bearer <JWT>`.
  `tools/list` shows only what the enclave says the agent may call. `tools/call` asks the
  enclave first, persists the decision entry, and only then forwards an allowed call upstream
  with the enclave's grant in `params._meta`. The outcome is recorded by the enclave and
  persisted before the agent gets its answer.
- Auditors read the log over HTTP at `/log/...` (C2SP tlog-tiles) and ask for attested
  checkpoints; anyone can ask for the enclave's attestation at `/attestation?nonce=HEX`. Stored
  bodies go only to holders of the auditor token, sealed to the auditor key when configured.

The relay can drop or delay traffic, but it cannot forge a decision, a grant, a log entry or
a checkpoint: those are signed inside the enclave, and upstreams and auditors check them.

This module wires the relay's roles together, each in its own module:

| `state`        | what the roles share: config, enclave client, log storage, attestation, health |
| `lifecycle`    | start-up, enclave readiness, resume, policy load, attestation refresh |
| `identity`     | upstream identity: evidence carried to the enclave |
| `mcp_handlers` | MCP for agents: tools/list, the attestation resource, tools/call's entry |
| `call_path`    | tools/call: authorize, persist, forward, outcome |
| `log_api`      | HTTP: health, attestation, the log's read API |
| `admin`        | HTTP: policy push, tool pins, redaction (admin token) |
| `auth`         | the admin and auditor tokens; strict log indexes |
| `oauth`        | MCP authorization: RFC 9728 metadata, 401 for tokens the enclave refuses |
| `witnessing`   | checkpoints to C2SP witnesses, their cosignatures served beside the log |
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from cloister.relay.admin import Admin
from cloister.relay.auth import ADMIN, refuse_unless
from cloister.relay.call_path import CallPath
from cloister.relay.config import RelayConfig
from cloister.relay.enclave_client import EnclaveClient
from cloister.relay.fast_path import FastPath
from cloister.relay.identity import UpstreamIdentity
from cloister.relay.lifecycle import Lifecycle, bundle_store, newest_bundle
from cloister.relay.log_api import LogApi
from cloister.relay.mcp_handlers import McpHandlers
from cloister.relay.oauth import BundleSettings, ResourceMetadata, TokenCheck, TokenGate, metadata_routes
from cloister.relay.observability import Observability
from cloister.relay.state import RelayState
from cloister.relay.upstreams import Upstreams
from cloister.relay.witnessing import Witnessing, WitnessPacing

log = logging.getLogger("cloister.relay")


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.state = RelayState(
            config, EnclaveClient(config.enclave, config.run_dir, timeout_s=config.enclave_timeout_s)
        )
        self.upstreams = Upstreams(config.upstreams, UpstreamIdentity(self.state))
        self.witnessing = (
            Witnessing(
                config.witnesses,
                config.witness_quorum,
                lambda: self.state.writer,
                deliver=self.state.deliver_cosignatures,
                pacing=WitnessPacing(config.witness_interval_ms / 1000, config.witness_every),
            )
            if config.witnesses
            else None
        )
        if self.witnessing is not None:
            self.state.nudge_witnesses = self.witnessing.nudge
        self.lifecycle = Lifecycle(self.state, self.upstreams, self.witnessing)
        self.calls = CallPath(self.state, self.upstreams)
        self.mcp_handlers = McpHandlers(self.state, self.upstreams, self.calls)
        self.log_api = LogApi(self.state, self.upstreams, self.witnessing)
        self.admin = Admin(self.state, self.upstreams)
        self.mcp = self.mcp_handlers.server()
        self.oauth = BundleSettings(
            config.mcp_resource,
            config.authorization_servers,
            config.oauth_scopes,
            config.token_gate,
            bundle=lambda: newest_bundle(config),
            stamp=lambda: bundle_stamp(config),
        )
        self.token_check = TokenCheck(self.state.enclave)
        # Observability (decision 0020): /metrics, traces (OTEL_*), the JSON call log (CLOISTER_CALL_LOG).
        self.observability = Observability(self.state, self.upstreams, self.witnessing)
        self.calls.observer = self.observability.observer
        self.log_api.shutting_down = lambda: self.calls.shutting_down()
        self.fast_path: FastPath | None = None

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        await self.lifecycle.start(tg)

    def routes(self) -> list[Route]:
        return [
            *self.observability.routes(),
            *self.log_api.routes(),
            *self.admin.routes(),
            *metadata_routes(self.oauth),
            Route("/admin/fast-path", self.fast_path_stats),
        ]

    def asgi_app(self) -> ASGIApp:
        app = self.mcp.streamable_http_app(host=self.config.host, custom_starlette_routes=self.routes())
        # The hot tools/call skips the SDK's server stack (decision 0023); TokenGate stays in front.
        self.fast_path = FastPath(app, self.mcp, self.mcp_handlers)
        return TokenGate(self.fast_path, self.oauth, self.token_check)

    async def fast_path_stats(self, request: Request) -> Response:
        """How many requests the fast path answered and left to the SDK (admin only, a debug stat)."""
        refused = refuse_unless(request, ADMIN, self.config.admin_token, "the fast path's stats")
        if refused is not None:
            return refused
        stats = self.fast_path.stats.as_dict() if self.fast_path is not None else {}
        return JSONResponse(stats, headers={"Cache-Control": "no-store"})

    async def close(self) -> None:
        # Calls in flight get their outcome ("relay shutting down") before storage and the enclave close.
        await self.calls.shutdown()
        self.upstreams.stop()
        await self.state.writer.close()
        await self.state.enclave.close()
        self.observability.close()


def bundle_stamp(config: RelayConfig) -> object:
    """What changes when a bundle is pushed or the configured one replaced: names, sizes, times."""
    paths = sorted(bundle_store(config).glob("v*.signed")) + ([config.bundle] if config.bundle else [])
    stamp = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        stamp.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(stamp)


class RequireBearer(TokenGate):
    """The door without the enclave's check: only a missing bearer token gets a 401 (the
    fuzzer's name for the middleware, cloister.dev.fuzz)."""

    def __init__(self, app: ASGIApp) -> None:
        meta = ResourceMetadata(resource="http://127.0.0.1/mcp", authorization_servers=())
        super().__init__(app, lambda: (meta, False), None)


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run(config: RelayConfig) -> None:
    """`serve` on uvloop's event loop where it is installed (asyncio's otherwise)."""
    with _signals_after_close() as stopped_by:
        anyio.run(serve, config, backend_options={"use_uvloop": _available("uvloop")})
    for sig in stopped_by:  # the clean close is done: end as the signal asked
        signal.raise_signal(sig)


@contextlib.contextmanager
def _signals_after_close() -> Iterator[list[int]]:
    """uvicorn stops on SIGINT/SIGTERM, then re-raises the signal as `serve()` returns, under the
    handlers it found. With the default ones that killed the process before `Relay.close()` ran,
    so open MCP tasks never recorded their outcome and storage never closed. Here the handlers it
    finds only note the signal; it is raised again (defaults restored) once the relay has closed.
    A second signal while closing ends the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    seen: list[int] = []

    def note(sig: int, _frame: object) -> None:
        if sig in seen:  # asked twice: stop now
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)
        seen.append(sig)

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, note) for sig in handled}
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def serve(config: RelayConfig, *, ready: Callable[[Relay], Coroutine[Any, Any, None]] | None = None) -> None:
    import uvicorn

    relay = Relay(config)
    async with anyio.create_task_group() as tg:
        await relay.start(tg)
        # httptools parses HTTP/1.1 in C; h11 (pure Python) where it is not installed. The event
        # loop is the caller's (`run` picks uvloop); uvicorn's `loop` only applies to uvicorn.run.
        http = "httptools" if _available("httptools") else "h11"
        server = uvicorn.Server(
            uvicorn.Config(
                relay.asgi_app(), host=config.host, port=config.port, log_level="warning", lifespan="on", http=http
            )
        )
        relay.calls.shutting_down = lambda: server.should_exit
        log.info("relay serving MCP at http://%s:%d/mcp", config.host, config.port)
        if ready is not None:
            tg.start_soon(ready, relay)
        try:
            await server.serve()
        finally:
            await relay.close()
            tg.cancel_scope.cancel()
