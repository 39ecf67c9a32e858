"""Upstream servers' proven identities and tool pins: the enclave's view, kept across bundles.

A server whose bundle entry requires an identity (nitro, checksum, tls) is quarantined until
evidence for it verifies, and again when that verification is older than `reattest_s`: its
tools are hidden from discovery and every call is denied with the reason. A pinned tool whose
current definition differs from its pin (or is missing, or was never reported) is hidden and
denied the same way.

What is logged: every *change* of a server's identity (its kind, status and verified detail, as
the last entry for it recorded them) and of its pins' drift. A verification identical to the
one logged, of a server that has stayed verified since, only refreshes the proof's time: it
appends nothing, however often the relay reports it. Every change that lets agents reach more
(a server verified again, a pin restored) is logged before it takes effect.

The relay is untrusted, so the enclave bounds this itself: at most `MAX_LOGGING_REPORTS`
reports per server per minute (by the enclave's clock) append entries. Past that, changes that
restrict (a failure, a drift) still take effect, without an entry (the next entry for the
server counts them in `extra["unlogged"]`), and changes that widen wait: the server or tool
stays quarantined until a report can be logged.

No I/O here: the relay carries evidence in, `EnclaveCore` sequences the entries this returns.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cloister.enclave.bundle import Identity, ServerSpec
from cloister.enclave.server_identity import check_checksum, check_nitro, check_tls
from cloister.verify.attestation import AttestationPolicy, TrustRoot, verify_attestation
from cloister.verify.canonical import parse_json
from cloister.verify.entries import ServerEntry, bounded
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.response_sig import parse_upstream_binding
from cloister.verify.tools import tool_definition_hash

CHALLENGE_TTL_MS = 120_000
MAX_TOOLS_JSON = 4 << 20
MAX_TOOLS = 2000
MAX_LOGGING_REPORTS = 10  # per server, per BUDGET_WINDOW_MS of the enclave's clock
BUDGET_WINDOW_MS = 60_000


@dataclass
class _State:
    identity: Identity
    verified_ms: int | None = None
    detail: str = "not attested yet"
    challenge: tuple[bytes, int] | None = None  # nonce, expiry
    tool_hashes: dict[str, str] | None = None  # None until the relay reports the tool list
    input_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    drift: dict[str, str] = field(default_factory=dict)  # tool -> description of the drift
    logged: tuple[str, str, str] | None = None  # (kind, status, detail) of the last identity entry
    unlogged: int = 0  # restricting changes applied without an entry (budget spent) since the last one
    # The response key the verified nitro attestation bound (decision 0017); None otherwise.
    response_key: bytes | None = None


@dataclass(frozen=True)
class Report:
    status: str  # verified | failed | tools-only
    detail: str
    hidden: tuple[str, ...]
    entries: tuple[ServerEntry, ...]


class ServerRegistry:
    def __init__(self) -> None:
        self._states: dict[str, _State] = {}
        # When reports of each server appended entries, within the last BUDGET_WINDOW_MS. Kept by
        # name, apart from _State, so that a new bundle does not refill a server's budget.
        self._logging: dict[str, deque[int]] = {}

    def _state(self, spec: ServerSpec) -> _State:
        st = self._states.get(spec.name)
        if st is None or st.identity != spec.identity:
            # A new bundle that changes what a server must prove starts it over.
            st = _State(identity=spec.identity)
            self._states[spec.name] = st
        return st

    def challenge(self, spec: ServerSpec, now_ms: int, random: Callable[[int], bytes], *, reconnect: bool) -> bytes:
        nonce = random(32)
        st = self._state(spec)
        st.challenge = (nonce, now_ms + CHALLENGE_TTL_MS)
        if reconnect and st.verified_ms is not None:
            st.verified_ms, st.detail = None, "reconnected: waiting for new evidence"
        return nonce

    def level(self, spec: ServerSpec, now_ms: int) -> str:
        """The `attestation` attribute Cedar sees: the kind that verified, 'none', or 'unverified'."""
        if spec.identity.kind == "none":
            return "none"
        st = self._states.get(spec.name)
        if st is None or st.identity != spec.identity or not self._fresh(st, now_ms):
            return "unverified"
        return spec.identity.kind

    @staticmethod
    def _fresh(st: _State, now_ms: int) -> bool:
        return st.verified_ms is not None and now_ms - st.verified_ms <= st.identity.reattest_s * 1000

    def response_key(self, spec: ServerSpec) -> tuple[bool, bytes | None]:
        """Whether this server's responses must be signed (its identity is nitro), and the key its
        verified attestation bound: b"" if it bound none (no signature can verify), None if it is
        not verified now (unknown)."""
        if spec.identity.kind != "nitro":
            return False, None
        st = self._states.get(spec.name)
        if st is None or st.identity != spec.identity or st.verified_ms is None:
            return True, None
        return True, st.response_key or b""

    def refusal(self, spec: ServerSpec, tool: str, now_ms: int) -> str | None:
        """Why a call to this server/tool must be refused now, or None."""
        st = self._states.get(spec.name)
        if spec.identity.kind != "none":
            if st is None or st.identity != spec.identity or st.verified_ms is None:
                why = st.detail if st is not None and st.identity == spec.identity else "not attested yet"
                kind = spec.identity.kind
                return f"server {spec.name!r} is quarantined: it has not proven its {kind} identity ({why})"
            if not self._fresh(st, now_ms):
                return (
                    f"server {spec.name!r} is quarantined: its {spec.identity.kind} identity was last verified "
                    f"more than {spec.identity.reattest_s}s ago"
                )
        pin = spec.pins.get(tool)
        if pin is not None:
            if st is None or st.tool_hashes is None:
                return f"tool {tool!r} is pinned but the server's tool definitions have not been reported yet"
            if tool in st.drift:
                return f"tool {tool!r} is quarantined: {st.drift[tool]}"
        return None

    def report(
        self,
        spec: ServerSpec,
        *,
        now_ms: int,
        root: TrustRoot,
        allow_debug: bool,
        attestation: bytes,
        artifact: bytes,
        certificates: list[bytes],
        tools_json: bytes,
        failure: str,
        evidence: bool,
    ) -> Report:
        st = self._state(spec)
        room = self._room(spec.name, now_ms)
        entries: list[ServerEntry] = []
        status, detail = "tools-only", ""
        if evidence:
            status, detail, evidence_hash, key = self._verify(
                spec,
                st,
                now_ms=now_ms,
                root=root,
                allow_debug=allow_debug,
                attestation=attestation,
                artifact=artifact,
                certificates=certificates,
                failure=failure,
            )
            st.challenge = None
            status, detail, entry = self._apply_identity(
                spec, st, (status, detail, evidence_hash, key), now_ms, room=room
            )
            entries.extend(entry)
        if tools_json:
            entries.extend(self._tools(spec, st, tools_json, now_ms, room=room))
        if entries:
            self._logging[spec.name].append(now_ms)
        hidden = tuple(sorted(t for t in spec.tools if self.refusal(spec, t, now_ms)))
        return Report(status=status, detail=detail or st.detail, hidden=hidden, entries=tuple(entries))

    def _room(self, server: str, now_ms: int) -> bool:
        """Whether a report of `server` may append entries now (its budget is not spent)."""
        times = self._logging.setdefault(server, deque())
        while times and times[0] <= now_ms - BUDGET_WINDOW_MS:
            times.popleft()
        return len(times) < MAX_LOGGING_REPORTS

    @staticmethod
    def _verify(
        spec: ServerSpec,
        st: _State,
        *,
        now_ms: int,
        root: TrustRoot,
        allow_debug: bool,
        attestation: bytes,
        artifact: bytes,
        certificates: list[bytes],
        failure: str,
    ) -> tuple[str, str, bytes | None, bytes | None]:
        """Check the evidence: (status, detail, evidence hash, response key). Changes nothing."""
        kind = spec.identity.kind
        try:
            if failure:
                raise VerificationError(f"the relay could not obtain evidence: {bounded(failure, 300)}")
            if kind == "nitro":
                challenge = st.challenge
                if challenge is None or challenge[1] < now_ms:
                    raise VerificationError("no fresh challenge nonce was issued for this attestation")
                now = datetime.fromtimestamp(now_ms / 1000, UTC)
                policy = AttestationPolicy(
                    root=root,
                    at=now,
                    now=now,
                    expected_pcrs=spec.identity.pcrs,
                    nonce=challenge[0],
                    allow_debug=allow_debug,
                )
                detail, digest = check_nitro(attestation, policy)
                key, key_detail = _response_key(attestation, policy)
                return "verified", f"{detail}; {key_detail}", digest, key
            if kind == "checksum":
                return ("verified", *check_checksum(artifact, sha256_hex=spec.identity.sha256), None)
            if kind == "tls":
                return ("verified", *check_tls(certificates, spki_sha256_hex=spec.identity.spki_sha256), None)
            return "verified", "no identity required", None, None
        except (VerificationError, DecodeError) as exc:
            return "failed", bounded(str(exc), 1000), None, None

    @staticmethod
    def _apply_identity(
        spec: ServerSpec,
        st: _State,
        verified: tuple[str, str, bytes | None, bytes | None],
        now_ms: int,
        *,
        room: bool,
    ) -> tuple[str, str, list[ServerEntry]]:
        """Apply a verification's result (status, detail, evidence hash, response key); the entry
        to log, if it is a change and may be logged. The detail names the response key, so a new
        key is a change that is logged before outcomes are checked against it."""
        status, detail, evidence_hash, response_key = verified
        st.response_key = response_key if status == "verified" else None
        key = (spec.identity.kind, status, detail)
        if status == "verified" and key == st.logged and st.verified_ms is not None:
            st.verified_ms, st.detail = now_ms, detail  # the same identity, proven again: a refresh
            return status, detail, []
        if status == "verified" and not room:
            why = (
                f"verified, but not applied: reports of this server were logged {MAX_LOGGING_REPORTS} times "
                "in the last minute; it stays quarantined until its next report"
            )
            st.verified_ms, st.detail, st.response_key = None, why, None
            return "failed", why, []
        if status == "verified":
            st.verified_ms, st.detail = now_ms, detail
        else:
            st.verified_ms, st.detail = None, detail  # a failure quarantines at once, logged or not
            if key == st.logged:
                return status, detail, []
            if not room:
                st.unlogged += 1
                return status, detail, []
        st.logged = key
        entry = ServerEntry(
            time_ms=now_ms,
            server=spec.name,
            kind=spec.identity.kind,
            status=status,
            detail=detail,
            evidence_sha256=evidence_hash,
            extra=_take_unlogged(st),
            response_key=st.response_key,
        )
        return status, detail, [entry]

    def _tools(self, spec: ServerSpec, st: _State, tools_json: bytes, now_ms: int, *, room: bool) -> list[ServerEntry]:
        tools = parse_json(tools_json, what="tool definitions", max_bytes=MAX_TOOLS_JSON)
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS or not all(isinstance(t, dict) for t in tools):
            raise DecodeError(f"tool definitions must be a JSON array of at most {MAX_TOOLS} objects")
        hashes = {str(t.get("name")): tool_definition_hash(t) for t in tools}
        st.tool_hashes = hashes
        st.input_schemas = {
            str(t.get("name")): t["inputSchema"] for t in tools if isinstance(t.get("inputSchema"), dict)
        }
        drift: dict[str, str] = {}
        extra: dict[str, dict[str, str]] = {}
        for tool, pin in spec.pins.items():
            actual = hashes.get(tool)
            if actual is None:
                drift[tool] = f"the server no longer offers it (pinned {pin[:16]}...)"
                extra[tool] = {"tool": tool, "pinned": pin, "actual": "missing"}
            elif actual != pin:
                drift[tool] = f"its definition drifted from the pin (pinned {pin[:16]}..., now {actual[:16]}...)"
                extra[tool] = {"tool": tool, "pinned": pin, "actual": actual}
        drifted = [t for t in sorted(drift) if st.drift.get(t) != drift[t]]
        restored = [t for t in sorted(set(st.drift) - set(drift)) if t in spec.pins]
        if not room:
            # Drifts take effect unlogged; restorations wait (those tools stay quarantined).
            st.unlogged += len(drifted)
            st.drift = {**drift, **{t: st.drift[t] for t in restored}}
            return []
        entries = [
            ServerEntry(time_ms=now_ms, server=spec.name, kind="pin", status="drift", detail=drift[t], extra=extra[t])
            for t in drifted
        ]
        entries += [
            ServerEntry(
                time_ms=now_ms,
                server=spec.name,
                kind="pin",
                status="pin-restored",
                detail=f"tool {t!r} matches its pin again",
                extra={"tool": t, "pinned": spec.pins[t]},
            )
            for t in restored
        ]
        st.drift = drift
        if entries:
            entries[0] = dataclasses.replace(entries[0], extra={**entries[0].extra, **_take_unlogged(st)})
        return entries

    def input_schema(self, server: str, tool: str) -> dict[str, Any] | None:
        """The tool's input schema as last reported (hash-checked when the tool is pinned)."""
        st = self._states.get(server)
        return st.input_schemas.get(tool) if st is not None else None

    def levels(self, specs: Mapping[str, ServerSpec], now_ms: int) -> dict[str, str]:
        return {name: self.level(spec, now_ms) for name, spec in specs.items()}


def _response_key(document: bytes, policy: AttestationPolicy) -> tuple[bytes | None, str]:
    """The response key the (already verified) document's user_data binds, and how the detail says
    it. A document that binds none still proves the server's identity; its outcomes will show
    "missing" signatures. Verified a second time here to read user_data, which check_nitro does
    not return: reports are rare (at most MAX_LOGGING_REPORTS a minute per server log anything)."""
    try:
        key = parse_upstream_binding(verify_attestation(document, policy).user_data).response_key
    except DecodeError as exc:
        return None, bounded(f"no response key bound ({exc}): its results cannot be signed", 300)
    return key, f"response key {key.hex()}"


def _take_unlogged(st: _State) -> dict[str, str]:
    """`extra` for the next entry of a server: how many changes took effect unlogged before it."""
    n, st.unlogged = st.unlogged, 0
    return {"unlogged": str(n)} if n else {}
