"""The call path of `tools/call`: ask the enclave, persist its decision, forward an allowed call
upstream with the grant, then record the outcome and persist it before the agent gets an answer.

Fail closed at every step: no decision (the enclave unavailable or refusing) forwards nothing, a
denial forwards nothing, and a decision or outcome that could not be persisted is not acknowledged.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from typing import Any

import mcp_types as types
from mcp.shared.exceptions import MCPError

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
from cloister.relay.state import RelayState
from cloister.relay.upstreams import UpstreamError, Upstreams
from cloister.verify.canonical import canonical_sha256
from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY, GrantError, read_grant
from cloister.verify.x402 import MAX_PAYMENT_BYTES
from cloister.wire import enclave_pb2 as pb
from cloister.wire.contract import LOG_META_KEY, TOOL_SEPARATOR, X402_META_KEY

log = logging.getLogger("cloister.relay")
CLOISTER_META_PREFIX = LOG_META_KEY.split("/", 1)[0] + "/"  # "dev.cloister/"


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


def _granted_payment(grant: bytes) -> str:
    """The amount the enclave charged for the call's payment, as its grant states it ("" for none)."""
    try:
        return read_grant(grant).payment_amount
    except GrantError:
        return ""


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


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


class CallPath:
    def __init__(self, state: RelayState, upstreams: Upstreams) -> None:
        self.state = state
        self.upstreams = upstreams

    async def call(self, token: str, params: types.CallToolRequestParams) -> types.CallToolResult:
        """One governed `tools/call` for the agent whose bearer token is `token`."""
        server, tool = split_tool_name(params.name)
        arguments = dict(params.arguments or {})
        args_json = _compact_json(arguments)
        if len(args_json) > self.state.config.max_argument_bytes:
            raise MCPError(
                INVALID_PARAMS,
                f"arguments are {len(args_json)} bytes; this relay accepts at most "
                f"{self.state.config.max_argument_bytes} (nothing was forwarded)",
                data={SOURCE: FROM_CLOISTER},
            )
        payment = (params.meta or {}).get(X402_META_KEY)
        try:
            payment_json = x402_payload(payment) if payment is not None else b""
        except ValueError as exc:
            raise MCPError(
                INVALID_PARAMS, f"the x402 payment in _meta is malformed: {exc} (nothing was forwarded)"
            ) from exc
        marks = [time.perf_counter()]
        # 1. Ask the enclave. Any failure here means no allow: nothing is forwarded.
        verdict = await self._authorize(token, server, tool, args_json, payment_json)
        marks.append(time.perf_counter())
        # 2. The decision entry is durable before anything depends on it.
        await self._persist_or_fail(verdict.log)
        marks.append(time.perf_counter())
        if verdict.decision != pb.ALLOW:
            await self._keep_denied_arguments(verdict, args_json)
            raise _denied(verdict)
        # Bodies join the next group commit; the outcome's persist waits for them to be durable.
        self.state.store_body(verdict.log_index, "args", args_json)
        # 3. Forward, with the grant, to the upstream.
        started = time.monotonic()
        result, failure = await self._forward(server, tool, arguments, verdict.grant, payment)
        duration_us = int((time.monotonic() - started) * 1_000_000)
        marks.append(time.perf_counter())
        # 4. The outcome is recorded and durable before the agent gets its answer.
        outcome = await self._record_outcome(
            verdict.log_index,
            result,
            failure,
            duration_us,
            _granted_payment(verdict.grant) if result is not None else "",
        )
        marks.append(time.perf_counter())
        await self._persist_or_fail(outcome.log)
        marks.append(time.perf_counter())
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

    async def _keep_denied_arguments(self, verdict: pb.AuthorizeResponse, args_json: bytes) -> None:
        """With `keep_denied_arguments`, store a denied call's arguments beside its decision entry
        (sealed like any body). Off by default: a denied call's arguments are never stored."""
        if not self.state.config.keep_denied_arguments or not verdict.log.entries:
            return
        try:
            await self.state.store_body(verdict.log_index, "args", args_json)
        except Exception as exc:  # the denial stands and is logged; only its arguments are lost
            log.warning("could not keep the arguments of denied entry %d: %s", verdict.log_index, exc)

    async def _authorize(
        self, token: str, server: str, tool: str, args_json: bytes, payment: bytes
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
                )
            )
        except EnclaveUnavailable as exc:
            raise MCPError(
                ENCLAVE_UNAVAILABLE,
                f"call refused, the enclave is unavailable (fail closed): {exc}",
                data={SOURCE: FROM_CLOISTER},
            ) from exc
        except EnclaveRefused as exc:
            raise MCPError(
                ENCLAVE_UNAVAILABLE, f"call refused, the enclave could not decide: {exc}", data={SOURCE: FROM_CLOISTER}
            ) from exc

    async def _forward(
        self, server: str, tool: str, arguments: dict[str, Any], grant: bytes, payment: Any
    ) -> tuple[types.CallToolResult | None, UpstreamError | None]:
        upstream = self.upstreams.by_name.get(server)
        if upstream is None:
            return None, UpstreamError("unavailable", f"no upstream named {server!r} is configured on this relay")
        meta: dict[str, Any] = {
            GRANT_META_KEY: base64.b64encode(grant).decode("ascii"),
            ATTESTATION_META_KEY: base64.b64encode(self.state.attestation).decode("ascii"),
        }
        if payment is not None:
            meta[X402_META_KEY] = payment
        try:
            return await upstream.call(tool, arguments, meta), None
        except UpstreamError as exc:
            return None, exc

    async def _record_outcome(
        self,
        decision_index: int,
        result: types.CallToolResult | None,
        failure: UpstreamError | None,
        duration_us: int,
        paid: str,
    ) -> pb.OutcomeResponse:
        result_body = b""
        result_hash = b""
        if result is not None:
            result_value = result.model_dump(mode="json", by_alias=True, exclude_none=True)
            result_hash = canonical_sha256(result_value)
            result_body = _compact_json(result_value)
        try:
            outcome = await self.state.enclave.record_outcome(
                pb.OutcomeRequest(
                    decision_index=decision_index,
                    result_sha256=result_hash,
                    error=str(failure) if failure else "",
                    duration_us=duration_us,
                    persisted_size=self.state.writer.persisted_size,
                    paid_amount=paid,
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


def _answer(
    result: types.CallToolResult | None, failure: UpstreamError | None, log_meta: dict[str, int], server: str
) -> types.CallToolResult:
    """The agent's answer: the upstream's result or error, with the log indexes of the call's entries.

    An upstream's error never passes for Cloister's: it says `source: "upstream"`, and a code of
    Cloister's own block becomes UPSTREAM_FAILED (the original is `upstream_code`)."""
    if failure is not None and failure.code == PAYMENT_REQUIRED and failure.kind == "error":
        # Pass the payment requirements through, as the x402 MCP transport specifies.
        data = dict(failure.data) if isinstance(failure.data, dict) else {"upstream": failure.data}
        marks = {SOURCE: FROM_UPSTREAM, "upstream_server": server, LOG_META_KEY: log_meta}
        raise MCPError(PAYMENT_REQUIRED, str(failure), data={**data, **marks})
    if failure is not None and failure.kind == "error" and failure.code:
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
    if failure is not None:  # unavailable, timeout: the relay's verdict on the upstream
        raise MCPError(UPSTREAM_FAILED, str(failure), data={SOURCE: FROM_CLOISTER, "kind": failure.kind, **log_meta})
    assert result is not None
    # The upstream's serverInfo stamp describes the upstream, not this server, and Cloister's own
    # meta keys (dev.cloister/...) are only Cloister's to set: drop both.
    meta_out: dict[str, Any] = {
        k: v
        for k, v in (result.meta or {}).items()
        if k != "io.modelcontextprotocol/serverInfo" and not k.startswith(CLOISTER_META_PREFIX)
    }
    meta_out[LOG_META_KEY] = log_meta
    return result.model_copy(update={"meta": meta_out})
