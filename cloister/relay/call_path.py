"""The call path of `tools/call`: ask the enclave, persist its decision, forward an allowed call
upstream with the grant, then record the outcome and persist it before the agent gets an answer.

Fail closed at every step: no decision (the enclave unavailable or refusing) forwards nothing, a
denial forwards nothing, and a decision or outcome that could not be persisted is not acknowledged.

Every allowed decision gets exactly one outcome, whatever happens after the allow: the upstream's
answer or error, "upstream timed out after Ns", "upstream connection lost: ...", "cancelled by the
client" (MCP notifications/cancelled, or the request's task cancelled), "relay shutting down", or
"relay error while forwarding: ...". Recording runs shielded from the request's cancellation, within
OUTCOME_RECORD_TIMEOUT_S; if the enclave cannot be reached then, the relay log says so, and the
auditor's replay reports the decision as missing its outcome once its grant's window is over.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import anyio
import mcp_types as types
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel

from cloister.relay.codes import (
    ENCLAVE_UNAVAILABLE,
    FROM_CLOISTER,
    FROM_UPSTREAM,
    INVALID_PARAMS,
    LOG_UNAVAILABLE,
    PAYMENT_REQUIRED,
    SOURCE,
    UPSTREAM_FAILED,
    denial_error,
    upstream_error_code,
)
from cloister.relay.enclave_client import EnclaveRefused, EnclaveUnavailable
from cloister.relay.observe import CallObserver
from cloister.relay.state import RelayState
from cloister.relay.upstreams import Upstream, UpstreamError, Upstreams, wire_value
from cloister.verify.errors import DecodeError
from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY, GrantError, read_grant
from cloister.verify.key_evidence import DECISION_EVIDENCE_META_KEY, KEY_EVIDENCE_META_KEY
from cloister.verify.response_sig import MAX_SIG_TEXT, result_sha256, signature_from_meta, without_signature
from cloister.verify.x402 import MAX_PAYMENT_BYTES
from cloister.wire import enclave_pb2 as pb
from cloister.wire.contract import LOG_META_KEY, RESPONSE_SIG_META_KEY, TOOL_SEPARATOR, X402_META_KEY

log = logging.getLogger("cloister.relay")
OUTCOME_RECORD_TIMEOUT_S = 10.0  # how long recording an outcome may hold a cancelled call (or shutdown)
UPSTREAM_DEADLINE_MARGIN_S = 1.0  # the call path's own deadline, beyond the upstream's timeout
CANCELLED_BY_CLIENT = "cancelled by the client"
RELAY_SHUTTING_DOWN = "relay shutting down"
CLOISTER_META_PREFIX = LOG_META_KEY.split("/", 1)[0] + "/"  # "dev.cloister/"
_M = TypeVar("_M", bound=BaseModel)


def split_tool_name(name: str) -> tuple[str, str]:
    server, sep, tool = name.partition(TOOL_SEPARATOR)
    return (server, tool) if sep else ("", name)


def x402_payload(payment: Any) -> bytes:
    """The agent's x402 payment payload (`_meta["x402/payment"]`) as JSON for the enclave.

    The relay reads no amount from it: the enclave parses the payload per the scheme the bundle
    lets the server accept, charges what it parses, and binds the payload's hash into the grant
    (so the upstream refuses any other payment). Only its shape and size are checked here.
    """
    if not isinstance(payment, dict):
        raise ValueError("expected a JSON object")
    data = _compact_json(payment)
    if len(data) > MAX_PAYMENT_BYTES:
        raise ValueError(f"{len(data)} bytes; at most {MAX_PAYMENT_BYTES} are accepted")
    return data


def _granted_payment(grant: bytes, payment: Any) -> str:
    """The amount the enclave charged for the call's payment, as its grant states it ("" for none).
    The grant states a charge only for a call that carried a payment: without one it is not read."""
    if payment is None:
        return ""
    try:
        return read_grant(grant).payment_amount
    except GrantError:
        return ""


def _compact_json(value: Any) -> bytes:
    # "surrogatepass": a lone surrogate an agent sent as "\\ud800" reaches the enclave as the bytes
    # it is (not UTF-8), which the enclave refuses as bad arguments, instead of failing here.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def _denied(verdict: pb.AuthorizeResponse) -> MCPError:
    """The agent's error for a denial: its JSON-RPC code comes from the typed class (`denial`)."""
    return MCPError(
        denial_error(verdict.denial),
        f"denied: {verdict.reason}",
        data={
            SOURCE: FROM_CLOISTER,  # an upstream's errors say "upstream": never the same as a denial
            "decision": "deny",
            "code": verdict.deny_code,
            "reason": verdict.reason,
            "policies": list(verdict.policy_ids),
            "log_index": verdict.log_index,
            "agent": verdict.agent,
            "limits": [
                {"limit": s.limit_id, "kind": s.kind, "remaining": s.remaining, "retry_after_s": s.retry_after_s}
                for s in verdict.limits
            ],
        },
    )


