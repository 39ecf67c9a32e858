"""The relay's connection to the enclave: gRPC, over the parent-side vsock bridge where needed.

grpcio cannot dial vsock, so in production the relay runs the bridge in reverse: it listens on a
private UNIX socket in `run_dir` and, per connection, dials the enclave's vsock endpoint (splice,
or copy). An AF_UNIX or TCP endpoint (mock mode) is dialled directly: no bridge (decision 0022).

The hot calls (authorize, record_outcome, filter_*) travel on one long-lived `Channel` stream,
many in flight, matched by id; the others are unary RPCs. Every call has a deadline; any failure
is an `EnclaveUnavailable` (network, restart, timeout, a broken stream: no answer) or an
`EnclaveRefused` (the enclave answered with an error status, typed), and the relay treats both as
"no allow": it forwards nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
import grpc.aio

from cloister.verify.errors import CloisterError
from cloister.wire import enclave_pb2 as pb
from cloister.wire import enclave_pb2_grpc as pb_grpc
from cloister.wire.bridge import Bridge, Endpoint, choose_mode, grpc_address
from cloister.wire.contract import MAX_CHANNEL_BATCH, MAX_MESSAGE_BYTES

_T = TypeVar("_T")
log = logging.getLogger("cloister.relay.enclave_client")

# Calls in flight on one stream; past this a call fails at once (no unbounded queue in the relay).
MAX_IN_FLIGHT: Final = 4096
# Ids of calls abandoned by their caller (cancelled, timed out) whose answer may still come.
_ABANDONED_KEPT: Final = 4096
_STATUS_BY_NUMBER: Final = {c.value[0]: c for c in grpc.StatusCode}


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


def _status(number: int) -> grpc.StatusCode:
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


class _Stream:
    """One `Channel` stream: requests go out with rising ids from one writer task (a caller's
    cancellation never interrupts a write, which would cancel the whole stream), and a reader task
    resolves each id's future. When the stream ends, for any reason, every call in flight on it
    fails as EnclaveUnavailable: it may or may not have been decided, and no answer is made up."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._abandoned: OrderedDict[int, None] = OrderedDict()
        self._outbox: asyncio.Queue[pb.ChannelRequest] = asyncio.Queue()
        self._carry: pb.ChannelRequest | None = None  # the request that did not fit the last batch
        self._next_id = 1
        self.broken: str | None = None
        self.stray = 0  # answers for ids not in flight (duplicated, unknown): dropped
        self.answered = 0
        loop = asyncio.get_running_loop()
        self.last_read = loop.time()
        self._tasks = (loop.create_task(self._write_loop()), loop.create_task(self._read_loop()))

    async def request(self, kind: str, message: Any, timeout: float) -> Any:
        if self.broken is not None:
            raise EnclaveUnavailable(f"enclave unavailable: the channel broke ({self.broken})")
        if len(self._pending) >= MAX_IN_FLIGHT:
            raise EnclaveUnavailable(f"enclave unavailable: {MAX_IN_FLIGHT} calls already in flight")
        if message.ByteSize() > MAX_MESSAGE_BYTES - 64:  # refused here, not by ending everyone's stream
            raise EnclaveRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the {kind} request is over the size cap")
        cid = self._next_id
        self._next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[cid] = (kind, future)
        self._outbox.put_nowait(pb.ChannelRequest(id=cid, **{kind: message}))
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            # Nothing at all read for a whole deadline: the stream is stalled, replace it.
            if asyncio.get_running_loop().time() - self.last_read >= timeout:
                self.fail(f"no answer for {timeout:g}s")
            raise EnclaveUnavailable(f"enclave unavailable: no answer within {timeout:g}s") from None
        finally:
            if self._pending.pop(cid, None) is not None:
                self._abandoned[cid] = None  # its answer, if it comes, is expected: dropped quietly
                if len(self._abandoned) > _ABANDONED_KEPT:
                    self._abandoned.popitem(last=False)

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._call.write(await self._batch())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the call ended (AioRpcError, InvalidStateError): the reader says why
            self.fail(f"write failed: {type(exc).__name__}")

    async def _batch(self) -> pb.ChannelRequests:
        """The next message: what waits in the outbox (everything queued while the previous write
        was under way), at most MAX_CHANNEL_BATCH calls and about a message's worth of bytes."""
        first = self._carry if self._carry is not None else await self._outbox.get()
        self._carry = None
        batch = pb.ChannelRequests(requests=[first])
        size = first.ByteSize()
        while len(batch.requests) < MAX_CHANNEL_BATCH and not self._outbox.empty():
            req = self._outbox.get_nowait()
            n = req.ByteSize()
            if size + n > MAX_MESSAGE_BYTES - 1024:
                self._carry = req
                break
            batch.requests.append(req)
            size += n
        return batch

    async def _read_loop(self) -> None:
        reason = "the enclave ended the stream"
        try:
            while True:
                resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    break
                self.last_read = asyncio.get_running_loop().time()
                self.answered += len(resp.responses)
                for answer in resp.responses:
                    self._deliver(answer)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            reason = "closed"
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self.fail(reason)

    def _deliver(self, resp: pb.ChannelResponse) -> None:
        entry = self._pending.pop(resp.id, None)
        if entry is None:
            if self._abandoned.pop(resp.id, "stray") == "stray":
                self.stray += 1
                log.warning("enclave channel: an answer for id %d, which is not in flight: dropped", resp.id)
            return
        kind, future = entry
        which = resp.WhichOneof("result")
        if future.done():
            return
        if which == "error":
            future.set_exception(enclave_error(_status(resp.error.status), resp.error.message))
        elif which != kind:
            future.set_exception(EnclaveUnavailable(f"enclave unavailable: call {resp.id} answered as {which}"))
        else:
            future.set_result(getattr(resp, kind))

    def fail(self, reason: str) -> None:
        """End the stream: every call in flight fails as unanswered (fail closed)."""
        if self.broken is None:
            self.broken = reason
            if reason != "closed":  # a stream that never answered (the enclave is down): quietly
                log.log(
                    logging.WARNING if self.answered else logging.DEBUG,
                    "enclave channel: %s; %d calls in flight fail",
                    reason,
                    len(self._pending),
                )
        self._call.cancel()
        pending, self._pending = self._pending, {}
        for _, future in pending.values():
            if not future.done():
                future.set_exception(
                    EnclaveUnavailable(f"enclave unavailable: the channel broke ({reason}) before the answer")
                )
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()


