"""MCP authorization for agents (the MCP spec's "Authorization", docs/decisions/0019):

- RFC 9728 protected-resource metadata at `/.well-known/oauth-protected-resource` and its
  path-suffixed form `/.well-known/oauth-protected-resource/mcp`: the `/mcp` URL as `resource`
  (the audience tokens must name, RFC 8707) and the authorization servers agents sign in with.
- `TokenGate`, in front of `/mcp`: a request without a bearer token, or whose token the enclave
  refuses, gets HTTP 401 with `WWW-Authenticate: Bearer resource_metadata="..."` (RFC 6750 §3,
  RFC 9728 §5.1) before any MCP session exists, so an OAuth client knows to (re)authenticate.

The relay judges no token. It asks the enclave (`FilterTools` with no candidates: the enclave
verifies the token as for any listing and lists nothing) and keeps a positive answer briefly;
the enclave verifies the token again on every listing and call, so the cache only decides
whether a 401 is sent early, never what an agent may do. A refusal is never cached.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cloister.relay.codes import ENCLAVE_UNAVAILABLE, FROM_CLOISTER, SOURCE, UNAUTHENTICATED
from cloister.relay.enclave_client import EnclaveClient, EnclaveRefused, EnclaveUnavailable
from cloister.verify.bundle import unsigned_files
from cloister.verify.jwt import MAX_TOKEN_BYTES

log = logging.getLogger("cloister.relay.oauth")

METADATA_PATH: Final = "/.well-known/oauth-protected-resource"
MCP_PATH: Final = "/mcp"
CACHE_TTL_S: Final = 30.0  # how long a positive answer spares the enclave a round trip
CACHE_SIZE: Final = 4096
MAX_AUTHORIZATION_SERVERS: Final = 16

# The error_description of a 401 per the enclave's refusal class (cloister.verify.jwt.TokenError
# and cloister.enclave.decide): fixed ASCII without quotes (RFC 6750 §3), never the parser's words.
_DESCRIPTIONS: Final = {
    "missing": "no bearer token",
    "malformed": "the token is not a well-formed JWT",
    "bad-signature": "the token signature does not verify with the issuer keys pinned in the policy bundle",
    "unknown-key": "the token is signed by a key the policy bundle does not pin for its issuer",
    "unknown-issuer": "the token issuer is not trusted by the policy bundle",
    "wrong-issuer": "the token issuer is not trusted by the policy bundle",
    "wrong-audience": "the token audience is not this resource",
    "expired": "the token has expired",
    "not-yet-valid": "the token is not valid yet",
    "too-long-lived": "the token lives longer than its issuer allows",
    "unknown-agent": "the token subject is not an agent of the policy bundle",
    "issuer-not-bound": "the token issuer may not sign in this agent",
    "role-not-granted": "the token asks for a role the policy bundle does not grant this agent",
}


@dataclass(frozen=True)
class ResourceMetadata:
    """What the relay says about itself as an OAuth protected resource (RFC 9728 §2)."""

    resource: str  # the /mcp URL: the audience of agents' tokens (RFC 8707)
    authorization_servers: tuple[str, ...]
    scopes: tuple[str, ...] = ()

    @property
    def metadata_url(self) -> str:
        """The path-suffixed metadata URL for `resource` (RFC 9728 §3.1)."""
        scheme, _, rest = self.resource.partition("://")
        host, slash, path = rest.partition("/")
        return f"{scheme}://{host}{METADATA_PATH}{slash}{path}".rstrip("/")

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "resource": self.resource,
            "authorization_servers": list(self.authorization_servers),
            "bearer_methods_supported": ["header"],
            "resource_name": "Cloister",
        }
        if self.scopes:
            doc["scopes_supported"] = list(self.scopes)
        return doc

    def challenge(self, error: str = "", description: str = "") -> str:
        """A WWW-Authenticate value (RFC 6750 §3): no error code when no token was sent (§3.1)."""
        parts = [f'resource_metadata="{self.metadata_url}"']
        if self.scopes:
            parts.append(f'scope="{" ".join(self.scopes)}"')
        if error:
            parts.append(f'error="{error}"')
        if description:
            parts.append(f'error_description="{description}"')
        return "Bearer " + ", ".join(parts)


def issuer_urls(bundle: bytes | None) -> tuple[str, ...]:
    """The bundle's issuers that are URLs (OIDC/OAuth issuers), as authorization servers. The
    relay reads its own copy of the bundle for this: the metadata only says where to sign in; the
    enclave decides which issuers it trusts, from the bundle it verified."""
    if bundle is None:
        return ()
    try:
        raw = tomllib.loads(unsigned_files(bundle).get("issuers.toml", b"").decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("cannot read the bundle's issuers for the OAuth metadata: %s", exc)
        return ()
    tables = raw.get("issuers")
    out: list[str] = []
    for label, table in tables.items() if isinstance(tables, dict) else ():
        iss = table.get("issuer", label) if isinstance(table, dict) else None
        if isinstance(iss, str) and iss.startswith(("https://", "http://")) and iss not in out:
            out.append(iss)
    return tuple(out[:MAX_AUTHORIZATION_SERVERS])


Settings = Callable[[], tuple[ResourceMetadata, bool]]  # the metadata, and whether the door asks the enclave
REFRESH_S: Final = 5.0


class BundleSettings:
    """The metadata and the door's mode, following the newest bundle the relay holds: a pushed
    bundle that adds a URL issuer turns sign-in on without a restart. Looked at most every
    REFRESH_S, and read again only when `stamp` (file sizes and times) changed."""

    def __init__(
        self,
        resource: str,
        configured_servers: tuple[str, ...] | None,
        scopes: tuple[str, ...],
        gate: bool | None,
        *,
        bundle: Callable[[], bytes | None],
        stamp: Callable[[], object],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resource, self._scopes = resource, scopes
        self._configured = configured_servers
        self._gate = gate
        self._bundle, self._stamp, self._clock = bundle, stamp, clock
        self._seen: object = object()
        self._checked_at = float("-inf")
        self._current = self._make(configured_servers or ())

    def _make(self, servers: tuple[str, ...]) -> ResourceMetadata:
        return ResourceMetadata(resource=self._resource, authorization_servers=servers, scopes=self._scopes)

    def __call__(self) -> tuple[ResourceMetadata, bool]:
        now = self._clock()
        if self._configured is None and now - self._checked_at >= REFRESH_S:
            self._checked_at = now
            stamp = self._stamp()
            if stamp != self._seen:
                self._seen = stamp
                self._current = self._make(issuer_urls(self._bundle()))
        meta = self._current
        return meta, self._gate if self._gate is not None else bool(meta.authorization_servers)


def metadata_routes(settings: Settings) -> list[Route]:
    async def metadata(request: Request) -> Response:
        # Any origin may read it: browser-based MCP clients discover sign-in from it.
        return JSONResponse(
            settings()[0].document(), headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "max-age=60"}
        )

    return [
        Route(METADATA_PATH, metadata, methods=["GET"]),
        Route(METADATA_PATH + MCP_PATH, metadata, methods=["GET"]),
    ]


def bearer_token(scope: Scope) -> str | None:
    """The request's bearer token (RFC 6750 §2.1), "" when the header is not a bearer one, None when absent."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _expiry(token: str) -> int | None:
    """The token's `exp`, read after the enclave accepted it (the enclave checked these bytes'
    signature), only to stop caching the answer when the token expires."""
    try:
        part = token.split(".")[1]
        exp = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))).get("exp")
    except (IndexError, ValueError, AttributeError):
        return None
    return exp if isinstance(exp, int) and not isinstance(exp, bool) else None


