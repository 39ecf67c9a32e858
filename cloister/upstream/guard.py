"""Grant verification for upstream MCP servers built on the official SDK.

An upstream that wants protection from a relay that skips the enclave adds one middleware:

    from cloister.upstream.guard import GrantGuard
    from cloister.verify.attestation import TrustRoot

    guard = GrantGuard("refunds", trust_root=TrustRoot.aws(), expected_pcrs={0: bytes.fromhex(PCR0)})
    mcp = MCPServer("refunds", middleware=[guard])

Every `tools/call` must then carry, in `params._meta`, a grant signed by an enclave whose
attestation document (also in `_meta`) verifies against the trust root and the expected
PCRs. The grant must name this server, this tool, exactly these arguments and exactly the x402
payment the call carries (or none), and this upstream instance; it must be unexpired, and it is
honoured once per nonce store. Anything else is refused with JSON-RPC error GRANT_REFUSED.

An attested server also signs what it answers (docs/decisions/0017-signed-outcomes.md):
`serve_attestation(mcp, nsm, guard=guard)` makes a response key, binds it in the server's
attestation and hands it to the guard, which then signs every tools/call result it let through
over the grant's nonce and the result's hash (`cloister.verify.response_sig`), in the result's
`_meta`. The enclave checks that signature when it logs the call's outcome.

What single use means, exactly:

- `instance`: the id the policy bundle gives this upstream (`instance = "..."` under its
  `[servers.<name>]`). The enclave writes it into every grant for the server (`aud`), taken from
  the bundle, never from the relay; a guard with `instance="refunds-eu-1"` refuses grants for any
  other instance, and a guard without one refuses grants bound to an instance. Two instances
  with different ids can therefore never both honour one grant.
- `nonces`: where redeemed grant nonces are kept until the grants expire (the bundle's
  `grant_ttl_s`, 60 s by default, at most 1 h). A grant is honoured once per store. The default
  is this process's memory (`MemoryNonceStore`): replicas that share an instance id, or a
  restarted process, each have their own and could each accept a grant once within its
  lifetime. Give them one shared store: `FileNonceStore(dir)` for processes on one host (a
  restart included), or your own `NonceStore` over a database all replicas share.

Grants only from witnessed keys (decision 0015): with `witnessed_log=WitnessedLogPolicy.from_vkeys(
origin, log_vkey, witness_vkeys, quorum)` the guard also requires, in `_meta["dev.cloister/key-evidence"]`,
proof that the grant's key was introduced in the log (a key entry and its inclusion proof) at a
checkpoint signed by the pinned log key and cosigned by a quorum of the pinned witnesses
(`cloister.verify.key_evidence`); the relay attaches it. A shadow enclave of the same image, on a
copy of the log, has no such proof. Verified evidence is cached per evidence (64 most recent).
With `witnessed_decisions=True` as well, a call is accepted only once its decision entry is in a
checkpoint the witnesses cosigned (`_meta["dev.cloister/decision-evidence"]`; the relay waits for
it when the upstream is configured with `wait_for_witness = true`): no rollback can then erase a
call this server ran.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError

from cloister.verify.attestation import DOCUMENT_TIME, AttestationPolicy, TrustRoot
from cloister.verify.enclave_identity import verify_enclave
from cloister.verify.entries import bounded
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.grant import (
    ATTESTATION_META_KEY,
    GRANT_META_KEY,
    GRANT_NAME_BOUND,
    GrantClaims,
    GrantError,
    MemoryNonceStore,
    NonceStore,
    ReplayGuard,
    grant_key_id,
    verify_grant,
)
from cloister.verify.key_evidence import (
    DECISION_EVIDENCE_META_KEY,
    KEY_EVIDENCE_META_KEY,
    WitnessedLogPolicy,
    verify_decision_evidence,
    verify_key_evidence,
)
from cloister.verify.response_sig import RESPONSE_SIG_META_KEY, result_sha256, sign_response, without_signature
from cloister.verify.x402 import X402_META_KEY

__all__ = ["GRANT_REFUSED", "FileNonceStore", "GrantGuard", "MemoryNonceStore", "NonceStore", "WitnessedLogPolicy"]

log = logging.getLogger("cloister.upstream.guard")
GRANT_REFUSED = -32010
# Resources under this prefix are the server's attestation (cloister.upstream.attested_server),
# read by the relay with the enclave's challenge nonce: they need no grant.
ATTESTATION_URI_PREFIX = "cloister://attestation/"
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
        instance: str = "",
        nonces: NonceStore | None = None,
        clock: Callable[[], datetime] = _utcnow,
        witnessed_log: WitnessedLogPolicy | None = None,
        witnessed_decisions: bool = False,
    ) -> None:
        if witnessed_decisions and witnessed_log is None:
            raise ValueError("witnessed_decisions needs witnessed_log (the log and the witnesses to pin)")
        self.server = server
        self.witnessed_log = witnessed_log
        self.witnessed_decisions = witnessed_decisions
        self._witnessed: OrderedDict[bytes, bytes] = OrderedDict()  # evidence digest -> grant key id
        self.instance = instance
        self.trust_root = trust_root
        self.expected_pcrs = dict(expected_pcrs or {})
        self.allow_debug = allow_debug
        self.max_attestation_age = max_attestation_age
        self.origin = origin
        self._clock = clock
        self._replay = ReplayGuard(nonces if nonces is not None else MemoryNonceStore())
        self._keys: OrderedDict[bytes, tuple[dict[bytes, ed25519.Ed25519PublicKey], datetime]] = OrderedDict()
        self._lock = threading.Lock()
        self._response_key: ed25519.Ed25519PrivateKey | None = None

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        params = dict(ctx.params or {})
        if ctx.method == "resources/read" and str(params.get("uri", "")).startswith(ATTESTATION_URI_PREFIX):
            # The attestation a relay reads with the enclave's challenge (attested_server): how the
            # server proves itself before any grant exists; it grants nothing and is not a call.
            return await call_next(ctx)
        if ctx.method in ("resources/read", "prompts/get"):
            # Reads and prompts are decided and granted too (decision 0018): the grant names the
            # request as the enclave recorded it ("resources/read:<uri>", "prompts/get:<name>").
            self.check_request(ctx.method, params)
            return await call_next(ctx)
        if ctx.method != "tools/call":
            return await call_next(ctx)
        claims = self.check(params)
        return self.sign(await call_next(ctx), claims)

    def check_request(self, method: str, params: Mapping[str, Any]) -> GrantClaims:
        """Verify the grant of a resources/read or prompts/get, or raise MCPError(GRANT_REFUSED).

        The enclave decided exactly what the relay asked (its arguments `{"uri"}`, or `{"name",
        "arguments"}`) under the name `<method>:<uri or prompt>`; the same checks as a tool call."""
        if method == "resources/read":
            subject, arguments = params.get("uri"), {"uri": params.get("uri")}
        else:
            subject, arguments = params.get("name"), {"name": params.get("name"), "arguments": params.get("arguments")}
        name = bounded(f"{method}:{subject}", GRANT_NAME_BOUND) if isinstance(subject, str) else None
        return self.check({"name": name, "arguments": arguments, "_meta": params.get("_meta")})

    # ---- response signatures (decision 0017) -------------------------------------------------

    def sign_responses(self, key: ed25519.Ed25519PrivateKey) -> None:
        """Sign every tools/call result from now on with `key` (the one the attestation binds)."""
        self._response_key = key

    def sign(self, result: HandlerResult, claims: GrantClaims) -> HandlerResult:
        """The result with this server's signature over the grant's nonce and the result's hash in
        its `_meta` (unchanged without a response key). A signature the tool itself put there is
        replaced: only the guard signs, and only for a grant it verified."""
        key = self._response_key
        if key is None:
            return result
        if result is None or isinstance(result, dict):
            value = without_signature(result or {})
        else:  # a typed result (a middleware inside this one returned a model): its wire form
            value = without_signature(result.model_dump(by_alias=True, mode="json", exclude_none=True))
        sig = sign_response(key, claims.nonce, result_sha256(value))
        meta = value.get("_meta")
        value["_meta"] = {
            **(meta if isinstance(meta, Mapping) else {}),
            RESPONSE_SIG_META_KEY: base64.b64encode(sig).decode(),
        }
        return value

    def check(self, params: Mapping[str, Any]) -> GrantClaims:
        """Verify the grant carried by a tools/call's params (its claims), or raise MCPError(GRANT_REFUSED)."""
        now = self._clock()
        meta = params.get("_meta") or {}
        name = params.get("name")
        try:
            if not isinstance(meta, Mapping) or not isinstance(name, str):
                raise GrantError("malformed", "tools/call params are malformed")
            grant = _b64_field(meta, GRANT_META_KEY)
            document = _b64_field(meta, ATTESTATION_META_KEY)
            keys = self._enclave_keys(document, now)
            if self.witnessed_log is not None:
                keys = self._witnessed_keys(meta, keys, self.witnessed_log)
            claims = verify_grant(
                grant,
                grant_keys=keys,
                server=self.server,
                tool=name,
                arguments=params.get("arguments"),
                now_ms=int(now.timestamp() * 1000),
                audience=self.instance,
                payment=meta.get(X402_META_KEY),
            )
            if self.origin is not None and claims.origin != self.origin:
                raise GrantError("wrong-log", f"grant was logged in {claims.origin!r}, not {self.origin!r}")
            if self.witnessed_decisions and self.witnessed_log is not None:
                _check_witnessed_decision(meta, claims, self.witnessed_log)
            self._replay.use(claims, int(now.timestamp() * 1000))
        except GrantError as exc:
            log.warning("refused tools/call %r: %s: %s", name, exc.reason, exc)
            raise MCPError(GRANT_REFUSED, f"grant refused ({exc.reason}): {exc}", data={"reason": exc.reason}) from exc
        log.info("accepted tools/call %r: grant for log entry %d, agent %r", name, claims.log_index, claims.agent)
        return claims

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

    def _witnessed_keys(
        self, meta: Mapping[str, Any], keys: dict[bytes, ed25519.Ed25519PublicKey], policy: WitnessedLogPolicy
    ) -> dict[bytes, ed25519.Ed25519PublicKey]:
        """Of the attested grant keys, the one the witnessed log introduced (decision 0015): a shadow
        enclave's key, never cosigned by the pinned witnesses, is refused."""
        text = meta.get(KEY_EVIDENCE_META_KEY)
        if text is None:
            raise GrantError(
                "unwitnessed",
                f"no {KEY_EVIDENCE_META_KEY!r} in _meta: this server accepts grants only from enclave keys "
                "introduced in the log at a checkpoint its pinned witnesses cosigned",
            )
        if not isinstance(text, str):
            raise GrantError("malformed", f"_meta {KEY_EVIDENCE_META_KEY!r} must be a JSON string")
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            kid = self._witnessed.get(digest)
        if kid is None:
            try:
                entry = verify_key_evidence(text, policy)
            except (DecodeError, VerificationError) as exc:
                raise GrantError("unwitnessed", f"the grant key's witness evidence does not verify: {exc}") from exc
            kid = grant_key_id(entry.grant_key)
            with self._lock:
                self._witnessed[digest] = kid
                while len(self._witnessed) > 64:
                    self._witnessed.popitem(last=False)
        key = keys.get(kid)
        if key is None:
            raise GrantError(
                "unwitnessed", "the grant key the witnessed log introduced is not the attested enclave's grant key"
            )
        return {kid: key}


