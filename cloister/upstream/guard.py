"""Grant verification for upstream MCP servers built on the official SDK.

An upstream that wants protection from a relay that skips the enclave adds one middleware:

    from cloister.upstream.guard import GrantGuard
    from cloister.verify.attestation import TrustRoot

    guard = GrantGuard("refunds", trust_root=TrustRoot.aws(), expected_pcrs={0: bytes.fromhex(PCR0)})
    mcp = MCPServer("refunds", middleware=[guard])

Every `tools/call` must then carry, in `params._meta`, a grant signed by an enclave whose
attestation document (also in `_meta`) verifies against the trust root and the expected
PCRs. The grant must name this server, this tool and exactly these arguments, be unexpired,
and is honoured once. Anything else is refused with JSON-RPC error GRANT_REFUSED.

"Once" is per guard: the used nonces live in this process until the grants expire (the bundle's
`grant_ttl_s`, 60 s by default). A server that restarts, or runs several replicas, within that
window should share the nonces (subclass ReplayGuard over a shared store) or keep the TTL short.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError

from cloister.verify.attestation import DOCUMENT_TIME, AttestationPolicy, TrustRoot
from cloister.verify.enclave_identity import verify_enclave
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.grant import (
    ATTESTATION_META_KEY,
    GRANT_META_KEY,
    GrantError,
    ReplayGuard,
    verify_grant,
)

log = logging.getLogger("cloister.upstream.guard")
GRANT_REFUSED = -32010
MAX_META_B64 = 64 * 1024


def _utcnow() -> datetime:
    return datetime.now(UTC)


class GrantGuard:
    """`ServerMiddleware` that refuses any tools/call without a valid, single-use enclave grant."""

    def __init__(
        self,
        server: str,
        *,
        trust_root: TrustRoot,
        expected_pcrs: Mapping[int, bytes] | None = None,
        allow_debug: bool = False,
        max_attestation_age: timedelta = timedelta(hours=24),
        origin: str | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.server = server
        self.trust_root = trust_root
        self.expected_pcrs = dict(expected_pcrs or {})
        self.allow_debug = allow_debug
        self.max_attestation_age = max_attestation_age
        self.origin = origin
        self._clock = clock
        self._replay = ReplayGuard()
        self._keys: OrderedDict[bytes, tuple[dict[bytes, ed25519.Ed25519PublicKey], datetime]] = OrderedDict()
        self._lock = threading.Lock()

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == "tools/call":
            self.check(dict(ctx.params or {}))
        return await call_next(ctx)

    def check(self, params: Mapping[str, Any]) -> None:
        """Verify the grant carried by a tools/call's params, or raise MCPError(GRANT_REFUSED)."""
        now = self._clock()
        meta = params.get("_meta") or {}
        name = params.get("name")
        try:
            if not isinstance(meta, Mapping) or not isinstance(name, str):
                raise GrantError("malformed", "tools/call params are malformed")
            grant = _b64_field(meta, GRANT_META_KEY)
            document = _b64_field(meta, ATTESTATION_META_KEY)
            keys = self._enclave_keys(document, now)
            claims = verify_grant(
                grant,
                grant_keys=keys,
                server=self.server,
                tool=name,
                arguments=params.get("arguments"),
                now_ms=int(now.timestamp() * 1000),
            )
            if self.origin is not None and claims.origin != self.origin:
                raise GrantError("wrong-log", f"grant was logged in {claims.origin!r}, not {self.origin!r}")
            self._replay.use(claims, int(now.timestamp() * 1000))
        except GrantError as exc:
            log.warning("refused tools/call %r: %s: %s", name, exc.reason, exc)
            raise MCPError(GRANT_REFUSED, f"grant refused ({exc.reason}): {exc}", data={"reason": exc.reason}) from exc
        log.info("accepted tools/call %r: grant for log entry %d, agent %r", name, claims.log_index, claims.agent)

    def _enclave_keys(self, document: bytes, now: datetime) -> dict[bytes, ed25519.Ed25519PublicKey]:
        digest = hashlib.sha256(document).digest()
        with self._lock:
            cached = self._keys.get(digest)
            if cached is not None and now - cached[1] < timedelta(minutes=10):
                return cached[0]
        policy = AttestationPolicy(
            root=self.trust_root,
            at=DOCUMENT_TIME,
            now=now,
            max_age=self.max_attestation_age,
            expected_pcrs=self.expected_pcrs,
            allow_debug=self.allow_debug,
        )
        try:
            verified = verify_enclave(document, policy, origin=self.origin)
        except (DecodeError, VerificationError) as exc:
            raise GrantError("untrusted-enclave", f"the enclave's attestation does not verify: {exc}") from exc
        keys = verified.binding.grant_keys()
        with self._lock:
            self._keys[digest] = (keys, now)
            while len(self._keys) > 64:
                self._keys.popitem(last=False)
        return keys


def _b64_field(meta: Mapping[str, Any], key: str) -> bytes:
    value = meta.get(key)
    if value is None:
        raise GrantError(
            "missing", f"no {key!r} in _meta: this server only accepts calls authorised by a Cloister enclave"
        )
    if not isinstance(value, str) or len(value) > MAX_META_B64:
        raise GrantError("malformed", f"_meta {key!r} must be a base64 string of at most {MAX_META_B64} chars")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GrantError("malformed", f"_meta {key!r} is not valid base64") from exc