class EnclaveClient:
    def __init__(
        self,
        endpoint: str,
        run_dir: Path,
        *,
        timeout_s: float = 5.0,
        bridge: str | None = None,
        stream: bool | None = None,
    ) -> None:
        self.endpoint = Endpoint.parse(endpoint)
        run_dir.mkdir(parents=True, exist_ok=True)
        # CLOISTER_BRIDGE / CLOISTER_CHANNEL: how tests and scripts/bench_channel.py pick modes.
        self.bridge_mode = choose_mode(self.endpoint, bridge or os.environ.get("CLOISTER_BRIDGE", "auto"))
        self.use_stream = stream if stream is not None else os.environ.get("CLOISTER_CHANNEL", "stream") != "unary"
        self.bridge: Bridge | None = None
        if self.bridge_mode == "direct":
            self._address = grpc_address(self.endpoint)
        else:
            self._socket = run_dir / "parent-bridge.sock"
            self.bridge = Bridge(Endpoint(kind="unix", path=str(self._socket)), self.endpoint, mode=self.bridge_mode)
            self._address = f"unix:{self._socket}"
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._stream: _Stream | None = None

    async def start(self) -> None:
        if self.bridge is not None:
            self.bridge.start()
        else:
            log.info("bridge: direct (gRPC dials %s itself)", self.endpoint)
        self._channel = grpc.aio.insecure_channel(
            self._address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._stub = pb_grpc.EnclaveStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.fail("closed")
            self._stream = None
        if self._channel is not None:
            await self._channel.close()
        if self.bridge is not None:
            self.bridge.stop()

    async def _hot(self, kind: str, method: str, request: Any) -> Any:
        """A hot call: on the stream when there is one, else the unary RPC `method`."""
        if self._stub is None or not self.use_stream:
            return await self._call(method, request)
        stream = self._stream
        if stream is None or stream.broken is not None:
            # A new stream after a break (an enclave restart): gRPC redials underneath.
            stream = self._stream = _Stream(self._stub.Channel())
        return await stream.request(kind, request, self.timeout_s)

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
        resp: pb.AuthorizeResponse = await self._hot("authorize", "Authorize", request)
        return resp

    async def filter_tools(self, token: str, candidates: list[tuple[str, str]]) -> pb.FilterToolsResponse:
        req = pb.FilterToolsRequest(token=token, candidates=[pb.ToolRef(server=s, tool=t) for s, t in candidates])
        resp: pb.FilterToolsResponse = await self._hot("filter_tools", "FilterTools", req)
        return resp

    async def filter_items(self, token: str, candidates: list[pb.ToolRef]) -> pb.FilterToolsResponse:
        """Which tools, resources, templates or prompts (each ToolRef's `kind`) the agent may see."""
        req = pb.FilterToolsRequest(token=token, candidates=candidates)
        resp: pb.FilterToolsResponse = await self._hot("filter_tools", "FilterTools", req)
        return resp

    async def record_outcome(self, request: pb.OutcomeRequest) -> pb.OutcomeResponse:
        resp: pb.OutcomeResponse = await self._hot("outcome", "RecordOutcome", request)
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
