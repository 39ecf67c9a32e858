"""The relay's admin HTTP API: push a policy bundle (only the enclave decides whether it takes
effect), list an upstream's tool-definition hashes to pin, and redact a stored body.

Every route needs the admin token (`admin_token_file`; `cloister.relay.auth`), and all are
disabled without one. The enclave still judges every bundle by its signature: the token is
defence in depth, so that anyone who can reach the relay cannot push, list servers' tools
that policy hides from them, or destroy bodies."""

from __future__ import annotations

import logging

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cloister.relay.auth import ADMIN, refuse_unless
from cloister.relay.enclave_client import EnclaveRefused, EnclaveUnavailable
from cloister.relay.lifecycle import POLICY_NOT_NEWER, bundle_store
from cloister.relay.log_api import body_ref
from cloister.relay.state import RelayState
from cloister.relay.upstreams import Upstreams

log = logging.getLogger("cloister.relay")

MAX_BUNDLE_UPLOAD = 9 << 20
# The enclave's refusals of a bundle that answer 409 Conflict (the rest are 400).
_CONFLICTS = (grpc.StatusCode.FAILED_PRECONDITION, POLICY_NOT_NEWER)


class Admin:
    def __init__(self, state: RelayState, upstreams: Upstreams) -> None:
        self.state = state
        self.upstreams = upstreams

    def routes(self) -> list[Route]:
        return [
            Route("/admin/policy", self.push_policy, methods=["POST"]),
            Route("/admin/pins", self.tool_pins),
            Route("/admin/redact/{index}/{kind}", self.redact, methods=["POST"]),
        ]

    def _refuse(self, request: Request, what: str) -> JSONResponse | None:
        return refuse_unless(request, ADMIN, self.state.config.admin_token, what)

    async def push_policy(self, request: Request) -> Response:
        """Forward an admin-signed bundle to the enclave, for holders of the admin token. The enclave
        decides: it accepts only bundles signed by an admin key pinned in its measured image."""
        if (refused := self._refuse(request, "pushing a policy bundle")) is not None:
            return refused
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BUNDLE_UPLOAD:
                return JSONResponse({"error": f"bundle larger than {MAX_BUNDLE_UPLOAD} bytes"}, status_code=413)
        try:
            resp = await self.state.enclave.load_policy(body, self.state.writer.persisted_size)
            await self.state.persist(resp.log)
        except EnclaveUnavailable as exc:
            return JSONResponse({"error": f"the enclave is unavailable: {exc}"}, status_code=503)
        except EnclaveRefused as exc:
            status = 409 if exc.code in _CONFLICTS else 400
            return JSONResponse({"error": f"the enclave refused the bundle: {exc}"}, status_code=status)
        (bundle_store(self.state.config) / f"v{resp.version}.signed").write_bytes(body)
        self.state.health_info = await self.state.enclave.health()
        log.info("policy bundle version %d pushed and in force", resp.version)
        return JSONResponse({"version": resp.version, "bundle_sha256": resp.bundle_sha256.hex()})

    async def tool_pins(self, request: Request) -> Response:
        """The current definition hash of each tool of an upstream, to paste into a bundle as pins.

        Computed by this (untrusted) relay from what the upstream lists now: review the tools
        before pinning them. The enclave recomputes the hashes itself when it checks pins."""
        from cloister.verify.tools import tool_definition_hash

        if (refused := self._refuse(request, "listing tool pins")) is not None:
            return refused
        name = request.query_params.get("server", "")
        upstream = self.upstreams.by_name.get(name)
        if upstream is None:
            return JSONResponse(
                {"error": f"no upstream named {name!r}; known: {sorted(self.upstreams.by_name)}"}, status_code=404
            )
        if upstream.state != "up":
            return JSONResponse(
                {"error": f"upstream {name!r} is {upstream.state}: {upstream.last_error}"}, status_code=503
            )
        pins = {
            t.name: tool_definition_hash(t.model_dump(mode="json", by_alias=True, exclude_none=True))
            for t in upstream.tools
        }
        return JSONResponse({"server": name, "pins": pins})

    async def redact(self, request: Request) -> Response:
        """Replace a stored body by a tombstone that keeps its SHA-256: the log entry's commitment
        still checks, the content is gone. The log itself is never changed."""
        if (refused := self._refuse(request, "redaction")) is not None:
            return refused
        ref = body_ref(request)
        if isinstance(ref, JSONResponse):
            return ref
        index, kind = ref
        try:
            await self.state.writer.redact_body(index, kind)
        except KeyError as exc:
            return JSONResponse({"error": str(exc).strip("'\"")}, status_code=404)
        log.warning("redacted the %s body of log entry %d", kind, index)
        return JSONResponse({"index": index, "kind": kind, "redacted": True})