class Refusal(Exception):
    """The token is refused: `reason` is the enclave's refusal class."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class TokenCheck:
    """Asks the enclave whether a token names an agent, remembering a yes for at most
    CACHE_TTL_S and never past the token's `exp` (bounded, oldest out)."""

    def __init__(self, enclave: EnclaveClient, *, clock: Callable[[], float] = time.time) -> None:
        self.enclave = enclave
        self.clock = clock
        self._accepted: OrderedDict[bytes, float] = OrderedDict()  # SHA-256(token) -> valid until

    async def check(self, token: str) -> None:
        """Return when the enclave accepts the token; Refusal when it refuses it;
        EnclaveUnavailable/EnclaveRefused when it cannot say."""
        if not token:
            raise Refusal("missing", "no bearer token")
        if len(token) > MAX_TOKEN_BYTES:  # the enclave refuses these too; no need to send them
            raise Refusal("malformed", f"token is longer than {MAX_TOKEN_BYTES} bytes")
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        now = self.clock()
        until = self._accepted.get(key)
        if until is not None and now < until:
            return
        self._accepted.pop(key, None)
        try:
            await self.enclave.filter_tools(token, [])
        except EnclaveRefused as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:  # a token the enclave cannot even read
                raise Refusal("malformed", str(exc)) from exc
            if exc.code != grpc.StatusCode.UNAUTHENTICATED:
                raise
            reason, _, detail = str(exc).partition(": ")
            raise Refusal(reason, detail or reason) from exc
        exp = _expiry(token)
        if exp is not None and now < exp:
            self._accepted[key] = min(now + CACHE_TTL_S, float(exp))
            if len(self._accepted) > CACHE_SIZE:
                self._accepted.popitem(last=False)