def _check_witnessed_decision(meta: Mapping[str, Any], claims: GrantClaims, policy: WitnessedLogPolicy) -> None:
    """The wait-for-witness mode: the grant's decision entry must already be in a checkpoint a
    quorum of the pinned witnesses cosigned, so no rollback can erase it."""
    text = meta.get(DECISION_EVIDENCE_META_KEY)
    if not isinstance(text, str):
        raise GrantError(
            "unwitnessed-decision",
            f"no {DECISION_EVIDENCE_META_KEY!r} string in _meta: this server accepts a call only once the "
            "witnesses have cosigned its decision (configure the relay's upstream with wait_for_witness = true)",
        )
    try:
        verify_decision_evidence(text, policy, index=claims.log_index, entry_hash=claims.entry_hash)
    except (DecodeError, VerificationError) as exc:
        raise GrantError("unwitnessed-decision", f"the decision's witness evidence does not verify: {exc}") from exc


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


class FileNonceStore:
    """Redeemed nonces as files in one directory: single use across the processes of one host
    that share the directory (replicas, and a process restarted on the same disk).

    Redeeming creates `<dir>/<nonce hex>` with O_CREAT | O_EXCL, which is atomic: of any number
    of processes redeeming one nonce, exactly one creates the file. The file holds the grant's
    expiry; files expired for longer than `keep_ms` (slack for clocks that differ between the
    processes) are deleted at most once per `sweep_every_ms` of the caller's clock. Any error
    other than "already exists" refuses the grant (fail closed). Keep the directory on a local
    file system: exclusive creation is not atomic on every network file system.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, sweep_every_ms: int = 10_000, keep_ms: int = 60_000
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sweep_every_ms = sweep_every_ms
        self._keep_ms = keep_ms
        self._next_sweep_ms = 0
        self._lock = threading.Lock()

    def redeem(self, nonce: bytes, expires_ms: int, now_ms: int) -> bool:
        self._sweep(now_ms)
        path = self.directory / nonce.hex()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        except OSError as exc:
            raise GrantError("replay-store-unavailable", f"cannot record the grant's nonce: {exc}") from exc
        try:
            os.write(fd, str(expires_ms).encode())
            os.fsync(fd)
        except OSError as exc:
            # The nonce is recorded (the file exists) even if its expiry is not: it is then kept
            # until a sweep finds it unreadable and old, never forgotten early.
            raise GrantError("replay-store-unavailable", f"cannot record the grant's expiry: {exc}") from exc
        finally:
            os.close(fd)
        return True

    def _sweep(self, now_ms: int) -> None:
        with self._lock:
            if now_ms < self._next_sweep_ms:
                return
            self._next_sweep_ms = now_ms + self._sweep_every_ms
        try:
            paths = list(self.directory.iterdir())
        except OSError as exc:
            raise GrantError("replay-store-unavailable", f"cannot read the redeemed nonces: {exc}") from exc
        for path in paths:
            try:
                expires_ms = int(path.read_bytes()[:20])
            except (OSError, ValueError):
                continue  # being written (empty), or unreadable: kept
            if expires_ms + self._keep_ms <= now_ms:
                try:
                    path.unlink()
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        log.warning("could not delete the expired nonce %s: %s", path.name, exc)