# Denials of a tools/call that the model can act on (decision 0018): the call was understood and
# refused, like a tool execution error. Identity failures, unknown servers and tools, and no
# decision at all stay JSON-RPC errors: they are for the client, not the model.
MODEL_DENIALS = frozenset(
    {
        pb.DENY_CODE_POLICY,
        pb.DENY_CODE_NO_PERMIT,
        pb.DENY_CODE_LIMIT,
        pb.DENY_CODE_QUARANTINED,
        pb.DENY_CODE_BAD_ARGUMENTS,
    }
)
DENIAL_META_KEY = "dev.cloister/denial"  # a denial result's machine-readable data (the error's `data`)
DENIALS_META_KEY = "dev.cloister/denials"  # a request's `_meta`: "error" asks for denials as JSON-RPC errors


def _wants_errors(meta: Any) -> bool:
    return isinstance(meta, dict) and meta.get(DENIALS_META_KEY) == "error"


def denial_result(verdict: pb.AuthorizeResponse) -> dict[str, Any]:
    """A tools/call denial as a tool execution error (isError): the model reads why; a program
    reads `_meta["dev.cloister/denial"]`, the same data (and JSON-RPC code) the error would carry.
    The result object as JSON (the shape `types.CallToolResult` dumps to)."""
    error = _denied(verdict)
    text = (
        f"{error.message} (Cloister, the gateway that governs this tool, refused the call; nothing was "
        f"sent to the tool. Decision logged at index {verdict.log_index}.)"
    )
    return {
        "_meta": {
            DENIAL_META_KEY: {**(error.data if isinstance(error.data, dict) else {}), "error_code": error.code},
            LOG_META_KEY: {"decision": verdict.log_index},
        },
        "content": [{"type": "text", "text": text}],
        "isError": True,
    }


