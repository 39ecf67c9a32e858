"""Log entries: the records the enclave sequences, in deterministic CBOR.

Encoding: RFC 8949 §4.2.1 core deterministic encoding (shortest integer and length forms,
definite lengths, map keys sorted bytewise by their encodings, no floats, no tags). Every
entry is a map with text keys; `t` names the record type and `v` its version. The parser
re-encodes what it decoded and refuses the entry unless the bytes are identical, so one
logical record has exactly one byte string and one leaf hash. See
docs/decisions/0001-entry-encoding.md.

An entry commits to bodies (tool arguments, results) by the SHA-256 of their RFC 8785
canonical JSON; the bodies themselves live beside the log, kept by the parent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import cbor2

from cloister.verify.errors import DecodeError

# tlog-tiles entry bundles carry each entry behind a uint16 length.
MAX_ENTRY_BYTES = 0xFFFF
VERSION = 1


def dumps_deterministic(value: Any) -> bytes:
    """RFC 8949 §4.2.1 deterministic CBOR of maps with text keys, lists, ints, bytes, text, null.

    cbor2 always emits shortest-form integers and lengths; only map key order needs care.
    Text keys sort bytewise by their encodings, i.e. by UTF-8 length, then bytewise. Sorting
    here and encoding plainly is 4x faster than cbor2's canonical mode (which sorts the same
    way), and the decision path encodes several maps per call.
    """
    return cbor2.dumps(_ordered(value))


_ORDER: dict[tuple[str, ...], tuple[str, ...]] = {}


def _ordered(value: Any) -> Any:
    if isinstance(value, dict):
        keys = tuple(value)
        order = _ORDER.get(keys)
        if order is None:
            if not all(isinstance(k, str) for k in keys):
                raise DecodeError("deterministic CBOR here supports text map keys only")
            order = tuple(sorted(keys, key=lambda k: (len(k.encode()), k.encode())))
            if len(_ORDER) < 1024:
                _ORDER[keys] = order
        return {k: _ordered(value[k]) for k in order}
    if isinstance(value, list | tuple):
        return [_ordered(v) for v in value]
    return value


def _str(m: dict[str, Any], key: str, *, max_len: int = 1024) -> str:
    v = m.get(key)
    if not isinstance(v, str):
        raise DecodeError(f"entry field {key!r}: expected text, got {type(v).__name__}")
    if len(v) > max_len:
        raise DecodeError(f"entry field {key!r}: longer than {max_len} characters")
    return v


def _uint(m: dict[str, Any], key: str) -> int:
    v = m.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise DecodeError(f"entry field {key!r}: expected an unsigned integer, got {v!r}")
    return v


def _bytes(m: dict[str, Any], key: str, *, size: int | None = None, max_len: int = MAX_ENTRY_BYTES) -> bytes:
    v = m.get(key)
    if not isinstance(v, bytes):
        raise DecodeError(f"entry field {key!r}: expected bytes, got {type(v).__name__}")
    if size is not None and len(v) != size:
        raise DecodeError(f"entry field {key!r}: expected {size} bytes, got {len(v)}")
    if len(v) > max_len:
        raise DecodeError(f"entry field {key!r}: longer than {max_len} bytes")
    return v


def _opt_bytes(m: dict[str, Any], key: str, *, size: int) -> bytes | None:
    return None if m.get(key) is None else _bytes(m, key, size=size)


def _str_map(m: dict[str, Any], key: str, *, max_items: int = 64) -> dict[str, str]:
    v = m.get(key)
    if (
        not isinstance(v, dict)
        or len(v) > max_items
        or not all(isinstance(k, str) and isinstance(x, str) and len(k) <= 256 and len(x) <= 64 for k, x in v.items())
    ):
        raise DecodeError(f"entry field {key!r}: expected a map of at most {max_items} short texts to texts")
    return dict(v)


def _strs(m: dict[str, Any], key: str, *, max_items: int = 64) -> tuple[str, ...]:
    v = m.get(key)
    if not isinstance(v, list) or len(v) > max_items or not all(isinstance(s, str) and len(s) <= 256 for s in v):
        raise DecodeError(f"entry field {key!r}: expected a list of at most {max_items} short texts")
    return tuple(v)


@dataclass(frozen=True)
class DecisionEntry:
    """One authorization decision, allow or deny, sequenced before the answer left the enclave."""

    TYPE: ClassVar[str] = "decision"
    time_ms: int
    agent: str
    roles: tuple[str, ...]
    issuer: str
    server: str
    tool: str
    args_sha256: bytes
    decision: Literal["allow", "deny"]
    code: str  # "" for allow; else a deny class (policy, no-permit, limit, ...)
    reason: str
    policies: tuple[str, ...]
    policy_sha256: bytes
    policy_version: int
    request_id: str
    grant_nonce: bytes | None = None  # allow only
    grant_expiry_ms: int | None = None  # allow only
    # What this call charged against each limit (limit id -> decimal amount), so budgets can be
    # rebuilt exactly from the log after a restart.
    charges: dict[str, str] = field(default_factory=dict)
    mode: Literal["enforce", "log-only"] = "enforce"

    def to_map(self) -> dict[str, Any]:
        return {
            "t": self.TYPE,
            "v": VERSION,
            "time": self.time_ms,
            "agent": self.agent,
            "roles": list(self.roles),
            "iss": self.issuer,
            "server": self.server,
            "tool": self.tool,
            "args": self.args_sha256,
            "decision": self.decision,
            "code": self.code,
            "reason": self.reason,
            "policies": list(self.policies),
            "policy": self.policy_sha256,
            "policy_version": self.policy_version,
            "request": self.request_id,
            "grant_nonce": self.grant_nonce,
            "grant_exp": self.grant_expiry_ms,
            "charges": dict(self.charges),
            "mode": self.mode,
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> DecisionEntry:
        decision = _str(m, "decision")
        if decision not in ("allow", "deny"):
            raise DecodeError(f"entry field 'decision': expected allow or deny, got {decision!r}")
        mode = _str(m, "mode")
        if mode not in ("enforce", "log-only"):
            raise DecodeError(f"entry field 'mode': expected enforce or log-only, got {mode!r}")
        exp = m.get("grant_exp")
        if exp is not None:
            exp = _uint(m, "grant_exp")
        entry = cls(
            time_ms=_uint(m, "time"),
            agent=_str(m, "agent"),
            roles=_strs(m, "roles"),
            issuer=_str(m, "iss"),
            server=_str(m, "server"),
            tool=_str(m, "tool"),
            args_sha256=_bytes(m, "args", size=32),
            decision=decision,  # type: ignore[arg-type]
            code=_str(m, "code"),
            reason=_str(m, "reason", max_len=4096),
            policies=_strs(m, "policies"),
            policy_sha256=_bytes(m, "policy", size=32),
            policy_version=_uint(m, "policy_version"),
            request_id=_str(m, "request"),
            grant_nonce=_opt_bytes(m, "grant_nonce", size=16),
            grant_expiry_ms=exp,
            charges=_str_map(m, "charges"),
            mode=mode,  # type: ignore[arg-type]
        )
        has_grant = entry.grant_nonce is not None and entry.grant_expiry_ms is not None
        if has_grant != (entry.grant_nonce is not None or entry.grant_expiry_ms is not None):
            raise DecodeError("decision entry: grant nonce and expiry must be both present or both absent")
        if entry.decision == "allow" and not has_grant:
            raise DecodeError("decision entry: an allow must carry its grant nonce and expiry")
        if entry.decision == "deny" and entry.mode == "enforce" and has_grant:
            raise DecodeError("decision entry: an enforced deny cannot carry a grant")
        return entry


@dataclass(frozen=True)
class OutcomeEntry:
    """What the upstream answered to an allowed call, as the relay reported it."""

    TYPE: ClassVar[str] = "outcome"
    time_ms: int
    decision_index: int
    result_sha256: bytes | None
    error: str
    duration_us: int
    paid: str = ""

    def to_map(self) -> dict[str, Any]:
        return {
            "t": self.TYPE,
            "v": VERSION,
            "time": self.time_ms,
            "decision": self.decision_index,
            "result": self.result_sha256,
            "error": self.error,
            "duration_us": self.duration_us,
            "paid": self.paid,
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> OutcomeEntry:
        return cls(
            time_ms=_uint(m, "time"),
            decision_index=_uint(m, "decision"),
            result_sha256=_opt_bytes(m, "result", size=32),
            error=_str(m, "error", max_len=4096),
            duration_us=_uint(m, "duration_us"),
            paid=_str(m, "paid"),
        )


@dataclass(frozen=True)
class KeyEntry:
    """An enclave start: its new keys, bound by the attestation document it carries."""

    TYPE: ClassVar[str] = "key"
    time_ms: int
    attestation: bytes
    log_key: bytes
    grant_key: bytes
    log_vkey: str
    # The checkpoint this enclave continued from: (size, root hash), or None for a new log.
    previous_size: int | None = None
    previous_root: bytes | None = None

    def to_map(self) -> dict[str, Any]:
        return {
            "t": self.TYPE,
            "v": VERSION,
            "time": self.time_ms,
            "attestation": self.attestation,
            "log_key": self.log_key,
            "grant_key": self.grant_key,
            "vkey": self.log_vkey,
            "prev_size": self.previous_size,
            "prev_root": self.previous_root,
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> KeyEntry:
        prev_size = None if m.get("prev_size") is None else _uint(m, "prev_size")
        prev_root = _opt_bytes(m, "prev_root", size=32)
        if (prev_size is None) != (prev_root is None):
            raise DecodeError("key entry: prev_size and prev_root must both be present or both absent")
        return cls(
            time_ms=_uint(m, "time"),
            attestation=_bytes(m, "attestation", max_len=16384),
            log_key=_bytes(m, "log_key", size=32),
            grant_key=_bytes(m, "grant_key", size=32),
            log_vkey=_str(m, "vkey"),
            previous_size=prev_size,
            previous_root=prev_root,
        )


@dataclass(frozen=True)
class PolicyEntry:
    """A policy bundle change: which admin-signed bundle is in force from here on."""

    TYPE: ClassVar[str] = "policy"
    time_ms: int
    bundle_sha256: bytes
    version: int
    signer: str
    mode: str

    def to_map(self) -> dict[str, Any]:
        return {
            "t": self.TYPE,
            "v": VERSION,
            "time": self.time_ms,
            "bundle": self.bundle_sha256,
            "version": self.version,
            "signer": self.signer,
            "mode": self.mode,
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> PolicyEntry:
        return cls(
            time_ms=_uint(m, "time"),
            bundle_sha256=_bytes(m, "bundle", size=32),
            version=_uint(m, "version"),
            signer=_str(m, "signer"),
            mode=_str(m, "mode"),
        )


@dataclass(frozen=True)
class ServerEntry:
    """The verified identity of an upstream server (or its failure and quarantine)."""

    TYPE: ClassVar[str] = "server"
    time_ms: int
    server: str
    kind: str  # nitro, checksum, tls, none
    status: str  # verified, failed, drift
    detail: str
    evidence_sha256: bytes | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_map(self) -> dict[str, Any]:
        return {
            "t": self.TYPE,
            "v": VERSION,
            "time": self.time_ms,
            "server": self.server,
            "kind": self.kind,
            "status": self.status,
            "detail": self.detail,
            "evidence": self.evidence_sha256,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> ServerEntry:
        extra = _str_map(m, "extra")
        return cls(
            time_ms=_uint(m, "time"),
            server=_str(m, "server"),
            kind=_str(m, "kind"),
            status=_str(m, "status"),
            detail=_str(m, "detail", max_len=4096),
            evidence_sha256=_opt_bytes(m, "evidence", size=32),
            extra=extra,
        )


Entry = DecisionEntry | OutcomeEntry | KeyEntry | PolicyEntry | ServerEntry
_TYPES: dict[str, type[DecisionEntry | OutcomeEntry | KeyEntry | PolicyEntry | ServerEntry]] = {
    t.TYPE: t for t in (DecisionEntry, OutcomeEntry, KeyEntry, PolicyEntry, ServerEntry)
}


def encode_entry(entry: Entry) -> bytes:
    data = dumps_deterministic(entry.to_map())
    if len(data) > MAX_ENTRY_BYTES:
        raise DecodeError(f"{entry.TYPE} entry is {len(data)} bytes; entries are capped at {MAX_ENTRY_BYTES}")
    return data


def parse_entry(data: bytes) -> Entry:
    """The one parser for log entries. Refuses anything but the deterministic encoding."""
    if len(data) > MAX_ENTRY_BYTES:
        raise DecodeError(f"entry is {len(data)} bytes; entries are capped at {MAX_ENTRY_BYTES}")
    try:
        m = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise DecodeError(f"entry is not valid CBOR: {exc}") from exc
    if not isinstance(m, dict):
        raise DecodeError(f"entry must be a CBOR map, got {type(m).__name__}")
    kind = m.get("t")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(f"entry has unknown type {kind!r}")
    if m.get("v") != VERSION:
        raise DecodeError(f"{kind} entry has unsupported version {m.get('v')!r}")
    entry = cls.from_map(m)
    expected = entry.to_map()
    if set(m) != set(expected):
        extra = sorted(set(m) - set(expected))
        missing = sorted(set(expected) - set(m))
        raise DecodeError(f"{kind} entry: unexpected fields {extra} / missing fields {missing}")
    if dumps_deterministic(expected) != bytes(data):
        raise DecodeError(f"{kind} entry is not in deterministic CBOR encoding (RFC 8949 §4.2.1)")
    return entry
