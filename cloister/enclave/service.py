"""The gRPC face of the enclave: translates messages to `EnclaveCore` calls and errors to codes.

Fail closed: every error becomes a gRPC status the parent must treat as "no decision".
NotReady and Unwitnessed (calls paused for the witnesses) -> UNAVAILABLE, storage lagging ->
RESOURCE_EXHAUSTED, bad input -> INVALID_ARGUMENT,
a refused policy or a sealed-key exchange out of order -> FAILED_PRECONDITION (ALREADY_EXISTS
when a bundle at or above its version is in force: `POLICY_NOT_NEWER_STATUS`), a failed check
(a resumed log signed by another log key: SealedKeyMismatch) -> PERMISSION_DENIED. Unexpected exceptions
are logged here, inside the enclave, and reported as INTERNAL without detail.

A decision's deny code leaves as the proto's `DenyCode` (`DENIALS`, one table). A code outside
`cloister.wire.contract.DenyCode` is a programming error: the answer is a plain denial, logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeVar

import grpc

from cloister.enclave.bundle import ActionKind
from cloister.enclave.core import (
    EnclaveCore,
    KeyRefused,
    LogAppend,
    NotReady,
    PolicyNotNewer,
    PolicyRefused,
    Verdict,
)
from cloister.enclave.freshness import GateStatus, Unwitnessed
from cloister.enclave.resume import ResumeRefused, ResumeStart
from cloister.enclave.sequencer import Backpressure
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.jwt import TokenError
from cloister.wire import enclave_pb2 as pb
from cloister.wire import enclave_pb2_grpc as pb_grpc
from cloister.wire.contract import MAX_CHANNEL_BATCH, MAX_MESSAGE_BYTES, POLICY_NOT_NEWER_STATUS, DenyCode

log = logging.getLogger("cloister.enclave.service")
_T = TypeVar("_T")

# Each open Channel stream holds one of the server's worker threads: at most this many, so the
# host cannot starve the unary RPCs (the server has `workers`, 16 by default).
MAX_CHANNEL_STREAMS: Final = 4
# The size past which the answers to a Channel batch go out in more than one message.
CHANNEL_ANSWER_BYTES: Final = 1 << 20

# Every DenyCode on the wire (tests/wire/test_contract.py checks that this covers both enums).
DENIALS: Final[Mapping[DenyCode, pb.DenyCode]] = {
    DenyCode.BAD_ARGUMENTS: pb.DENY_CODE_BAD_ARGUMENTS,
    DenyCode.UNAUTHENTICATED: pb.DENY_CODE_UNAUTHENTICATED,
    DenyCode.UNKNOWN_AGENT: pb.DENY_CODE_UNKNOWN_AGENT,
    DenyCode.UNKNOWN_SERVER: pb.DENY_CODE_UNKNOWN_SERVER,
    DenyCode.UNKNOWN_TOOL: pb.DENY_CODE_UNKNOWN_TOOL,
    DenyCode.QUARANTINED: pb.DENY_CODE_QUARANTINED,
    DenyCode.POLICY: pb.DENY_CODE_POLICY,
    DenyCode.NO_PERMIT: pb.DENY_CODE_NO_PERMIT,
    DenyCode.LIMIT: pb.DENY_CODE_LIMIT,
}


# The proto's ActionKind, both ways (decision 0018); an unknown value is refused, never read as a tool.
KINDS: Final[Mapping[int, ActionKind]] = {
    pb.ACTION_KIND_TOOL: ActionKind.TOOL,
    pb.ACTION_KIND_RESOURCE: ActionKind.RESOURCE,
    pb.ACTION_KIND_PROMPT: ActionKind.PROMPT,
    pb.ACTION_KIND_SAMPLING: ActionKind.SAMPLING,
    pb.ACTION_KIND_ELICITATION: ActionKind.ELICITATION,
    pb.ACTION_KIND_ROOTS: ActionKind.ROOTS,
}


def _kind(value: int) -> ActionKind:
    kind = KINDS.get(value)
    if kind is None:
        raise DecodeError(f"unknown action kind {value}")
    return kind


def _log_append(a: LogAppend) -> pb.LogAppend:
    return pb.LogAppend(first_index=a.first_index, entries=list(a.entries), checkpoint=a.checkpoint.note)


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status an exception from the core ends a call with (unary or on the channel)."""
    if isinstance(exc, (NotReady, Unwitnessed)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, Backpressure):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, PolicyNotNewer):
        return grpc.StatusCode[POLICY_NOT_NEWER_STATUS], str(exc)
    if isinstance(exc, (PolicyRefused, ResumeRefused, KeyRefused)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, TokenError):
        return grpc.StatusCode.UNAUTHENTICATED, f"{exc.reason}: {exc}"
    if isinstance(exc, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, VerificationError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error in the enclave (see the enclave's log)"


def _call(context: grpc.ServicerContext, fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    except Exception as exc:
        code, details = status_of(exc)
        context.abort(code, details)
    raise AssertionError("unreachable")  # context.abort raises


def _witness_state(g: GateStatus) -> pb.WitnessState:
    return pb.WitnessState(
        required=g.required,
        start_size=g.start_size,
        witnessed_size=g.witnessed_size,
        granting=g.granting,
        reason=g.reason,
    )


def _authorize_response(v: Verdict) -> pb.AuthorizeResponse:
    allowed, grant, denial = v.allowed, v.grant, pb.DENY_CODE_UNSPECIFIED
    if v.code:
        try:
            denial = DENIALS[DenyCode(v.code)]
        except ValueError:  # a code outside the contract: fail closed, as a plain denial
            log.error("decision %d has deny code %r, which is not a DenyCode: answering a denial", v.log_index, v.code)
            allowed, grant = False, b""
    return pb.AuthorizeResponse(
        decision=pb.ALLOW if allowed else pb.DENY,
        reason=v.reason,
        policy_ids=list(v.policy_ids),
        deny_code=v.code,
        denial=denial,
        grant=grant,
        log_index=v.log_index,
        log=_log_append(v.log),
        agent=v.agent,
        limits=[
            pb.LimitState(limit_id=s.limit_id, kind=s.kind, remaining=str(s.remaining), retry_after_s=s.retry_after_s)
            for s in v.limits
        ],
    )


class EnclaveService(pb_grpc.EnclaveServicer):
    def __init__(self, core: EnclaveCore, *, max_streams: int = MAX_CHANNEL_STREAMS) -> None:
        self.core = core
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._streams = 0  # open Channel streams, under _lock

    # The hot calls: one body each, shared by the unary RPC and the channel.
    def authorize(self, request: pb.AuthorizeRequest) -> pb.AuthorizeResponse:
        return _authorize_response(
            self.core.authorize(
                token=request.token,
                server=request.server,
                tool=request.tool,
                arguments_json=request.arguments_json,
                request_id=request.request_id,
                persisted_size=request.persisted_size,
                payment_amount=request.payment_amount,
                payment=request.payment,
                kind=_kind(request.kind),
            )
        )

    def filter_tools(self, request: pb.FilterToolsRequest) -> pb.FilterToolsResponse:
        if len(request.candidates) > 10_000:
            raise DecodeError("more than 10000 candidate tools")
        # Each distinct candidate is judged once (a relay repeating one is not a reason for more work).
        first: dict[tuple[ActionKind, str, str], pb.ToolRef] = {}
        for c in request.candidates:
            first.setdefault((_kind(c.kind), c.server, c.tool), c)
        unique = list(first)
        agent, shown = self.core.visible_items(request.token, unique)
        return pb.FilterToolsResponse(agent=agent, visible=[first[unique[i]] for i in shown])

    def record_outcome(self, request: pb.OutcomeRequest) -> pb.OutcomeResponse:
        a = self.core.record_outcome(
            decision_index=request.decision_index,
            result_sha256=request.result_sha256 or None,
            error=request.error,
            duration_us=request.duration_us,
            paid_amount=request.paid_amount,
            persisted_size=request.persisted_size,
            response_sig=request.response_sig,
        )
        return pb.OutcomeResponse(log_index=a.first_index, log=_log_append(a))

    def Authorize(self, request: pb.AuthorizeRequest, context: grpc.ServicerContext) -> pb.AuthorizeResponse:
        return _call(context, lambda: self.authorize(request))

    def FilterTools(self, request: pb.FilterToolsRequest, context: grpc.ServicerContext) -> pb.FilterToolsResponse:
        return _call(context, lambda: self.filter_tools(request))

    def RecordOutcome(self, request: pb.OutcomeRequest, context: grpc.ServicerContext) -> pb.OutcomeResponse:
        return _call(context, lambda: self.record_outcome(request))

    def Channel(
        self, requests: Iterator[pb.ChannelRequests], context: grpc.ServicerContext
    ) -> Iterator[pb.ChannelResponses]:
        """The hot calls on one stream (decision 0022), each answered in this stream's own thread,
        in the order received: no hand-off to another thread per call, and at most one batch of a
        stream in the enclave's hands at a time (gRPC's flow control bounds what waits)."""
        with self._lock:
            admitted = self._streams < self.max_streams
            self._streams += admitted
        if not admitted:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"already {self.max_streams} channel streams open")
        try:
            last = 0
            for batch in requests:
                problem = _batch_problem(batch, last)
                if problem:  # before any call of the batch is decided
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                if batch.requests:
                    last = batch.requests[-1].id
                yield from self._answers(batch)
        finally:
            with self._lock:
                self._streams -= 1

    def _answers(self, batch: pb.ChannelRequests) -> Iterator[pb.ChannelResponses]:
        """The batch's answers, in order, in messages of about CHANNEL_ANSWER_BYTES at most (a
        batch of answers each carrying many log entries must not exceed the message cap)."""
        out = pb.ChannelResponses()
        size = 0
        for req in batch.requests:
            answer = self._answer(req)
            n = answer.ByteSize()
            if out.responses and size + n > CHANNEL_ANSWER_BYTES:
                yield out
                out, size = pb.ChannelResponses(), 0
            out.responses.append(answer)
            size += n
        if out.responses:
            yield out

    def _answer(self, req: pb.ChannelRequest) -> pb.ChannelResponse:
        which = req.WhichOneof("call")
        try:
            if which == "authorize":
                return pb.ChannelResponse(id=req.id, authorize=self.authorize(req.authorize))
            if which == "outcome":
                return pb.ChannelResponse(id=req.id, outcome=self.record_outcome(req.outcome))
            if which == "filter_tools":
                return pb.ChannelResponse(id=req.id, filter_tools=self.filter_tools(req.filter_tools))
            raise DecodeError(f"channel request {req.id} carries no known call")
        except Exception as exc:
            code, details = status_of(exc)
            return pb.ChannelResponse(id=req.id, error=pb.ChannelError(status=code.value[0], message=details))

    def GetCheckpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointResponse:
        return _call(context, lambda: pb.CheckpointResponse(checkpoint=self.core.sync(0).checkpoint.note))

    def Attest(self, request: pb.AttestRequest, context: grpc.ServicerContext) -> pb.AttestResponse:
        def run() -> pb.AttestResponse:
            doc, cp = self.core.attest(request.nonce, include_checkpoint=request.include_checkpoint)
            return pb.AttestResponse(document=doc, checkpoint=cp)

        return _call(context, run)

    def LoadPolicy(self, request: pb.LoadPolicyRequest, context: grpc.ServicerContext) -> pb.LoadPolicyResponse:
        def run() -> pb.LoadPolicyResponse:
            self.core.sync(request.persisted_size)
            version, digest, a = self.core.load_policy(request.bundle)
            return pb.LoadPolicyResponse(version=version, bundle_sha256=digest, log=_log_append(a))

        return _call(context, run)

    def SyncLog(self, request: pb.SyncLogRequest, context: grpc.ServicerContext) -> pb.SyncLogResponse:
        return _call(context, lambda: pb.SyncLogResponse(log=_log_append(self.core.sync(request.persisted_size))))

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        def run() -> pb.HealthResponse:
            health = self.core.health()
            del health["witness"]
            witness = self.core.witness_status()
            return pb.HealthResponse(**health, witness=_witness_state(witness) if witness is not None else None)

        return _call(context, run)

    def AddCosignatures(self, request: pb.AddCosignaturesRequest, context: grpc.ServicerContext) -> pb.WitnessState:
        return _call(context, lambda: _witness_state(self.core.add_cosignatures(request.cosigned_checkpoint)))

    def ServerChallenge(
        self, request: pb.ServerChallengeRequest, context: grpc.ServicerContext
    ) -> pb.ServerChallengeResponse:
        def run() -> pb.ServerChallengeResponse:
            nonce, kind = self.core.server_challenge(request.server, reconnect=request.reconnect)
            return pb.ServerChallengeResponse(nonce=nonce, kind=kind)

        return _call(context, run)

    def ReportServer(self, request: pb.ServerReport, context: grpc.ServicerContext) -> pb.ServerReportResponse:
        def run() -> pb.ServerReportResponse:
            if len(request.certificates) > 16:
                raise DecodeError("more than 16 certificates")
            report, a = self.core.report_server(
                server=request.server,
                attestation=request.attestation,
                artifact=request.artifact,
                certificates=list(request.certificates),
                tools_json=request.tools_json,
                failure=request.failure,
                evidence=request.evidence,
                persisted_size=request.persisted_size,
            )
            return pb.ServerReportResponse(
                status=report.status, detail=report.detail, hidden_tools=list(report.hidden), log=_log_append(a)
            )

        return _call(context, run)

    def StartLog(self, request: pb.StartLogRequest, context: grpc.ServicerContext) -> pb.StartLogResponse:
        def run() -> pb.StartLogResponse:
            if request.HasField("resume"):
                r = request.resume
                a = self.core.resume_log(
                    checkpoint=r.checkpoint,
                    range_size=r.range_size,
                    range_hashes=list(r.range_hashes),
                    entries=list(r.entries),
                    key_entry=r.key_entry,
                    key_entry_index=r.key_entry_index,
                    key_entry_proof=list(r.key_entry_proof),
                    boundary_entry=r.boundary_entry,
                    boundary_proof=list(r.boundary_proof),
                )
            else:
                a = self.core.start_new_log()
            return pb.StartLogResponse(log=_log_append(a))

        return _call(context, run)

    def ResumeLog(self, requests: Iterator[pb.ResumeChunk], context: grpc.ServicerContext) -> pb.StartLogResponse:
        def run() -> pb.StartLogResponse:
            first = next(requests, None)
            if first is None or not first.HasField("start"):
                raise DecodeError("a resume must start with a chunk that carries `start`")
            r = first.start
            if r.entries or first.entries:
                raise DecodeError("the first chunk of a resume carries no entries")
            start = ResumeStart(
                checkpoint=r.checkpoint,
                range_size=r.range_size,
                range_hashes=list(r.range_hashes),
                key_entry=r.key_entry,
                key_entry_index=r.key_entry_index,
                key_entry_proof=list(r.key_entry_proof),
                boundary_entry=r.boundary_entry,
                boundary_proof=list(r.boundary_proof),
            )
            a = self.core.resume_log_chunks(start, _resume_chunks(requests))
            return pb.StartLogResponse(log=_log_append(a))

        return _call(context, run)

    def RequestKey(self, request: pb.RequestKeyRequest, context: grpc.ServicerContext) -> pb.RequestKeyResponse:
        return _call(context, lambda: pb.RequestKeyResponse(attestation_document=self.core.request_key()))

    def OpenSealedKey(
        self, request: pb.OpenSealedKeyRequest, context: grpc.ServicerContext
    ) -> pb.OpenSealedKeyResponse:
        def run() -> pb.OpenSealedKeyResponse:
            public = self.core.open_sealed_key(request.ciphertext_for_recipient, first_start=request.first_start)
            return pb.OpenSealedKeyResponse(log_public_key=public, log_verifier_key=self.core.note_signer.vkey)

        return _call(context, run)


def _batch_problem(batch: pb.ChannelRequests, last: int) -> str:
    """Why a batch breaks the channel's rules ("" if it does not): too many calls, or ids that do
    not rise strictly from the stream's last one. A reused or replayed id so ends the stream before
    anything is decided for it: no request is decided twice under one id nor answered as another."""
    if len(batch.requests) > MAX_CHANNEL_BATCH:
        return f"a channel batch of {len(batch.requests)} calls (at most {MAX_CHANNEL_BATCH})"
    for req in batch.requests:
        if req.id <= last:
            return f"channel id {req.id} is not above {last}"
        last = req.id
    return ""


def _resume_chunks(requests: Iterator[pb.ResumeChunk]) -> Iterator[tuple[int, list[bytes]]]:
    """The entries of a resume's later chunks, one chunk at a time (never all held)."""
    for chunk in requests:
        if chunk.HasField("start"):
            raise DecodeError("only the first chunk of a resume carries `start`")
        yield chunk.first_index, list(chunk.entries)


def serve(core: EnclaveCore, address: str, *, workers: int = 16) -> tuple[grpc.Server, int]:
    """Serve on a gRPC address: `unix:PATH` (behind the bridge, or the public socket itself when
    bridging would be the identity) or `HOST:PORT` (mock mode over TCP)."""
    from concurrent.futures import ThreadPoolExecutor

    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="enclave-rpc"), options=options)
    service = EnclaveService(core, max_streams=max(1, min(MAX_CHANNEL_STREAMS, workers // 4)))
    pb_grpc.add_EnclaveServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's "failed to bind"
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if not port:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port