class CallPath:
    def __init__(self, state: RelayState, upstreams: Upstreams) -> None:
        self.state = state
        self.upstreams = upstreams
        # True once the relay is stopping (the server's exit flag): a call cancelled then says so.
        self.shutting_down: Callable[[], bool] = lambda: False
        self._closing = False
        self._forwarding: set[anyio.CancelScope] = set()  # calls waiting on their upstream
        self._in_flight = 0  # allowed calls whose outcome is not recorded yet
        self._idle: anyio.Event | None = None  # set when _in_flight drops to 0 (shutdown waits on it)
        # How a tools/call denial the model can act on reaches the agent (decision 0018): "result"
        # (a tool result with isError, for the model) or "error" (a JSON-RPC error, as before).
        self.denials: str = "result"
        self.observer = CallObserver()  # metrics, traces, call log (set by the relay; decision 0020)
        # Run first at shutdown, while the enclave and storage are still open: open tasks record
        # their calls' outcomes ("relay shutting down"; decision 0029).
        self.before_shutdown: list[Callable[[], Awaitable[None]]] = []

    async def shutdown(self, timeout_s: float = OUTCOME_RECORD_TIMEOUT_S) -> None:
        """Stop the calls still waiting on an upstream and let each record its outcome ("relay
        shutting down") before storage and the enclave channel close; waits at most `timeout_s`."""
        self._closing = True
        for hook in self.before_shutdown:
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_s):
                await hook()
        for scope in list(self._forwarding):
            scope.cancel()
        if self._in_flight:
            self._idle = anyio.Event()
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_s):
                await self._idle.wait()
        if self._in_flight:
            log.error("%d call(s) still had no outcome recorded when the relay stopped", self._in_flight)

    def _cancel_reason(self) -> str:
        return RELAY_SHUTTING_DOWN if self._closing or self.shutting_down() else CANCELLED_BY_CLIENT

    async def call(
        self, token: str, params: types.CallToolRequestParams, progress: ProgressFnT | None = None
    ) -> types.CallToolResult:
        """`call_json` with the SDK's types on both sides (for in-process callers)."""
        result = await self.call_json(token, params.name, params.arguments, params.meta, progress)
        return types.CallToolResult.model_validate(result, by_name=False)

    async def call_json(
        self,
        token: str,
        name: str,
        arguments: dict[str, Any] | None,
        meta: Any,
        progress: ProgressFnT | None = None,
    ) -> dict[str, Any]:
        """One governed `tools/call` for the agent whose bearer token is `token`, on plain JSON:
        `name`, `arguments` and `meta` (the request's `_meta`) as the agent sent them, the result
        object as the agent gets it (the SDK's handler and the fast path both call this; decision
        0023). `progress` receives the upstream's progress notifications for it."""
        server, tool, arguments, args_json, payment, payment_json = self._call_request(name, arguments, meta)
        marks = [time.perf_counter()]
        # Steps 1 and 2 are shielded from the caller's cancellation, as in `_decide_shielded`.
        with anyio.CancelScope(shield=True):
            # 1. Ask the enclave. Any failure here means no allow: nothing is forwarded.
            verdict = await self._authorize(token, server, tool, args_json, payment_json)
            marks.append(time.perf_counter())
            # 2. The decision entry is durable before anything depends on it.
            await self._persist_or_fail(verdict.log)
            marks.append(time.perf_counter())
        if verdict.decision != pb.ALLOW:
            await self._keep_denied_arguments(verdict, args_json)
            self.observer.denied(server, tool, verdict, marks, args_json)
            if self.denials == "result" and verdict.denial in MODEL_DENIALS and not _wants_errors(meta):
                return denial_result(verdict)
            raise _denied(verdict)
        # Bodies join the next group commit; the outcome's persist waits for them to be durable.
        self.state.store_body(verdict.log_index, "args", args_json)
        # 3. Forward, with the grant, to the upstream; 4. the outcome is recorded and durable
        # before the agent gets its answer (exactly one, whatever happens meanwhile).
        self._in_flight += 1
        try:
            result, failure, outcome = await self._forward_and_record(
                server, tool, arguments, verdict, payment, marks, progress
            )
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()
        self.observer.completed(server, tool, verdict, marks, args_json, outcome, _Flagged(result), failure)
        if log.isEnabledFor(logging.DEBUG):
            phases = ("authorize", "persist", "upstream", "outcome", "persist")
            log.debug(
                "call %s/%s: %s",
                server,
                tool,
                " ".join(
                    f"{name} {1000 * (b - a):.2f}ms" for name, a, b in zip(phases, marks, marks[1:], strict=False)
                ),
            )
        log_meta = {
            "decision": verdict.log_index,
            "outcome": outcome.log_index,
            "checkpoint_size": outcome.log.first_index + len(outcome.log.entries),
        }
        return _answer(result, failure, log_meta, server)

    async def call_task(
        self, token: str, name: str, arguments: dict[str, Any] | None, meta: Any, task: dict[str, Any]
    ) -> TaskStarted | dict[str, Any]:
        """A task-augmented `tools/call` (decision 0029): decided, logged and forwarded exactly as
        `call_json` does (same action, same grant), with the agent's `task` parameter. When the
        upstream answers with a task (a CreateTaskResult), the decision's one outcome is deferred:
        `close_task` records it when the task's payload is fetched, the task fails or is
        cancelled, or its outcome window ends. Any other answer (a denial, a plain result, a
        failure) is final and returned (or raised) as `call_json` would."""
        server, tool, arguments, args_json, payment, payment_json = self._call_request(name, arguments, meta)
        verdict = await self._decide_shielded(token, server, tool, args_json, pb.ACTION_KIND_TOOL, payment_json)
        if verdict.decision != pb.ALLOW:
            await self._keep_denied_arguments(verdict, args_json)
            if self.denials == "result" and verdict.denial in MODEL_DENIALS and not _wants_errors(meta):
                return denial_result(verdict)
            raise _denied(verdict)
        self.state.store_body(verdict.log_index, "args", args_json)
        started = time.monotonic()
        self._in_flight += 1
        try:
            result, failure, error = await self._forward_or_record_interruption(
                server, tool, arguments, verdict, payment, started, None, task
            )
            if result is not None and is_create_task_result(result):
                return TaskStarted(verdict, result, started, _granted_payment(verdict.grant, payment))
            # A plain answer (the upstream ran the call without a task) or a failure: final now.
            log_meta = await self.close_task(
                verdict.log_index, started, result, error, _granted_payment(verdict.grant, payment) if result else ""
            )
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()
        return _answer(result, failure, log_meta, server)

    async def close_task(
        self, decision_index: int, started: float, result: dict[str, Any] | None, error: str, paid: str = ""
    ) -> dict[str, int]:
        """The one outcome of a task-augmented call (decision 0029): the payload's hash (stored as
        the result body), or the error; durable before it returns the log indexes. Shielded from
        the caller's cancellation, within OUTCOME_RECORD_TIMEOUT_S."""
        duration_us = int((time.monotonic() - started) * 1_000_000)
        with anyio.CancelScope(shield=True), anyio.move_on_after(OUTCOME_RECORD_TIMEOUT_S) as deadline:
            outcome = await self._record_outcome(decision_index, result, error, duration_us, paid)
            await self._persist_or_fail(outcome.log)
        if deadline.cancelled_caught:
            raise MCPError(
                LOG_UNAVAILABLE,
                f"the task's outcome could not be logged in {OUTCOME_RECORD_TIMEOUT_S:g}s, so it is not acknowledged",
                data={SOURCE: FROM_CLOISTER, "log_index": decision_index},
            )
        return {
            "decision": decision_index,
            "outcome": outcome.log_index,
            "checkpoint_size": outcome.log.first_index + len(outcome.log.entries),
        }

    async def governed(
        self,
        token: str,
        kind: int,
        server: str,
        name: str,
        request: dict[str, Any],
        send: Callable[[bytes], Awaitable[_M]],
        cancelled: str = CANCELLED_BY_CLIENT,
    ) -> tuple[_M, dict[str, int]]:
        """One governed MCP request other than tools/call (decision 0018): a resource read or a
        prompt the agent asks of `server`, or `server`'s sampling or elicitation request to the
        agent. The same steps as `call`: the enclave decides `kind` on `request` (the parameters,
        hashed into the decision entry), the decision is durable, `send(grant)` runs only when
        allowed (raising UpstreamError when it fails), and its outcome, with the answer's hash
        and the answer stored as the result body, is durable before the answer is returned with
        the log indexes. `cancelled`: the outcome when the request is cancelled (by whoever sent it)."""
        args_json = _compact_json(request)
        if len(args_json) > self.state.config.max_argument_bytes:
            raise MCPError(
                INVALID_PARAMS,
                f"the request is {len(args_json)} bytes; this relay accepts at most "
                f"{self.state.config.max_argument_bytes} (nothing was forwarded)",
                data={SOURCE: FROM_CLOISTER},
            )
        verdict = await self._decide_shielded(token, server, name, args_json, kind)
        if verdict.decision != pb.ALLOW:
            await self._keep_denied_arguments(verdict, args_json)
            raise _denied(verdict)
        self.state.store_body(verdict.log_index, "args", args_json)
        self._in_flight += 1
        try:
            result, failure, outcome = await self._send_and_record(verdict, send, cancelled)
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()
        log_meta = {
            "decision": verdict.log_index,
            "outcome": outcome.log_index,
            "checkpoint_size": outcome.log.first_index + len(outcome.log.entries),
        }
        if failure is not None:
            _raise_failure(failure, log_meta, server)
        assert result is not None
        return result, log_meta

    async def _send_and_record(
        self, verdict: pb.AuthorizeResponse, send: Callable[[bytes], Awaitable[_M]], cancelled: str
    ) -> tuple[_M | None, UpstreamError | None, pb.OutcomeResponse]:
        started = time.monotonic()
        result: _M | None = None
        failure: UpstreamError | None = None
        with anyio.CancelScope() as stop:
            self._forwarding.add(stop)
            try:
                result = await send(verdict.grant)
            except UpstreamError as exc:
                failure = exc
            except anyio.get_cancelled_exc_class():
                if not stop.cancel_called:
                    reason = RELAY_SHUTTING_DOWN if self._cancel_reason() == RELAY_SHUTTING_DOWN else cancelled
                    await self._record_interrupted(verdict.log_index, started, reason)
                    raise
            except Exception as exc:
                log.exception("forwarding the request of decision %d failed", verdict.log_index)
                await self._record_interrupted(
                    verdict.log_index, started, f"relay error while forwarding: {exc!r}"[:500]
                )
                raise
            finally:
                self._forwarding.discard(stop)
        if stop.cancel_called:  # the relay is stopping (shutdown)
            failure = UpstreamError("unavailable", RELAY_SHUTTING_DOWN)
        duration_us = int((time.monotonic() - started) * 1_000_000)
        with anyio.CancelScope(shield=True), anyio.move_on_after(OUTCOME_RECORD_TIMEOUT_S) as deadline:
            outcome = await self._record_outcome(
                verdict.log_index,
                None if result is None else wire_value(result),
                str(failure) if failure else "",
                duration_us,
                "",
            )
            await self._persist_or_fail(outcome.log)
        if deadline.cancelled_caught:
            raise MCPError(
                LOG_UNAVAILABLE,
                f"the request ran but its outcome could not be logged in {OUTCOME_RECORD_TIMEOUT_S:g}s, "
                "so it is not acknowledged",
                data={SOURCE: FROM_CLOISTER, "log_index": verdict.log_index},
            )
        return result, failure, outcome

    async def _keep_denied_arguments(self, verdict: pb.AuthorizeResponse, args_json: bytes) -> None:
        """With `keep_denied_arguments`, store a denied call's arguments beside its decision entry
        (sealed like any body). Off by default: a denied call's arguments are never stored."""
        if not self.state.config.keep_denied_arguments or not verdict.log.entries:
            return
        try:
            await self.state.store_body(verdict.log_index, "args", args_json)
        except Exception as exc:  # the denial stands and is logged; only its arguments are lost
            log.warning("could not keep the arguments of denied entry %d: %s", verdict.log_index, exc)

    def _call_request(
        self, name: str, arguments: dict[str, Any] | None, meta: Any
    ) -> tuple[str, str, dict[str, Any], bytes, Any, bytes]:
        """A tools/call's parts, checked before the enclave is asked: (server, tool, arguments,
        their compact JSON, the x402 payment in `_meta` and its payload); MCPError when too large
        or malformed (nothing forwarded)."""
        server, tool = split_tool_name(name)
        arguments = dict(arguments or {})
        args_json = _compact_json(arguments)
        if len(args_json) > self.state.config.max_argument_bytes:
            raise MCPError(
                INVALID_PARAMS,
                f"arguments are {len(args_json)} bytes; this relay accepts at most "
                f"{self.state.config.max_argument_bytes} (nothing was forwarded)",
                data={SOURCE: FROM_CLOISTER},
            )
        payment = (meta or {}).get(X402_META_KEY)
        try:
            payment_json = x402_payload(payment) if payment is not None else b""
        except ValueError as exc:
            raise MCPError(
                INVALID_PARAMS, f"the x402 payment in _meta is malformed: {exc} (nothing was forwarded)"
            ) from exc
        return server, tool, arguments, args_json, payment, payment_json

    async def _decide_shielded(
        self, token: str, server: str, name: str, args_json: bytes, kind: int, payment_json: bytes = b""
    ) -> pb.AuthorizeResponse:
        """The enclave decides and the decision entry is made durable, shielded from the caller's
        cancellation. Once the enclave has sequenced an allow, the request must reach the forwarding
        step, whose cancellation handling records the one outcome; a cancel landing between the two
        (the agent gone mid-decision) left an allowed decision without an outcome, which
        `cloister audit replay` reports as missing. The enclave call is bounded by its timeout; the
        persist waits on storage as every request does. The cancel then takes effect at the
        forward, and is recorded there as the outcome."""
        with anyio.CancelScope(shield=True):
            verdict = await self._authorize(token, server, name, args_json, payment_json, kind)
            await self._persist_or_fail(verdict.log)
        return verdict

    async def _authorize(
        self, token: str, server: str, tool: str, args_json: bytes, payment: bytes, kind: int = pb.ACTION_KIND_TOOL
    ) -> pb.AuthorizeResponse:
        try:
            return await self.state.enclave.authorize(
                pb.AuthorizeRequest(
                    token=token,
                    server=server,
                    tool=tool,
                    arguments_json=args_json,
                    request_id=uuid.uuid4().hex,
                    persisted_size=self.state.writer.persisted_size,
                    payment=payment,
                    kind=cast(pb.ActionKind, kind),
                )
            )
        except EnclaveUnavailable as exc:
            self.observer.unavailable(server, tool)
            raise MCPError(
                ENCLAVE_UNAVAILABLE,
                f"call refused, the enclave is unavailable (fail closed): {exc}",
                data={SOURCE: FROM_CLOISTER},
            ) from exc
        except EnclaveRefused as exc:
            self.observer.unavailable(server, tool)
            raise MCPError(
                ENCLAVE_UNAVAILABLE, f"call refused, the enclave could not decide: {exc}", data={SOURCE: FROM_CLOISTER}
            ) from exc

    async def _forward_and_record(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        verdict: pb.AuthorizeResponse,
        payment: Any,
        marks: list[float],
        progress: ProgressFnT | None = None,
    ) -> tuple[dict[str, Any] | None, UpstreamError | None, pb.OutcomeResponse]:
        started = time.monotonic()
        result, failure, error = await self._forward_or_record_interruption(
            server, tool, arguments, verdict, payment, started, progress
        )
        duration_us = int((time.monotonic() - started) * 1_000_000)
        marks.append(time.perf_counter())
        paid = _granted_payment(verdict.grant, payment) if result is not None else ""
        # Shielded: a cancellation now (the agent gone, the relay stopping) waits for the outcome.
        with anyio.CancelScope(shield=True), anyio.move_on_after(OUTCOME_RECORD_TIMEOUT_S) as deadline:
            outcome = await self._record_outcome(verdict.log_index, result, error, duration_us, paid)
            marks.append(time.perf_counter())
            await self._persist_or_fail(outcome.log)
            marks.append(time.perf_counter())
        if deadline.cancelled_caught:
            log.error(
                "the outcome of decision %d was not recorded within %gs", verdict.log_index, OUTCOME_RECORD_TIMEOUT_S
            )
            raise MCPError(
                LOG_UNAVAILABLE,
                f"the call ran but its outcome could not be logged in {OUTCOME_RECORD_TIMEOUT_S:g}s, "
                "so it is not acknowledged",
                data={SOURCE: FROM_CLOISTER, "log_index": verdict.log_index},
            )
        return result, failure, outcome

    async def _forward_or_record_interruption(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        verdict: pb.AuthorizeResponse,
        payment: Any,
        started: float,
        progress: ProgressFnT | None = None,
        task: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any] | None, UpstreamError | None, str]:
        """`_forward`; when it is cancelled or fails in the relay itself, the decision's one
        outcome is recorded here (the cancel's reason, or the relay error) and it re-raises."""
        try:
            return await self._forward(server, tool, arguments, verdict.grant, payment, progress, task)
        except anyio.get_cancelled_exc_class():
            await self._record_interrupted(verdict.log_index, started, self._cancel_reason())
            raise
        except Exception as exc:
            log.exception("forwarding the call of decision %d failed", verdict.log_index)
            await self._record_interrupted(verdict.log_index, started, f"relay error while forwarding: {exc!r}"[:500])
            raise

    async def _record_interrupted(self, decision_index: int, started: float, error: str) -> None:
        """The one outcome of a call that ended without an answer (cancelled, relay stopping, a
        relay error): recorded and persisted shielded from the cancellation, within a bound."""
        duration_us = int((time.monotonic() - started) * 1_000_000)
        with anyio.CancelScope(shield=True), anyio.move_on_after(OUTCOME_RECORD_TIMEOUT_S) as deadline:
            try:
                outcome = await self.state.enclave.record_outcome(
                    pb.OutcomeRequest(
                        decision_index=decision_index,
                        result_sha256=b"",
                        error=error,
                        duration_us=duration_us,
                        persisted_size=self.state.writer.persisted_size,
                        paid_amount="",
                    )
                )
                await self.state.persist(outcome.log)
                log.info("call of decision %d ended without an answer: %s", decision_index, error)
                return
            except Exception as exc:
                log.error(
                    "the outcome of decision %d (%s) could not be recorded: %s; an auditor will see "
                    "the decision without an outcome",
                    decision_index,
                    error,
                    exc,
                )
                return
        if deadline.cancelled_caught:
            log.error(
                "the outcome of decision %d (%s) could not be recorded within %gs; an auditor will see "
                "the decision without an outcome",
                decision_index,
                error,
                OUTCOME_RECORD_TIMEOUT_S,
            )

    async def _forward(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        grant: bytes,
        payment: Any,
        progress: ProgressFnT | None = None,
        task: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any] | None, UpstreamError | None, str]:
        """The upstream's result, or its failure and the outcome's error text for it. `task`: the
        agent's task parameter (decision 0029), forwarded with the call."""
        upstream = self.upstreams.by_name.get(server)
        if upstream is None:
            failure = UpstreamError("unavailable", f"no upstream named {server!r} is configured on this relay")
            return None, failure, str(failure)
        meta = self.grant_meta(grant)
        if upstream.config.wait_for_witness:
            # Forward only once the decision is witnessed: no rollback can then erase a call that ran.
            index = read_grant(grant).log_index
            evidence = await self.state.decision_evidence(index, upstream.config.witness_wait_s)
            if evidence is None:
                failure = UpstreamError(
                    "unwitnessed",
                    f"the witnesses did not cosign decision {index} within {upstream.config.witness_wait_s:g}s; "
                    f"{server!r} takes calls only once they have (wait_for_witness), so it was not forwarded",
                )
                return None, failure, str(failure)
            meta[DECISION_EVIDENCE_META_KEY] = evidence
        if payment is not None:
            meta[X402_META_KEY] = payment
        timeout_s = upstream.config.timeout_s
        connected = upstream.state == "up"
        with anyio.CancelScope() as stop:
            self._forwarding.add(stop)
            try:
                with anyio.move_on_after(timeout_s + UPSTREAM_DEADLINE_MARGIN_S):
                    return await forward_call(upstream, tool, arguments, meta, progress, task), None, ""
            except UpstreamError as exc:
                if exc.kind == "timeout":
                    return None, exc, f"upstream timed out after {timeout_s:g}s: {exc}"
                if exc.kind == "unavailable" and connected:
                    return None, exc, f"upstream connection lost: {exc}"[:1000]
                return None, exc, str(exc)
            finally:
                self._forwarding.discard(stop)
        if stop.cancel_called:  # the relay is stopping (shutdown)
            return None, UpstreamError("unavailable", RELAY_SHUTTING_DOWN), RELAY_SHUTTING_DOWN
        failure = UpstreamError("timeout", f"upstream {server!r} did not answer within {timeout_s:g}s")
        return None, failure, f"upstream timed out after {timeout_s:g}s: {failure}"

    def grant_meta(self, grant: bytes) -> dict[str, Any]:
        """The `_meta` an upstream request carries: the grant, the enclave's attestation, and the
        evidence that the grant key was introduced in the witnessed log."""
        meta: dict[str, Any] = {
            GRANT_META_KEY: base64.b64encode(grant).decode("ascii"),
            ATTESTATION_META_KEY: base64.b64encode(self.state.attestation).decode("ascii"),
        }
        if self.state.key_evidence is not None:
            meta[KEY_EVIDENCE_META_KEY] = self.state.key_evidence
        return meta

    async def _record_outcome(
        self,
        decision_index: int,
        result_value: dict[str, Any] | None,
        error: str,
        duration_us: int,
        paid: str,
    ) -> pb.OutcomeResponse:
        result_body = b""
        result_hash = b""
        signature = b""
        if result_value is not None:
            signature = _response_signature(result_value)
            # The hash the upstream signed (decision 0017); the body stored is what it covers.
            result_hash = result_sha256(result_value)
            result_body = _compact_json(without_signature(result_value))
        try:
            outcome = await self.state.enclave.record_outcome(
                pb.OutcomeRequest(
                    decision_index=decision_index,
                    result_sha256=result_hash,
                    error=error,
                    duration_us=duration_us,
                    persisted_size=self.state.writer.persisted_size,
                    paid_amount=paid,
                    response_sig=signature,
                )
            )
        except (EnclaveUnavailable, EnclaveRefused) as exc:
            raise MCPError(
                LOG_UNAVAILABLE,
                f"the call ran but its outcome could not be logged, so it is not acknowledged: {exc}",
                data={SOURCE: FROM_CLOISTER, "log_index": decision_index},
            ) from exc
        if result_body:
            self.state.store_body(outcome.log_index, "result", result_body)
        return outcome

    async def _persist_or_fail(self, append: pb.LogAppend) -> None:
        try:
            await self.state.persist(append)
        except Exception as exc:
            log.exception("persisting log entries failed")
            raise MCPError(
                LOG_UNAVAILABLE,
                f"the log could not be persisted; nothing was forwarded: {exc}",
                data={SOURCE: FROM_CLOISTER},
            ) from exc


