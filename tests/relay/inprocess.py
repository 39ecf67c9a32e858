"""The relay's enclave client answered by the enclave's own servicer in this process, no sockets.

`InProcessEnclave` is `cloister.relay.enclave_client.EnclaveClient` with only its transport
replaced: the typed methods build the real request messages, `EnclaveService` (over an
`EnclaveCore`, e.g. the test world's) answers them, and an aborted call becomes the relay's
exception through the client's own `enclave_error`, as a gRPC status would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NoReturn

import grpc

from cloister.enclave.core import EnclaveCore
from cloister.enclave.service import EnclaveService
from cloister.relay.config import RelayConfig
from cloister.relay.enclave_client import EnclaveClient, enclave_error


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class ServicerContext:
    """What EnclaveService uses of a grpc.ServicerContext: abort raises, as gRPC's does."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Aborted(code, details)


class InProcessEnclave(EnclaveClient):
    def __init__(self, core: EnclaveCore, run_dir: Path) -> None:
        super().__init__("unix:/nonexistent/enclave.sock", run_dir)  # never started: no bridge, no socket
        self.service = EnclaveService(core)
        self.reachable = True  # False: every call fails as a dropped connection does

    def restart(self, core: EnclaveCore) -> None:
        """A new enclave behind the same endpoint (fresh keys, no log yet)."""
        self.service = EnclaveService(core)

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        if not self.reachable:
            raise enclave_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
        if hasattr(request, "__aiter__"):  # a client stream (ResumeLog): the servicer takes an iterator
            request = iter([r async for r in request])
        try:
            return getattr(self.service, method)(request, ServicerContext())
        except Aborted as exc:
            raise enclave_error(exc.code, exc.details) from exc


def relay_config(tmp: Path, **changes: Any) -> RelayConfig:
    """A relay config for in-process tests: storage under `tmp`, no enclave socket, no upstreams."""
    config = RelayConfig(
        path=tmp / "relay.toml",
        host="127.0.0.1",
        port=0,
        public_url="http://relay.invalid",
        enclave="unix:/nonexistent/enclave.sock",
        bundle=None,
        storage=str(tmp / "log"),
        s3_endpoint_url=None,
        run_dir=tmp / "run",
        trust_root="mock",
        max_argument_bytes=1 << 20,
        enclave_timeout_s=5.0,
        upstreams=(),
    )
    return dataclasses.replace(config, **changes)
