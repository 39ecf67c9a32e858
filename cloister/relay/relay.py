"""The relay: the untrusted half that agents, upstream servers and auditors talk to.

- Agents speak MCP (official SDK, streamable HTTP at `/mcp`) with `Authorization: Bearer <JWT>`.
  `tools/list` shows only what the enclave says the agent may call. `tools/call` asks the
  enclave first, persists the decision entry, and only then forwards an allowed call upstream
  with the enclave's grant in `params._meta`. The outcome is recorded by the enclave and
  persisted before the agent gets its answer.
- Auditors read the log over HTTP at `/log/...` (C2SP tlog-tiles) and ask for attested
  checkpoints; anyone can ask for the enclave's attestation at `/attestation?nonce=HEX`.

The relay can drop or delay traffic, but it cannot forge a decision, a grant, a log entry or
a checkpoint: those are signed inside the enclave, and upstreams and auditors check them.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

import anyio
import grpc
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cloister import __version__
from cloister.relay.codes import (
    ENCLAVE_UNAVAILABLE,
    INVALID_PARAMS,
    LOG_UNAVAILABLE,
    PAYMENT_REQUIRED,
    UNAUTHENTICATED,
    UPSTREAM_FAILED,
    denial_error,
)
from cloister.relay.config import RelayConfig
from cloister.relay.enclave_client import EnclaveClient, EnclaveRefused, EnclaveUnavailable
from cloister.relay.storage import LocalBackend, LogWriter, WriterOptions
from cloister.relay.upstreams import UpstreamError, Upstreams
from cloister.verify.canonical import canonical_sha256
from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY
from cloister.wire import enclave_pb2 as pb
from cloister.wire.contract import (
    LOG_META_KEY,
    MAX_LIMIT_WINDOW_S,
    POLICY_NOT_NEWER_STATUS,
    RESUME_HISTORY_MARGIN_S,
    TOOL_SEPARATOR,
    X402_META_KEY,
)

log = logging.getLogger("cloister.relay")

ATTESTATION_URI = "cloister://attestation/"
MAX_BUNDLE_UPLOAD = 9 << 20
POLICY_NOT_NEWER = grpc.StatusCode[POLICY_NOT_NEWER_STATUS]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bearer(ctx: ServerRequestContext[Any, Any]) -> str:
    request = ctx.request
    if request is None:
        return ""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def x402_amount(payment: Any) -> str:
    """The amount an x402 payment payload authorises (decimal string).

    Accepts the `exact` scheme's EIP-3009 authorisation value (`payload.authorization.value`)
    or a plain `payload.amount`. The relay only reads it for the enclave's budget; the upstream
    verifies the payment itself.
    """
    if not isinstance(payment, dict) or not isinstance(payment.get("payload"), dict):
        raise ValueError("expected an object with a 'payload' object")
    body = payment["payload"]
    auth = body.get("authorization")
    value = auth.get("value") if isinstance(auth, dict) else body.get("amount")
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ValueError("no payload.authorization.value or payload.amount")
    text = str(value)
    if not text or len(text) > 40 or not all(c.isdigit() or c == "." for c in text):
        raise ValueError(f"amount {text[:40]!r} is not a decimal number")
    return text


def split_tool_name(name: str) -> tuple[str, str]:
    server, sep, tool = name.partition(TOOL_SEPARATOR)
    return (server, tool) if sep else ("", name)


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.enclave = EnclaveClient(config.enclave, config.run_dir, timeout_s=config.enclave_timeout_s)
        self.upstreams = Upstreams(config.upstreams, self)
        self.log: LogWriter | None = None
        self.attestation = b""
        self.health_info: pb.HealthResponse | None = None
        self._init_lock = anyio.Lock()
        self._attested_at = 0.0
        self.mcp: Server[Any] = Server(
            "cloister-relay",
            version=__version__,
            instructions="Tools are named <server>___<tool>. Every call is decided by an attested enclave "
            "and recorded in a verifiable log.",
            # Without this the SDK validates Mcp-Param-* headers on every tools/call by running the
            # whole tools/list handler, i.e. an enclave round trip per call.
            get_tool_input_schema=self._input_schema,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_resource_templates,
            on_read_resource=self._read_resource,
        )

    # ---- start-up: storage, enclave log, policy, attestation --------------------------------

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        self.log = await open_storage(self.config.storage, s3_endpoint_url=self.config.s3_endpoint_url,
                                      body_retention_days=self.config.body_retention_days)
        await self.enclave.start()
        await self.ensure_enclave_ready(startup=True)
        await self.upstreams.run(tg)
        await self.upstreams.wait_ready(15)
        tg.start_soon(self._watch_enclave)

    async def ensure_enclave_ready(self, *, startup: bool = False) -> None:
        """Bring the enclave to a running log with the configured policy, whatever its state."""
        assert self.log is not None
        async with self._init_lock:
            deadline = time.monotonic() + (60 if startup else 5)
            while True:
                try:
                    health = await self.enclave.health(timeout=2)
                    break
                except (EnclaveUnavailable, EnclaveRefused) as exc:
                    if time.monotonic() > deadline:
                        raise EnclaveUnavailable(f"cannot reach the enclave at {self.config.enclave}: {exc}") from exc
                    await anyio.sleep(0.2)
            if health.log_size == 0:
                if not startup:
                    await self._forget_unacknowledged()
                material = await self.log.resume_material(max_history_entries=1_000_000,
                                                          window_start_ms=self._history_start_ms())
                if material is None:
                    log.info("starting a new log %s", health.origin)
                    started = await self.enclave.start_log(None)
                else:
                    log.info("resuming the stored log (history from entry %d)", material.range_size)
                    started = await self.enclave.start_log(pb.ResumeFrom(**dataclasses.asdict(material)))
                await self._persist(started.log)
            else:
                # The enclave kept running while we restarted: persist what it sequenced meanwhile.
                synced = await self.enclave.sync(self.log.persisted_size)
                await self._persist(synced.log)
            await self._load_policy()
            await self.refresh_attestation()
            self.health_info = await self.enclave.health()

    async def _forget_unacknowledged(self) -> None:
        """A new enclave will sequence its own entries at the indexes the dead one left unpersisted.

        Entries the writer holds beyond its durable size (waiting behind a gap, or written without
        a durable checkpoint) were never acknowledged; keeping them would clash with the new
        enclave's. Reopening the storage runs the same recovery as after a relay crash: it truncates
        to the latest durable checkpoint. Calls still waiting on those entries fail, unacknowledged.
        """
        assert self.log is not None
        old, durable = self.log, self.log.persisted_size
        await old.close()
        self.log = await open_storage(self.config.storage, s3_endpoint_url=self.config.s3_endpoint_url,
                                      body_retention_days=self.config.body_retention_days, verify="tail")
        log.warning("the enclave restarted: storage reopened at its durable size %d (was %d)",
                    self.log.persisted_size, durable)

    def _history_start_ms(self) -> int | None:
        # The enclave refuses a bundle whose limit windows reach beyond the history it was given;
        # give it the longest window any bundle may use (31 days) plus the outcome grace.
        return int(time.time() * 1000) - (MAX_LIMIT_WINDOW_S + RESUME_HISTORY_MARGIN_S) * 1000

    def _newest_bundle(self) -> bytes | None:
        """The configured bundle, or a newer one pushed since (kept in the relay's bundle store)."""
        from cloister.verify.bundle import read_bundle_header

        candidates = list(self._bundle_store().glob("v*.signed"))
        if self.config.bundle is not None:
            candidates.append(self.config.bundle)
        best: tuple[int, bytes] | None = None
        for path in candidates:
            try:
                data = path.read_bytes()
                version = read_bundle_header(data)[0]
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable policy bundle %s: %s", path, exc)
                continue
            if best is None or version > best[0]:
                best = (version, data)
        return best[1] if best else None

    def _bundle_store(self) -> Path:
        path = self.config.run_dir.parent / "bundles"
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def _load_policy(self) -> None:
        assert self.log is not None
        bundle = self._newest_bundle()
        if bundle is None:
            log.warning("no policy bundle configured: the enclave will refuse every call until one is pushed")
            return
        try:
            resp = await self.enclave.load_policy(bundle, self.log.persisted_size)
            await self._persist(resp.log)
            log.info("policy bundle version %d (%s) in force", resp.version, resp.bundle_sha256.hex()[:16])
        except EnclaveRefused as exc:
            if exc.code != POLICY_NOT_NEWER:
                raise
            log.info("policy bundle already in force: %s", exc)

    async def refresh_attestation(self) -> None:
        resp = await self.enclave.attest(secrets.token_bytes(16))
        self.attestation = resp.document
        self._attested_at = time.monotonic()

    async def _watch_enclave(self) -> None:
        """Notice an enclave restart (fresh keys, empty log) and bring it back; refresh attestation."""
        while True:
            await anyio.sleep(1.0)
            try:
                health = await self.enclave.health(timeout=2)
            except (EnclaveUnavailable, EnclaveRefused):
                continue
            known = self.health_info
            if known is None or health.log_public_key != known.log_public_key or not health.ready:
                log.warning("the enclave restarted or lost its state; re-initialising it")
                try:
                    await self.ensure_enclave_ready()
                    # A fresh enclave knows no upstream identity yet: prove them all again.
                    self.upstreams.reattest_all()
                except Exception as exc:  # keep watching; calls fail closed meanwhile
                    log.error("re-initialising the enclave failed: %s", exc)
            elif time.monotonic() - self._attested_at > self.config.attestation_refresh_s:
                try:
                    await self.refresh_attestation()
                except (EnclaveUnavailable, EnclaveRefused) as exc:
                    log.warning("attestation refresh failed: %s", exc)

    # ---- upstream identity: the relay carries evidence, the enclave verifies ---------------------

    async def challenge(self, server: str, *, reconnect: bool) -> tuple[bytes, str] | None:
        try:
            resp = await self.enclave.server_challenge(server, reconnect=reconnect)
        except EnclaveRefused as exc:
            log.warning("no identity challenge for upstream %s: %s", server, exc)
            return None
        return resp.nonce, resp.kind

    async def report(self, server: str, *, evidence: bool, tools: list[types.Tool] | None,
                     attestation: bytes = b"", artifact: bytes = b"", certificates: list[bytes] | None = None,
                     failure: str = "") -> str:
        assert self.log is not None
        tools_json = b""
        if tools is not None:
            tools_json = json.dumps([t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools])\
                .encode()
        try:
            resp = await self.enclave.report_server(pb.ServerReport(
                server=server, evidence=evidence, attestation=attestation, artifact=artifact,
                certificates=certificates or [], failure=failure, tools_json=tools_json,
                persisted_size=self.log.persisted_size))
        except EnclaveRefused as exc:
            log.warning("the enclave refused the report for upstream %s: %s", server, exc)
            return "refused"
        await self._persist(resp.log)
        if resp.status == "failed":
            log.warning("upstream %s is quarantined by the enclave: %s", server, resp.detail)
        elif resp.hidden_tools:
            log.warning("upstream %s: the enclave hides %s", server, ", ".join(resp.hidden_tools))
        return resp.status

    async def _persist(self, append: pb.LogAppend) -> None:
        assert self.log is not None
        if append.entries or append.checkpoint:
            await self.log.persist(append.first_index, list(append.entries), append.checkpoint)

    # ---- MCP: tools/list ------------------------------------------------------------------

    def _input_schema(self, name: str) -> dict[str, Any] | None:
        server, tool = split_tool_name(name)
        upstream = self.upstreams.by_name.get(server)
        for t in upstream.tools if upstream else ():
            if t.name == tool:
                return dict(t.input_schema)
        return None

    async def _list_tools(self, ctx: ServerRequestContext[Any, Any],
                          params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        token = _bearer(ctx)
        by_key = {(u.name, t.name): t for u in self.upstreams.by_name.values() for t in u.tools}
        try:
            resp = await self.enclave.filter_tools(token, list(by_key))
        except EnclaveRefused as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                raise MCPError(UNAUTHENTICATED, f"unauthenticated: {exc}") from exc
            raise MCPError(ENCLAVE_UNAVAILABLE, f"the enclave refused to list tools: {exc}") from exc
        except EnclaveUnavailable as exc:
            raise MCPError(ENCLAVE_UNAVAILABLE, f"no tools are listed while the enclave is unavailable: {exc}") \
                from exc
        tools = []
        for ref in resp.visible:
            t = by_key[(ref.server, ref.tool)]
            tools.append(t.model_copy(update={
                "name": f"{ref.server}{TOOL_SEPARATOR}{ref.tool}",
                "description": f"[{ref.server}] {t.description or ''}".strip(),
            }))
        return types.ListToolsResult(tools=tools)

    # ---- MCP: the enclave's attestation, for agents --------------------------------------

    async def _list_resources(self, ctx: ServerRequestContext[Any, Any],
                              params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[])

    async def _list_resource_templates(self, ctx: ServerRequestContext[Any, Any],
                                       params: types.PaginatedRequestParams | None
                                       ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[types.ResourceTemplate(
            name="enclave-attestation", uri_template=ATTESTATION_URI + "{nonce}", mime_type="application/json",
            description="The Cloister enclave's NSM attestation document (base64) with your nonce (hex, 8-64 "
                        "bytes); its user_data binds the enclave's grant and log keys. Verify it with "
                        "cloister.verify.enclave_identity.verify_enclave or `cloister attest verify`.")])

    async def _read_resource(self, ctx: ServerRequestContext[Any, Any],
                             params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        if not uri.startswith(ATTESTATION_URI):
            raise MCPError(INVALID_PARAMS, f"unknown resource {uri!r}; try {ATTESTATION_URI}<nonce hex>")
        try:
            nonce = bytes.fromhex(uri.removeprefix(ATTESTATION_URI))
        except ValueError:
            nonce = b""
        if not 8 <= len(nonce) <= 64:
            raise MCPError(INVALID_PARAMS, "the nonce must be 8 to 64 bytes, hex-encoded")
        try:
            resp = await self.enclave.attest(nonce)
        except (EnclaveUnavailable, EnclaveRefused) as exc:
            raise MCPError(ENCLAVE_UNAVAILABLE, f"the enclave is unavailable: {exc}") from exc
        body = json.dumps({"document": _b64(resp.document), "nonce": nonce.hex()})
        return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, mime_type="application/json",
                                                                            text=body)])

    # ---- MCP: tools/call ------------------------------------------------------------------

    async def _call_tool(self, ctx: ServerRequestContext[Any, Any],
                         params: types.CallToolRequestParams) -> types.CallToolResult:
        assert self.log is not None
        server, tool = split_tool_name(params.name)
        arguments = dict(params.arguments or {})
        args_json = json.dumps(arguments, ensure_ascii=False, separators=(",", ":")).encode()
        if len(args_json) > self.config.max_argument_bytes:
            raise MCPError(INVALID_PARAMS, f"arguments are {len(args_json)} bytes; this relay accepts at most "
                                           f"{self.config.max_argument_bytes} (nothing was forwarded)")
        request_id = uuid.uuid4().hex
        payment = (params.meta or {}).get(X402_META_KEY)
        try:
            payment_amount = x402_amount(payment) if payment is not None else ""
        except ValueError as exc:
            raise MCPError(INVALID_PARAMS, f"the x402 payment in _meta is malformed: {exc} (nothing was forwarded)") \
                from exc
        marks = [time.perf_counter()]
        # 1. Ask the enclave. Any failure here means no allow: nothing is forwarded.
        try:
            verdict = await self.enclave.authorize(pb.AuthorizeRequest(
                token=_bearer(ctx), server=server, tool=tool, arguments_json=args_json, request_id=request_id,
                persisted_size=self.log.persisted_size, payment_amount=payment_amount))
        except EnclaveUnavailable as exc:
            raise MCPError(ENCLAVE_UNAVAILABLE, f"call refused, the enclave is unavailable (fail closed): {exc}") \
                from exc
        except EnclaveRefused as exc:
            raise MCPError(ENCLAVE_UNAVAILABLE, f"call refused, the enclave could not decide: {exc}") from exc
        marks.append(time.perf_counter())
        # 2. The decision entry is durable before anything depends on it.
        await self._persist_or_fail(verdict.log)
        marks.append(time.perf_counter())
        decision_index = verdict.log_index
        if verdict.decision != pb.ALLOW:
            raise MCPError(denial_error(verdict.denial), f"denied: {verdict.reason}", data={
                "decision": "deny", "code": verdict.deny_code, "reason": verdict.reason,
                "policies": list(verdict.policy_ids), "log_index": decision_index, "agent": verdict.agent,
                "limits": [{"limit": s.limit_id, "kind": s.kind, "remaining": s.remaining,
                            "retry_after_s": s.retry_after_s} for s in verdict.limits],
            })
        # Bodies join the next group commit; the outcome's persist waits for them to be durable.
        self.log.put_body(decision_index, "args", args_json)
        # 3. Forward, with the grant, to the upstream.
        upstream = self.upstreams.by_name.get(server)
        started = time.monotonic()
        result: types.CallToolResult | None = None
        failure: UpstreamError | None = None
        if upstream is None:
            failure = UpstreamError("unavailable", f"no upstream named {server!r} is configured on this relay")
        else:
            meta: dict[str, Any] = {GRANT_META_KEY: _b64(verdict.grant), ATTESTATION_META_KEY: _b64(self.attestation)}
            if payment is not None:
                meta[X402_META_KEY] = payment
            try:
                result = await upstream.call(tool, arguments, meta)
            except UpstreamError as exc:
                failure = exc
        duration_us = int((time.monotonic() - started) * 1_000_000)
        marks.append(time.perf_counter())
        # 4. The outcome is recorded and durable before the agent gets its answer.
        result_body = b""
        result_hash = b""
        if result is not None:
            result_value = result.model_dump(mode="json", by_alias=True, exclude_none=True)
            result_hash = canonical_sha256(result_value)
            result_body = json.dumps(result_value, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            outcome = await self.enclave.record_outcome(pb.OutcomeRequest(
                decision_index=decision_index, result_sha256=result_hash, error=str(failure) if failure else "",
                duration_us=duration_us, persisted_size=self.log.persisted_size,
                paid_amount=payment_amount if result is not None else ""))
        except (EnclaveUnavailable, EnclaveRefused) as exc:
            raise MCPError(LOG_UNAVAILABLE, f"the call ran but its outcome could not be logged, so it is not "
                                            f"acknowledged: {exc}", data={"log_index": decision_index}) from exc
        if result_body:
            self.log.put_body(outcome.log_index, "result", result_body)
        marks.append(time.perf_counter())
        await self._persist_or_fail(outcome.log)
        marks.append(time.perf_counter())
        if log.isEnabledFor(logging.DEBUG):
            phases = ("authorize", "persist", "upstream", "outcome", "persist")
            log.debug("call %s/%s: %s", server, tool, " ".join(
                f"{name} {1000 * (b - a):.2f}ms" for name, a, b in zip(phases, marks, marks[1:], strict=False)))
        log_meta = {"decision": decision_index, "outcome": outcome.log_index,
                    "checkpoint_size": outcome.log.first_index + len(outcome.log.entries)}
        if failure is not None and failure.code == PAYMENT_REQUIRED:
            # Pass the payment requirements through, as the x402 MCP transport specifies.
            data = dict(failure.data) if isinstance(failure.data, dict) else {"upstream": failure.data}
            raise MCPError(PAYMENT_REQUIRED, str(failure), data={**data, LOG_META_KEY: log_meta})
        if failure is not None:
            raise MCPError(failure.code if failure.kind == "error" and failure.code else UPSTREAM_FAILED,
                           str(failure), data={"kind": failure.kind, **log_meta, "upstream": failure.data})
        assert result is not None
        # The upstream's serverInfo stamp describes the upstream, not this server: drop it.
        meta_out = {k: v for k, v in (result.meta or {}).items() if k != "io.modelcontextprotocol/serverInfo"}
        meta_out[LOG_META_KEY] = log_meta
        return result.model_copy(update={"meta": meta_out})

    async def _persist_or_fail(self, append: pb.LogAppend) -> None:
        try:
            await self._persist(append)
        except Exception as exc:
            log.exception("persisting log entries failed")
            raise MCPError(LOG_UNAVAILABLE, f"the log could not be persisted; nothing was forwarded: {exc}") from exc

    # ---- HTTP: health, attestation, the log's read API ----------------------------------------

    async def healthz(self, request: Request) -> Response:
        assert self.log is not None
        info = self.health_info
        body = {
            "ready": bool(info and info.ready),
            "enclave": {"origin": info.origin, "pcr0": info.pcr0.hex(), "mock_nsm": info.mock_nsm,
                        "policy_version": info.policy_version, "log_verifier_key": info.log_verifier_key}
            if info else None,
            "log_size": self.log.persisted_size,
            "upstreams": self.upstreams.status(),
        }
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    def _nonce(self, request: Request) -> bytes:
        text = request.query_params.get("nonce", "")
        try:
            nonce = bytes.fromhex(text)
        except ValueError:
            nonce = b""
        if not 8 <= len(nonce) <= 64:
            raise ValueError("nonce must be 8 to 64 bytes, hex-encoded: ?nonce=<hex>")
        return nonce

    async def attestation_endpoint(self, request: Request, *, with_checkpoint: bool) -> Response:
        try:
            nonce = self._nonce(request)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            resp = await self.enclave.attest(nonce, include_checkpoint=with_checkpoint)
            if with_checkpoint:
                await self._publish_through(resp.checkpoint)
        except (EnclaveUnavailable, EnclaveRefused) as exc:
            return JSONResponse({"error": f"the enclave is unavailable: {exc}"}, status_code=503)
        body: dict[str, Any] = {"document": _b64(resp.document), "nonce": nonce.hex()}
        if with_checkpoint:
            body["checkpoint"] = resp.checkpoint.decode("utf-8")
        return JSONResponse(body)

    async def _publish_through(self, checkpoint: bytes) -> None:
        """Make the tiles for an attested checkpoint readable before handing it to an auditor."""
        assert self.log is not None
        size = int(checkpoint.split(b"\n", 2)[1])
        if self.log.persisted_size < size:
            synced = await self.enclave.sync(self.log.persisted_size)
            await self._persist(synced.log)
        if self.log.store.published_size < size:
            await self.log.publish()

    async def log_object(self, request: Request) -> Response:
        assert self.log is not None
        path = request.path_params["path"]
        data = await self.log.read_path(path)
        if data is None:
            return PlainTextResponse("not found\n", status_code=404)
        immutable = path.startswith("tile/") and ".p/" not in path
        headers = {"Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache"}
        media = "text/plain; charset=utf-8" if path == "checkpoint" else "application/octet-stream"
        return Response(data, media_type=media, headers=headers)

    async def inclusion(self, request: Request) -> Response:
        assert self.log is not None
        try:
            index = int(request.query_params["index"])
            size = int(request.query_params.get("size", self.log.store.published_size))
            proof = await self.log.inclusion_proof(index, size)
        except (KeyError, ValueError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        return JSONResponse({"index": index, "size": size, "proof": [_b64(h) for h in proof]})

    async def consistency(self, request: Request) -> Response:
        assert self.log is not None
        try:
            old = int(request.query_params["from"])
            new = int(request.query_params.get("to", self.log.store.published_size))
            proof = await self.log.consistency_proof(old, new)
        except (KeyError, ValueError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        return JSONResponse({"from": old, "to": new, "proof": [_b64(h) for h in proof]})

    @staticmethod
    def _body_ref(request: Request) -> tuple[int, str] | JSONResponse:
        """`/<index>/<args|result>` of a body route, or the 400 answer."""
        index_text, kind = request.path_params["index"], request.path_params["kind"]
        if not index_text.isdigit():
            return JSONResponse({"error": "index must be a number"}, status_code=400)
        if kind not in ("args", "result"):
            return JSONResponse({"error": "kind must be args or result"}, status_code=400)
        return int(index_text), kind

    async def body(self, request: Request) -> Response:
        assert self.log is not None
        ref = self._body_ref(request)
        if isinstance(ref, JSONResponse):
            return ref
        index, kind = ref
        data = await self.log.get_body(index, kind)
        if data is None:
            return PlainTextResponse("not found\n", status_code=404)
        return Response(data, media_type="application/json")

    async def push_policy(self, request: Request) -> Response:
        """Forward an admin-signed bundle to the enclave. Anyone may push: only the enclave decides,
        and it accepts only bundles signed by an admin key pinned in its measured image."""
        assert self.log is not None
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BUNDLE_UPLOAD:
                return JSONResponse({"error": f"bundle larger than {MAX_BUNDLE_UPLOAD} bytes"}, status_code=413)
        try:
            resp = await self.enclave.load_policy(body, self.log.persisted_size)
            await self._persist(resp.log)
        except EnclaveUnavailable as exc:
            return JSONResponse({"error": f"the enclave is unavailable: {exc}"}, status_code=503)
        except EnclaveRefused as exc:
            status = 409 if exc.code in (grpc.StatusCode.FAILED_PRECONDITION, POLICY_NOT_NEWER) else 400
            return JSONResponse({"error": f"the enclave refused the bundle: {exc}"}, status_code=status)
        (self._bundle_store() / f"v{resp.version}.signed").write_bytes(body)
        self.health_info = await self.enclave.health()
        log.info("policy bundle version %d pushed and in force", resp.version)
        return JSONResponse({"version": resp.version, "bundle_sha256": resp.bundle_sha256.hex()})

    async def tool_pins(self, request: Request) -> Response:
        """The current definition hash of each tool of an upstream, to paste into a bundle as pins.

        Computed by this (untrusted) relay from what the upstream lists now: review the tools
        before pinning them. The enclave recomputes the hashes itself when it checks pins."""
        from cloister.verify.tools import tool_definition_hash

        name = request.query_params.get("server", "")
        upstream = self.upstreams.by_name.get(name)
        if upstream is None:
            return JSONResponse({"error": f"no upstream named {name!r}; known: {sorted(self.upstreams.by_name)}"},
                                status_code=404)
        if upstream.state != "up":
            return JSONResponse({"error": f"upstream {name!r} is {upstream.state}: {upstream.last_error}"},
                                status_code=503)
        pins = {t.name: tool_definition_hash(t.model_dump(mode="json", by_alias=True, exclude_none=True))
                for t in upstream.tools}
        return JSONResponse({"server": name, "pins": pins})

    async def redact(self, request: Request) -> Response:
        """Replace a stored body by a tombstone that keeps its SHA-256: the log entry's commitment
        still checks, the content is gone. The log itself is never changed."""
        assert self.log is not None
        token = self.config.admin_token
        if token is None:
            return JSONResponse({"error": "redaction is disabled: set admin_token_file in the relay config"},
                                status_code=403)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "redaction needs 'Authorization: Bearer <admin token>'"}, status_code=401)
        ref = self._body_ref(request)
        if isinstance(ref, JSONResponse):
            return ref
        index, kind = ref
        try:
            await self.log.redact_body(index, kind)
        except KeyError as exc:
            return JSONResponse({"error": str(exc).strip("'\"")}, status_code=404)
        log.warning("redacted the %s body of log entry %d", kind, index)
        return JSONResponse({"index": index, "kind": kind, "redacted": True})

    def routes(self) -> list[Route]:
        async def attestation(request: Request) -> Response:
            return await self.attestation_endpoint(request, with_checkpoint=False)

        async def log_attestation(request: Request) -> Response:
            return await self.attestation_endpoint(request, with_checkpoint=True)

        return [
            Route("/healthz", self.healthz),
            Route("/admin/policy", self.push_policy, methods=["POST"]),
            Route("/admin/pins", self.tool_pins),
            Route("/admin/redact/{index}/{kind}", self.redact, methods=["POST"]),
            Route("/attestation", attestation),
            Route("/log/attestation", log_attestation),
            Route("/log/proof/inclusion", self.inclusion),
            Route("/log/proof/consistency", self.consistency),
            Route("/log/body/{index}/{kind}", self.body),
            Route("/log/{path:path}", self.log_object),
        ]

    def asgi_app(self) -> ASGIApp:
        app = self.mcp.streamable_http_app(host=self.config.host, custom_starlette_routes=self.routes())
        return RequireBearer(app)


async def open_storage(location: str, *, s3_endpoint_url: str | None, body_retention_days: int | None,
                       verify: Literal["full", "tail"] = "full") -> LogWriter:
    """The log's storage: a local directory, or s3://bucket/prefix."""
    options = WriterOptions(body_retention_days=body_retention_days, verify=verify)
    if location.startswith("s3://"):
        from cloister.relay.storage.s3 import S3Backend

        bucket, _, prefix = location[5:].partition("/")
        return await LogWriter.open(S3Backend(bucket, prefix, endpoint_url=s3_endpoint_url), options)
    return await LogWriter.open(LocalBackend(location), options)


class RequireBearer:
    """Answer 401 to MCP requests without a bearer token, before any MCP processing.

    This is not a trust decision (only the enclave verifies tokens); it lets MCP clients
    see the standard challenge instead of an opaque failure.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/") == "/mcp" and scope["method"] != "OPTIONS":
            headers = dict(scope.get("headers") or [])
            if not headers.get(b"authorization", b"").lower().startswith(b"bearer "):
                response = JSONResponse(
                    {"jsonrpc": "2.0", "id": None, "error": {"code": UNAUTHENTICATED,
                     "message": "unauthenticated: send 'Authorization: Bearer <JWT>' (cloister token issue ...)"}},
                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="cloister"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def serve(config: RelayConfig, *, ready: Callable[[Relay], Coroutine[Any, Any, None]] | None = None) -> None:
    import uvicorn

    relay = Relay(config)
    async with anyio.create_task_group() as tg:
        await relay.start(tg)
        server = uvicorn.Server(uvicorn.Config(relay.asgi_app(), host=config.host, port=config.port,
                                               log_level="warning", lifespan="on"))
        log.info("relay serving MCP at http://%s:%d/mcp", config.host, config.port)
        if ready is not None:
            tg.start_soon(ready, relay)
        try:
            await server.serve()
        finally:
            relay.upstreams.stop()
            assert relay.log is not None
            await relay.log.close()
            await relay.enclave.close()
            tg.cancel_scope.cancel()