async def forward_call(
    upstream: Upstream,
    tool: str,
    arguments: dict[str, Any],
    meta: dict[str, Any],
    progress: ProgressFnT | None,
    task: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one forward of a tools/call: the upstream's result object as JSON, exactly as the
    outcome's hash covers it (`result_sha256`, decision 0017); UpstreamError when it fails.
    With `task` (decision 0029): a raw request, whose answer may be a CreateTaskResult."""
    if task is not None:
        params = {"name": tool, "arguments": arguments, "task": task, "_meta": meta}
        return await upstream.task_request("call", "tools/call", params)
    if progress is None:
        # The lean call (decision 0024): the result exactly as the upstream sent (and signed) it.
        return await upstream.call_json(tool, arguments, meta)
    # Progress flows through the SDK session's handlers: the SDK call, as it was sent.
    return wire_value(await upstream.call(tool, arguments, meta, progress))


@dataclass(frozen=True)
class TaskStarted:
    """An allowed task-augmented call whose upstream made a task: its outcome is still open."""

    verdict: pb.AuthorizeResponse
    created: dict[str, Any]  # the upstream's CreateTaskResult, as sent
    started: float  # monotonic, when it was forwarded
    paid: str  # the amount the grant says was charged ("" for none)


def is_create_task_result(result: dict[str, Any]) -> bool:
    """A CreateTaskResult (a `task` object, no tool content), not a tool's own result."""
    return isinstance(result.get("task"), dict) and "content" not in result


class _Flagged:
    """What the observer reads of a tools/call result (`is_error`), for a result held as JSON."""

    __slots__ = ("is_error",)

    def __init__(self, result: dict[str, Any] | None) -> None:
        self.is_error = bool(result.get("isError")) if result is not None else False


def _response_signature(result_value: dict[str, Any]) -> bytes:
    """The upstream's response signature, as the enclave should judge it: the 64 bytes when
    well-formed; a malformed value goes as its text (bounded), which the enclave records as an
    invalid signature rather than a missing one; empty when there is none."""
    try:
        return signature_from_meta(result_value.get("_meta")) or b""
    except DecodeError:
        raw = (result_value.get("_meta") or {}).get(RESPONSE_SIG_META_KEY)
        return str(raw)[:MAX_SIG_TEXT].encode("utf-8", "replace") or b"?"


def _answer(
    result: dict[str, Any] | None, failure: UpstreamError | None, log_meta: dict[str, int], server: str
) -> dict[str, Any]:
    """The agent's answer: the upstream's result or error, with the log indexes of the call's entries."""
    if failure is not None:
        _raise_failure(failure, log_meta, server)
    assert result is not None
    # The upstream's serverInfo stamp describes the upstream, not this server, and Cloister's own
    # meta keys (dev.cloister/...) are only Cloister's to set: drop both.
    return {**result, "_meta": stamped_meta(result.get("_meta"), log_meta)}


def stamped_meta(meta: Any, log_meta: dict[str, int]) -> dict[str, Any]:
    """An upstream's `_meta` as the agent gets it: without the upstream's serverInfo stamp and
    Cloister's own keys (dev.cloister/...), with the log indexes of the request's entries."""
    meta_out: dict[str, Any] = {
        k: v
        for k, v in (meta or {}).items()
        if k != "io.modelcontextprotocol/serverInfo" and not k.startswith(CLOISTER_META_PREFIX)
    }
    meta_out[LOG_META_KEY] = log_meta
    return meta_out


def _raise_failure(failure: UpstreamError, log_meta: dict[str, int], server: str) -> NoReturn:
    """An upstream's failure as the agent's error. An upstream's error never passes for
    Cloister's: it says `source: "upstream"`, and a code of Cloister's own block becomes
    UPSTREAM_FAILED (the original is `upstream_code`)."""
    if failure.code == PAYMENT_REQUIRED and failure.kind == "error":
        # Pass the payment requirements through, as the x402 MCP transport specifies.
        data = dict(failure.data) if isinstance(failure.data, dict) else {"upstream": failure.data}
        marks = {SOURCE: FROM_UPSTREAM, "upstream_server": server, LOG_META_KEY: log_meta}
        raise MCPError(PAYMENT_REQUIRED, str(failure), data={**data, **marks})
    if failure.kind == "error" and failure.code:
        raise MCPError(
            upstream_error_code(failure.code),
            str(failure),
            data={
                SOURCE: FROM_UPSTREAM,
                "upstream_server": server,
                "upstream_code": failure.code,
                "kind": failure.kind,
                **log_meta,
                "upstream": failure.data,
            },
        )
    # unavailable, timeout: the relay's verdict on the upstream
    raise MCPError(UPSTREAM_FAILED, str(failure), data={SOURCE: FROM_CLOISTER, "kind": failure.kind, **log_meta})
