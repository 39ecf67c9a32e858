"""The relay's read-only HTTP API: `/healthz`, `/livez` and `/readyz`, the audit page `/log/`, the
enclave's attestation (`/attestation`, and `/log/attestation` with a checkpoint), and the log for
auditors (`/log/...`: C2SP tlog-tiles, proofs, and the bodies entries commit to). Nothing here
changes state but publishing tiles.

Tiles, checkpoints and proofs are public: they hold hashes only. Bodies (the arguments and
results entries commit to) go only to holders of the auditor token (`cloister.relay.auth`), as
stored: sealed to the auditor key when one is configured. Malformed indexes, sizes and kinds are
answered 400, whatever their size.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from cloister.audit.sealed import is_sealed
from cloister.relay.auth import AUDITOR, parse_index, refuse_unless
from cloister.relay.enclave_client import EnclaveRefused, EnclaveUnavailable
from cloister.relay.log_page import CSP, RECENT_ENTRIES, render_log_page
from cloister.relay.state import RelayState
from cloister.relay.upstreams import Upstreams
from cloister.relay.witnessing import Witnessing


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _nonce(request: Request) -> bytes:
    text = request.query_params.get("nonce", "")
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        nonce = b""
    if not 8 <= len(nonce) <= 64:
        raise ValueError("nonce must be 8 to 64 bytes, hex-encoded: ?nonce=<hex>")
    return nonce


def body_ref(request: Request) -> tuple[int, str] | JSONResponse:
    """`/<index>/<args|result>` of a body route, or the 400 answer."""
    index_text, kind = request.path_params["index"], request.path_params["kind"]
    try:
        index = parse_index(index_text, "the log index")
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    if kind not in ("args", "result"):
        return JSONResponse({"error": "kind must be args or result"}, status_code=400)
    return index, kind


def _query_index(request: Request, name: str, default: int | None = None) -> int:
    text = request.query_params.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"missing ?{name}=")
        return default
    return parse_index(text, name)


class LogApi:
    def __init__(self, state: RelayState, upstreams: Upstreams, witnessing: Witnessing | None = None) -> None:
        self.state = state
        self.upstreams = upstreams
        self.witnessing = witnessing
        self.shutting_down: Callable[[], bool] = lambda: False  # set by the relay (the server's exit flag)

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz),
            Route("/livez", self.livez),
            Route("/readyz", self.readyz),
            Route("/log", self.log_redirect),
            Route("/log/", self.log_page),
            Route("/attestation", self.attestation),
            Route("/log/attestation", self.log_attestation),
            Route("/log/proof/inclusion", self.inclusion),
            Route("/log/proof/consistency", self.consistency),
            Route("/log/body/{index}/{kind}", self.body),
            Route("/log/checkpoint.cosigned", self.cosigned_checkpoint),
            Route("/log/{path:path}", self.log_object),
        ]

    async def healthz(self, request: Request) -> Response:
        info = self.state.health_info
        ws = self.state.witness_state
        body = {
            "ready": bool(info and info.ready),
            # Whether the enclave grants calls now; false while the witnesses have not cosigned its
            # start or lag beyond the bound (decision 0015). Absent witnesses (unsafe mode): true.
            "granting": bool(info and info.ready and (ws is None or ws.granting)),
            "witness_gate": {
                "required": ws.required,
                "start_size": ws.start_size,
                "witnessed_size": ws.witnessed_size,
                "granting": ws.granting,
                "reason": ws.reason,
            }
            if ws is not None
            else None,
            "enclave": {
                "origin": info.origin,
                "pcr0": info.pcr0.hex(),
                "mock_nsm": info.mock_nsm,
                "policy_version": info.policy_version,
                "log_verifier_key": info.log_verifier_key,
            }
            if info
            else None,
            "log_size": self.state.writer.persisted_size,
            "upstreams": self.upstreams.status(),
        }
        if self.witnessing is not None:
            body["witnessing"] = self.witnessing.health()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    async def livez(self, request: Request) -> Response:
        """Liveness (Kubernetes livenessProbe): the process serves HTTP. Deliberately independent of
        the enclave, storage and upstreams: restarting the relay cures none of their outages."""
        return JSONResponse({"live": True}, headers={"Cache-Control": "no-store"})

    async def readyz(self, request: Request) -> Response:
        """Readiness (Kubernetes readinessProbe, load balancer health check): 200 only when a call
        sent here can be decided and granted now; else 503 with every reason why not."""
        info, ws = self.state.health_info, self.state.witness_state
        reasons = []
        if self.shutting_down():
            reasons.append("the relay is shutting down")
        if info is None or not info.ready:
            reasons.append("the enclave is not running a log")
        elif info.policy_version == 0:
            reasons.append("no policy bundle is in force")
        if ws is not None and not ws.granting:
            reasons.append(f"the enclave is not granting: {ws.reason or 'witnesses behind'}")
        try:
            self.state.writer  # noqa: B018 (raises while storage is not open)
        except RuntimeError:
            reasons.append("the log's storage is not open")
        body = {"ready": not reasons, "reasons": reasons}
        return JSONResponse(body, status_code=503 if reasons else 200, headers={"Cache-Control": "no-store"})

    async def log_redirect(self, request: Request) -> Response:
        return RedirectResponse("/log/", status_code=308)

    async def log_page(self, request: Request) -> Response:
        """The read-only audit page (cloister.relay.log_page): public data only."""
        writer = self.state.writer
        published = writer.store.published_size
        first = max(0, published - RECENT_ENTRIES)
        entries = await writer.read_entries(first, published) if published else []
        info, ws = self.state.health_info, self.state.witness_state
        html = render_log_page(
            note=writer.published_checkpoint(),
            entries=entries,
            first_index=first,
            sizes={
                "durable": writer.persisted_size,
                "published": published,
                "witnessed": ws.witnessed_size if ws is not None and ws.required else None,
            },
            policy={"version": info.policy_version, "sha256": info.policy_sha256.hex()} if info else None,
            log_vkey=info.log_verifier_key if info else "",
            base="/log/",
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP})

    async def attestation(self, request: Request) -> Response:
        return await self._attestation(request, with_checkpoint=False)

    async def log_attestation(self, request: Request) -> Response:
        return await self._attestation(request, with_checkpoint=True)

    async def _attestation(self, request: Request, *, with_checkpoint: bool) -> Response:
        try:
            nonce = _nonce(request)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            resp = await self.state.enclave.attest(nonce, include_checkpoint=with_checkpoint)
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
        size = int(checkpoint.split(b"\n", 2)[1])
        if self.state.writer.persisted_size < size:
            synced = await self.state.enclave.sync(self.state.writer.persisted_size)
            await self.state.persist(synced.log)
        if self.state.writer.store.published_size < size:
            await self.state.writer.publish()

    async def log_object(self, request: Request) -> Response:
        path = request.path_params["path"]
        data = await self.state.writer.read_path(path)
        if data is None:
            return PlainTextResponse("not found\n", status_code=404)
        immutable = path.startswith("tile/") and ".p/" not in path
        headers = {"Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache"}
        media = "text/plain; charset=utf-8" if path == "checkpoint" else "application/octet-stream"
        return Response(data, media_type=media, headers=headers)

    async def cosigned_checkpoint(self, request: Request) -> Response:
        """The newest checkpoint the witnesses cosigned: the note with their cosignature lines appended."""
        note = self.witnessing.cosigned() if self.witnessing is not None else None
        if note is None:
            return PlainTextResponse("no cosigned checkpoint yet\n", status_code=404)
        return Response(note, media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def inclusion(self, request: Request) -> Response:
        writer = self.state.writer
        try:
            index = _query_index(request, "index")
            size = _query_index(request, "size", writer.store.published_size)
            proof = await writer.inclusion_proof(index, size)
        except ValueError as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        return JSONResponse({"index": index, "size": size, "proof": [_b64(h) for h in proof]})

    async def consistency(self, request: Request) -> Response:
        writer = self.state.writer
        try:
            old = _query_index(request, "from")
            new = _query_index(request, "to", writer.store.published_size)
            proof = await writer.consistency_proof(old, new)
        except ValueError as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        return JSONResponse({"from": old, "to": new, "proof": [_b64(h) for h in proof]})

    async def body(self, request: Request) -> Response:
        """A stored body, for auditors only: as stored (sealed bytes when encryption is on)."""
        refused = refuse_unless(request, AUDITOR, self.state.config.auditor_token, "reading bodies")
        if refused is not None:
            return refused
        ref = body_ref(request)
        if isinstance(ref, JSONResponse):
            return ref
        index, kind = ref
        rec = await self.state.writer.get_body_record(index, kind)
        headers = {"Cache-Control": "no-store"}
        if rec is None:
            return JSONResponse({"error": f"no {kind} body is kept for entry {index}"}, 404, headers=headers)
        if rec.data is None:
            return JSONResponse({"error": f"the {kind} body of entry {index} was redacted"}, 410, headers=headers)
        media = "application/octet-stream" if is_sealed(rec.data) else "application/json"
        return Response(rec.data, media_type=media, headers=headers)