def _error_body(code: int, message: str, **data: Any) -> dict[str, Any]:
    error = {"code": code, "message": message, "data": {SOURCE: FROM_CLOISTER, **data}}
    return {"jsonrpc": "2.0", "id": None, "error": error}


class TokenGate:
    """HTTP 401 for MCP requests whose bearer token is missing or refused by the enclave, before
    any MCP processing. When the settings say not to ask the enclave, only a missing token is
    refused here (the enclave then refuses a bad one per call, logged as an anonymous denial,
    decision 0009)."""

    def __init__(self, app: ASGIApp, settings: Settings, check: TokenCheck | None) -> None:
        self.app = app
        self.settings = settings
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != MCP_PATH or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        meta, ask_enclave = self.settings()
        response = await self._refusal(bearer_token(scope), meta, self.check if ask_enclave else None)
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _refusal(self, token: str | None, meta: ResourceMetadata, check: TokenCheck | None) -> Response | None:
        if not token:
            where = (
                f"sign in with an authorization server named in {meta.metadata_url}"
                if meta.authorization_servers
                else "cloister token issue ... mints a development token"
            )
            return _unauthorized(
                meta,
                f"unauthenticated: send 'Authorization: Bearer <JWT>' ({where})",
                error="" if token is None else "invalid_request",
                description="" if token is None else "the Authorization header is not a bearer token",
            )
        if check is None:
            return None
        try:
            await check.check(token)
        except Refusal as exc:
            # Only the enclave's known classes are repeated: nothing else reaches the client's screen.
            reason = exc.reason if exc.reason in _DESCRIPTIONS else "refused"
            description = _DESCRIPTIONS.get(reason, "the token was refused")
            return _unauthorized(
                meta,
                f"unauthenticated: {description} ({reason}); sign in again",
                error="invalid_token",
                description=description,
                reason=reason,
            )
        except (EnclaveUnavailable, EnclaveRefused) as exc:
            # Fail closed: no answer from the enclave lets no request through.
            log.warning("cannot check a token with the enclave: %s", exc)
            return JSONResponse(
                _error_body(ENCLAVE_UNAVAILABLE, "the enclave is unavailable: cannot check the token; retry later"),
                status_code=503,
                headers={"Retry-After": "2", "Cache-Control": "no-store"},
            )
        return None


def _unauthorized(meta: ResourceMetadata, message: str, *, error: str, description: str, reason: str = "") -> Response:
    data = {"reason": reason} if reason else {}
    return JSONResponse(
        _error_body(UNAUTHENTICATED, message, **data),
        status_code=401,
        headers={"WWW-Authenticate": meta.challenge(error, description), "Cache-Control": "no-store"},
    )
