"""The relay's connection to the enclave: gRPC over the parent-side vsock bridge.

grpcio cannot dial vsock, so the relay runs the bridge in reverse: it listens on a private
UNIX socket in `run_dir` and, per connection, dials the enclave's endpoint (vsock in
production, AF_UNIX or TCP in mock mode). Every call has a deadline; any failure is an
`EnclaveUnavailable` (network, restart, timeout) or an `EnclaveRefused` (the enclave answered
with an error), and the relay treats both as "no allow": it forwards nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from cloister.verify.errors import CloisterError
from cloister.wire import enclave_pb2 as pb
from cloister.wire import enclave_pb2_grpc as pb_grpc
from cloister.wire.bridge import Bridge, Endpoint
from cloister.wire.contract import MAX_MESSAGE_BYTES

_T = TypeVar("_T")


class EnclaveUnavailable(CloisterError):
    """The enclave could not be reached or did not answer in time."""


class EnclaveRefused(CloisterError):
    """The enclave answered with an error status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def enclave_error(code: grpc.StatusCode, details: str) -> EnclaveUnavailable | EnclaveRefused:
    """What a gRPC status from the enclave means to the relay: no answer, or a refusal."""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return EnclaveUnavailable(f"enclave unavailable ({code.name}): {details}")
    return EnclaveRefused(code, details or code.name)


class EnclaveClient:
    def __init__(self, endpoint: str, run_dir: Path, *, timeout_s: float = 5.0) -> None:
        self.endpoint = Endpoint.parse(endpoint)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._socket = run_dir / "parent-bridge.sock"
        self.bridge = Bridge(Endpoint(kind="unix", path=str(self._socket)), self.endpoint)
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def start(self) -> None:
        self.bridge.start()
        self._channel = grpc.aio.insecure_channel(
            f"unix:{self._socket}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._stub = pb_grpc.EnclaveStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self.bridge.stop()

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        if self._stub is None:
            raise EnclaveUnavailable("the enclave client is not started")
        try:
            return await getattr(self._stub, method)(request, timeout=timeout or self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise enclave_error(exc.code(), exc.details() or "") from exc

    async def health(self, timeout: float | None = None) -> pb.HealthResponse:
        resp: pb.HealthResponse = await self._call("Health", pb.HealthRequest(), timeout)
        return resp

    async def add_cosignatures(self, cosigned_checkpoint: bytes) -> pb.WitnessState:
        req = pb.AddCosignaturesRequest(cosigned_checkpoint=cosigned_checkpoint)
        resp: pb.WitnessState = await self._call("AddCosignatures", req)
        return resp

    async def start_log(self, resume: pb.ResumeFrom | None) -> pb.StartLogResponse:
        req = pb.StartLogRequest(resume=resume) if resume is not None else pb.StartLogRequest()
        resp: pb.StartLogResponse = await self._call("StartLog", req, 60)
        return resp

    async def resume_log(
        self, start: pb.ResumeFrom, chunks: AsyncIterator[pb.ResumeChunk], timeout: float = 600
    ) -> pb.StartLogResponse:
        """Resume the stored log: `start` (without entries), then the entries in `chunks`, streamed."""

        async def requests() -> AsyncIterator[pb.ResumeChunk]:
            yield pb.ResumeChunk(start=start, first_index=start.range_size)
            async for chunk in chunks:
                yield chunk

        resp: pb.StartLogResponse = await self._call("ResumeLog", requests(), timeout)
        return resp

    async def request_key(self) -> bytes:
        """The enclave's Recipient attestation document for the sealed-key exchange."""
        resp: pb.RequestKeyResponse = await self._call("RequestKey", pb.RequestKeyRequest(), 30)
        return resp.attestation_document

    async def open_sealed_key(self, ciphertext_for_recipient: bytes, *, first_start: bool) -> pb.OpenSealedKeyResponse:
        req = pb.OpenSealedKeyRequest(ciphertext_for_recipient=ciphertext_for_recipient, first_start=first_start)
        resp: pb.OpenSealedKeyResponse = await self._call("OpenSealedKey", req, 30)
        return resp

    async def sync(self, persisted_size: int) -> pb.SyncLogResponse:
        resp: pb.SyncLogResponse = await self._call("SyncLog", pb.SyncLogRequest(persisted_size=persisted_size), 30)
        return resp

    async def load_policy(self, bundle: bytes, persisted_size: int) -> pb.LoadPolicyResponse:
        resp: pb.LoadPolicyResponse = await self._call(
            "LoadPolicy", pb.LoadPolicyRequest(bundle=bundle, persisted_size=persisted_size), 60
        )
        return resp

    async def authorize(self, request: pb.AuthorizeRequest) -> pb.AuthorizeResponse:
        resp: pb.AuthorizeResponse = await self._call("Authorize", request)
        return resp

    async def filter_tools(self, token: str, candidates: list[tuple[str, str]]) -> pb.FilterToolsResponse:
        req = pb.FilterToolsRequest(token=token, candidates=[pb.ToolRef(server=s, tool=t) for s, t in candidates])
        resp: pb.FilterToolsResponse = await self._call("FilterTools", req)
        return resp

    async def filter_items(self, token: str, candidates: list[pb.ToolRef]) -> pb.FilterToolsResponse:
        """Which tools, resources, templates or prompts (each ToolRef's `kind`) the agent may see."""
        resp: pb.FilterToolsResponse = await self._call(
            "FilterTools", pb.FilterToolsRequest(token=token, candidates=candidates)
        )
        return resp

    async def record_outcome(self, request: pb.OutcomeRequest) -> pb.OutcomeResponse:
        resp: pb.OutcomeResponse = await self._call("RecordOutcome", request)
        return resp

    async def attest(self, nonce: bytes, *, include_checkpoint: bool = False) -> pb.AttestResponse:
        resp: pb.AttestResponse = await self._call(
            "Attest", pb.AttestRequest(nonce=nonce, include_checkpoint=include_checkpoint)
        )
        return resp

    async def server_challenge(self, server: str, *, reconnect: bool) -> pb.ServerChallengeResponse:
        resp: pb.ServerChallengeResponse = await self._call(
            "ServerChallenge", pb.ServerChallengeRequest(server=server, reconnect=reconnect)
        )
        return resp

    async def report_server(self, report: pb.ServerReport) -> pb.ServerReportResponse:
        resp: pb.ServerReportResponse = await self._call("ReportServer", report, 30)
        return resp

    async def checkpoint(self) -> bytes:
        resp: pb.CheckpointResponse = await self._call("GetCheckpoint", pb.CheckpointRequest())
        return resp.checkpoint

    async def __aenter__(self) -> EnclaveClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.close()
