"""Log entries: the records the enclave sequences, in deterministic CBOR.

Encoding: RFC 8949 §4.2.1 core deterministic encoding (shortest integer and length forms,
definite lengths, map keys sorted bytewise by their encodings, no floats, no tags). Every
entry is a map with text keys; `t` names the record type and `v` its version. The parser
re-encodes what it decoded and refuses the entry unless the bytes are identical, so one
logical record has exactly one byte string and one leaf hash. See
docs/decisions/0001-entry-encoding.md.

What each field may hold is one table per record type (`FIELDS`): the parser (`from_map`) and
the constructors (`__post_init__`) both check it, so an entry that `parse_entry` would refuse
cannot be built, and the enclave can never sequence one. Text that comes from anyone else (a
token's claims, a tool name, an upstream's error) goes into an entry through `bounded`, which
keeps a prefix and a SHA-256 of the whole when it is too long.

An entry commits to bodies (tool arguments, results) by the SHA-256 of their RFC 8785
canonical JSON; the bodies themselves live beside the log, kept by the parent.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, Literal

import cbor2

from cloister.verify.errors import DecodeError

# tlog-tiles entry bundles carry each entry behind a uint16 length.
MAX_ENTRY_BYTES = 0xFFFF
VERSION = 1
# How long after its grant expires an allowed decision may still get its outcome: the enclave keeps
# the decision open that long (and refuses a later outcome), so an auditor who finds no outcome for
# a decision past its grant's expiry plus this grace knows none will ever come.
OUTCOME_GRACE_MS = 15 * 60 * 1000
# Snapshots (docs/decisions/0016): a limit window is summarised in at most this many time buckets
# (plus one); a snapshot carries at most MAX_SNAPSHOT_KEYS windows, in at most MAX_SNAPSHOT_PARTS entries.
SNAPSHOT_BUCKETS = 64
MAX_SNAPSHOT_KEYS = 4096
MAX_SNAPSHOT_PARTS = 1024


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


# ---- Untrusted text and amounts, made fit for an entry ----------------------------------------


def _unicode(text: str) -> bool:
    """Whether `text` is valid Unicode text (no lone surrogate), so it encodes as UTF-8."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


MIN_BOUND = 128  # the mark `bounded` appends takes up to about 100 characters


def bounded(text: str, limit: int) -> str:
    """`text` itself when it is valid Unicode of at most `limit` characters; otherwise a prefix,
    then "…(N chars, sha256:<hex>)" naming the whole (its UTF-8 bytes, lone surrogates passed
    through), together at most `limit` characters and valid Unicode (a lone surrogate in the
    prefix becomes U+FFFD). Whoever holds the whole text can show it is the one the log names."""
    if limit < MIN_BOUND:
        raise ValueError(f"bounded() needs a limit of at least {MIN_BOUND} characters, got {limit}")
    if len(text) <= limit and _unicode(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    mark = f"…({len(text)} chars, sha256:{digest})"
    prefix = text[: limit - len(mark)]
    if not _unicode(prefix):
        prefix = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in prefix)
    return prefix + mark


def quoted(value: object, limit: int = 64) -> str:
    """`value` quoted for a message (its repr), never longer than about `limit` characters of
    the original: a longer text is cut, and the message says how long it was."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        # repr() of an integer past 4300 digits raises; no message needs its digits.
        return f"<an integer of {value.bit_length()} bits>"
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    return f"{text[:limit]!r}…({len(text)} chars)"


MAX_DECIMAL_TEXT = 64  # as long as a value of an entry's text map may be


def decimal_text(amount: Decimal, max_len: int = MAX_DECIMAL_TEXT) -> str:
    """An amount as an entry records it: plain digits (never an exponent), no trailing zeros in
    the fraction, "0" for zero. ValueError for a non-finite or negative amount, or one whose
    text would be longer than `max_len` (known before the text is made, so it stays cheap)."""
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"amount {quoted(str(amount))} is not a finite non-negative decimal")
    if amount == 0:
        return "0"
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite
    keep = len(digits)
    while digits[keep - 1] == 0:  # trailing zeros of the coefficient, exactly (no rounding)
        keep, exponent = keep - 1, exponent + 1
    digits = digits[:keep]
    length = keep + exponent if exponent >= 0 else max(keep, 1 - exponent) + 1
    if length > max_len:
        raise ValueError(f"amount {quoted(str(amount))} is longer than {max_len} characters in plain digits")
    return format(Decimal((0, digits, exponent)), "f")


# ---- What each field may hold: one table, read by the parser and by the constructors ----------

FieldKind = Literal["uint", "text", "bytes", "texts", "text_map", "counts", "windows"]


@dataclass(frozen=True)
class Field:
    """One field of an entry: its CBOR key and what it may hold.

    `max_len` is characters for text, bytes for bytes, items for lists and maps; `item_len` caps
    a list's texts and a map's keys (characters), `value_len` a text map's values."""

    key: str
    kind: FieldKind
    max_len: int = 1024
    size: int | None = None  # bytes of exactly this length
    optional: bool = False  # None is allowed
    item_len: int = 256
    value_len: int = 64
    choices: tuple[str, ...] = ()  # text: one of these

    def check(self, v: Any) -> None:
        """Raise DecodeError unless `v` is a value this field may hold."""
        if v is None and self.optional:
            return
        _CHECKS[self.kind](self, v)


def _fail(f: Field, what: str) -> DecodeError:
    return DecodeError(f"entry field {f.key!r}: {what}")


def _check_uint(f: Field, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _fail(f, f"expected an unsigned integer, got {quoted(v)}")


def _check_text(f: Field, v: Any) -> None:
    if not isinstance(v, str):
        raise _fail(f, f"expected text, got {type(v).__name__}")
    if f.choices and v not in f.choices:
        raise _fail(f, f"expected {' or '.join(f.choices)}, got {quoted(v)}")
    if len(v) > f.max_len:
        raise _fail(f, f"longer than {f.max_len} characters")
    if not _unicode(v):
        raise _fail(f, "not valid Unicode text (a lone surrogate)")


def _check_bytes(f: Field, v: Any) -> None:
    if not isinstance(v, bytes):
        raise _fail(f, f"expected bytes, got {type(v).__name__}")
    if f.size is not None and len(v) != f.size:
        raise _fail(f, f"expected {f.size} bytes, got {len(v)}")
    if len(v) > f.max_len:
        raise _fail(f, f"longer than {f.max_len} bytes")


def _short_text(v: Any, limit: int) -> bool:
    return isinstance(v, str) and len(v) <= limit and _unicode(v)


def _check_texts(f: Field, v: Any) -> None:
    if not isinstance(v, list | tuple) or len(v) > f.max_len or not all(_short_text(s, f.item_len) for s in v):
        raise _fail(f, f"expected a list of at most {f.max_len} short texts")


def _check_text_map(f: Field, v: Any) -> None:
    if (
        not isinstance(v, dict)
        or len(v) > f.max_len
        or not all(_short_text(k, f.item_len) and _short_text(x, f.value_len) for k, x in v.items())
    ):
        raise _fail(f, f"expected a map of at most {f.max_len} short texts to texts")


def _check_counts(f: Field, v: Any) -> None:
    if (
        not isinstance(v, dict)
        or len(v) > f.max_len
        or not all(
            _short_text(k, f.item_len) and isinstance(n, int) and not isinstance(n, bool) and n >= 0
            for k, n in v.items()
        )
    ):
        raise _fail(f, f"expected a map of at most {f.max_len} short texts to unsigned integers")


# A snapshot's limit windows: rows of (limit id, key, buckets), each bucket (time ms, amount).
# An amount is as `decimal_text` writes it, and positive.
_AMOUNT = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")
SNAPSHOT_KEY_LEN = 320  # a key is an agent, role or server name (128), or "<server>___<tool>"


def _bucket_ok(b: Any, after: int) -> int | None:
    """The bucket's time when it is (time > after, positive amount), else None."""
    if not isinstance(b, list | tuple) or len(b) != 2:
        return None
    t, amount = b
    if not isinstance(t, int) or isinstance(t, bool) or t <= after:
        return None
    if not _short_text(amount, MAX_DECIMAL_TEXT) or not _AMOUNT.fullmatch(amount) or amount == "0":
        return None
    return t


def _row_ok(f: Field, row: Any) -> bool:
    if not isinstance(row, list | tuple) or len(row) != 3:
        return False
    limit_id, key, buckets = row
    if not _short_text(limit_id, f.item_len) or not _short_text(key, f.value_len):
        return False
    if not isinstance(buckets, list | tuple) or not 0 < len(buckets) <= SNAPSHOT_BUCKETS + 1:
        return False
    after = -1
    for b in buckets:  # strictly increasing times: one encoding per window
        t = _bucket_ok(b, after)
        if t is None:
            return False
        after = t
    return True


def _check_windows(f: Field, v: Any) -> None:
    if not isinstance(v, list | tuple) or len(v) > f.max_len:
        raise _fail(f, f"expected a list of at most {f.max_len} limit windows")
    for i, row in enumerate(v):
        if not _row_ok(f, row):
            raise _fail(
                f,
                f"window {i}: expected [limit id, key, [[time, amount], ...]] with at most "
                f"{SNAPSHOT_BUCKETS + 1} buckets in increasing time and positive decimal amounts",
            )


def _tuples(v: Any) -> Any:
    """Lists as tuples, all the way down (the checker then sees one shape)."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


_CHECKS = {
    "uint": _check_uint,
    "text": _check_text,
    "bytes": _check_bytes,
    "texts": _check_texts,
    "text_map": _check_text_map,
    "counts": _check_counts,
    "windows": _check_windows,
}


def _check_fields(entry: Any) -> None:
    for name, f in entry.FIELDS.items():
        f.check(getattr(entry, name))


def _put_present(m: dict[str, Any], **fields: Any) -> None:
    """Add the fields that are not None: fields added after entries were first written are
    absent (not null) when unset, so older entries keep their one encoding and still parse."""
    for key, value in fields.items():
        if value is not None:
            m[key] = value


def _from_map(cls: Any, m: Mapping[str, Any]) -> Any:
    """The entry `m` holds, lists as tuples and maps copied. The constructor (`__post_init__`)
    checks every field against the table, once."""
    values: dict[str, Any] = {}
    for name, f in cls.FIELDS.items():
        v = m.get(f.key)
        if f.kind == "texts" and isinstance(v, list):
            v = tuple(v)
        elif f.kind in ("text_map", "counts") and isinstance(v, dict):
            v = dict(v)
        elif f.kind == "windows" and isinstance(v, list):
            v = _tuples(v)
        values[name] = v
    return cls(**values)


DECISION_FIELDS: dict[str, Field] = {
    "time_ms": Field("time", "uint"),
    "agent": Field("agent", "text"),
    "roles": Field("roles", "texts", 64),
    "issuer": Field("iss", "text"),
    "server": Field("server", "text"),
    "tool": Field("tool", "text"),
    "args_sha256": Field("args", "bytes", size=32),
    "decision": Field("decision", "text", choices=("allow", "deny")),
    "code": Field("code", "text"),
    "reason": Field("reason", "text", 4096),
    "policies": Field("policies", "texts", 64),
    "policy_sha256": Field("policy", "bytes", size=32),
    "policy_version": Field("policy_version", "uint"),
    "request_id": Field("request", "text"),
    "grant_nonce": Field("grant_nonce", "bytes", size=16, optional=True),
    "grant_expiry_ms": Field("grant_exp", "uint", optional=True),
    "charges": Field("charges", "text_map", 64),
    "mode": Field("mode", "text", choices=("enforce", "log-only")),
}
# An outcome's `response`: cloister.verify.response_sig.ResponseStatus's values (kept here as text
# so that this module, the one parser, imports nothing of the signature code).
RESPONSE_STATUSES = ("verified", "invalid", "missing", "no-result", "unchecked", "not-required")
OUTCOME_FIELDS: dict[str, Field] = {
    "time_ms": Field("time", "uint"),
    "decision_index": Field("decision", "uint"),
    "result_sha256": Field("result", "bytes", size=32, optional=True),
    "error": Field("error", "text", 4096),
    "duration_us": Field("duration_us", "uint"),
    "paid": Field("paid", "text"),
    # The upstream's response signature (decision 0017): absent from entries written before it.
    "response": Field("response", "text", optional=True, choices=RESPONSE_STATUSES),
    "response_sig": Field("rsig", "bytes", size=64, optional=True),
    "response_key": Field("rkey", "bytes", size=32, optional=True),
}
KEY_FIELDS: dict[str, Field] = {
    "time_ms": Field("time", "uint"),
    "attestation": Field("attestation", "bytes", 16384),
    "log_key": Field("log_key", "bytes", size=32),
    "grant_key": Field("grant_key", "bytes", size=32),
    "log_vkey": Field("vkey", "text"),
    "previous_size": Field("prev_size", "uint", optional=True),
    "previous_root": Field("prev_root", "bytes", size=32, optional=True),
}
POLICY_FIELDS: dict[str, Field] = {
    "time_ms": Field("time", "uint"),
    "bundle_sha256": Field("bundle", "bytes", size=32),
    "version": Field("version", "uint"),
    "signer": Field("signer", "text"),
    "mode": Field("mode", "text"),
}
SERVER_FIELDS: dict[str, Field] = {
    "time_ms": Field("time", "uint"),
    "server": Field("server", "text"),
    "kind": Field("kind", "text"),
    "status": Field("status", "text"),
    "detail": Field("detail", "text", 4096),
    "evidence_sha256": Field("evidence", "bytes", size=32, optional=True),
    "extra": Field("extra", "text_map", 64),
    # A verified nitro server's response key (decision 0017); absent otherwise and before it.
    "response_key": Field("rkey", "bytes", size=32, optional=True),
}
SNAPSHOT_FIELDS: dict[str, Field] = {
    "time_ms": Field("time", "uint"),
    "upto": Field("upto", "uint"),
    "part": Field("part", "uint"),
    "parts": Field("parts", "uint"),
    "open_from": Field("open_from", "uint"),
    "policy_version": Field("policy_version", "uint", optional=True),
    "policy_sha256": Field("policy", "bytes", size=32, optional=True),
    "windows": Field("windows", "windows", MAX_SNAPSHOT_KEYS, item_len=256, value_len=SNAPSHOT_KEY_LEN),
}
DENIALS_FIELDS: dict[str, Field] = {
    "time_ms": Field("time", "uint"),
    "first_ms": Field("first", "uint"),
    "last_ms": Field("last", "uint"),
    "count": Field("count", "uint"),
    "codes": Field("codes", "counts", 64),
    "sample_sha256": Field("sample", "bytes", size=32),
}


@dataclass(frozen=True)
class DecisionEntry:
    """One authorization decision, allow or deny, sequenced before the answer left the enclave."""

    TYPE: ClassVar[str] = "decision"
    FIELDS: ClassVar[dict[str, Field]] = DECISION_FIELDS
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

    def __post_init__(self) -> None:
        _check_fields(self)
        has_nonce, has_expiry = self.grant_nonce is not None, self.grant_expiry_ms is not None
        if has_nonce != has_expiry:
            raise DecodeError("decision entry: grant nonce and expiry must be both present or both absent")
        if self.decision == "allow" and not has_nonce:
            raise DecodeError("decision entry: an allow must carry its grant nonce and expiry")
        if self.decision == "deny" and self.mode == "enforce" and has_nonce:
            raise DecodeError("decision entry: an enforced deny cannot carry a grant")

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
        entry: DecisionEntry = _from_map(cls, m)
        return entry


@dataclass(frozen=True)
class OutcomeEntry:
    """What the upstream answered to an allowed call, as the relay reported it."""

    TYPE: ClassVar[str] = "outcome"
    FIELDS: ClassVar[dict[str, Field]] = OUTCOME_FIELDS
    time_ms: int
    decision_index: int
    result_sha256: bytes | None
    error: str
    duration_us: int
    paid: str = ""
    # Decision 0017: the enclave's verdict on the upstream's response signature, the signature
    # (when one was carried and well-formed) and the key it was checked against. Each is left out
    # of the encoding when None, so entries written before these fields still parse.
    response: str | None = None
    response_sig: bytes | None = None
    response_key: bytes | None = None

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.response is None and (self.response_sig is not None or self.response_key is not None):
            raise DecodeError("outcome entry: a response signature or key without a response status")
        if self.response == "verified" and (
            self.response_sig is None or self.response_key is None or self.result_sha256 is None
        ):
            raise DecodeError("outcome entry: a verified response must carry its result hash, signature and key")

    def to_map(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "t": self.TYPE,
            "v": VERSION,
            "time": self.time_ms,
            "decision": self.decision_index,
            "result": self.result_sha256,
            "error": self.error,
            "duration_us": self.duration_us,
            "paid": self.paid,
        }
        _put_present(m, response=self.response, rsig=self.response_sig, rkey=self.response_key)
        return m

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> OutcomeEntry:
        entry: OutcomeEntry = _from_map(cls, m)
        return entry


@dataclass(frozen=True)
class KeyEntry:
    """An enclave start: its new keys, bound by the attestation document it carries."""

    TYPE: ClassVar[str] = "key"
    FIELDS: ClassVar[dict[str, Field]] = KEY_FIELDS
    time_ms: int
    attestation: bytes
    log_key: bytes
    grant_key: bytes
    log_vkey: str
    # The checkpoint this enclave continued from: (size, root hash), or None for a new log.
    previous_size: int | None = None
    previous_root: bytes | None = None

    def __post_init__(self) -> None:
        _check_fields(self)
        if (self.previous_size is None) != (self.previous_root is None):
            raise DecodeError("key entry: prev_size and prev_root must both be present or both absent")

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
        entry: KeyEntry = _from_map(cls, m)
        return entry


@dataclass(frozen=True)
class PolicyEntry:
    """A policy bundle change: which admin-signed bundle is in force from here on."""

    TYPE: ClassVar[str] = "policy"
    FIELDS: ClassVar[dict[str, Field]] = POLICY_FIELDS
    time_ms: int
    bundle_sha256: bytes
    version: int
    signer: str
    mode: str

    def __post_init__(self) -> None:
        _check_fields(self)

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
        entry: PolicyEntry = _from_map(cls, m)
        return entry


@dataclass(frozen=True)
class ServerEntry:
    """The verified identity of an upstream server (or its failure and quarantine)."""

    TYPE: ClassVar[str] = "server"
    FIELDS: ClassVar[dict[str, Field]] = SERVER_FIELDS
    time_ms: int
    server: str
    kind: str  # nitro, checksum, tls, none
    status: str  # verified, failed, drift
    detail: str
    evidence_sha256: bytes | None = None
    extra: dict[str, str] = field(default_factory=dict)
    response_key: bytes | None = None  # left out of the encoding when None (decision 0017)

    def __post_init__(self) -> None:
        _check_fields(self)

    def to_map(self) -> dict[str, Any]:
        m: dict[str, Any] = {
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
        _put_present(m, rkey=self.response_key)
        return m

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> ServerEntry:
        entry: ServerEntry = _from_map(cls, m)
        return entry


@dataclass(frozen=True)
class DenialsEntry:
    """Denials the enclave counted rather than logged one by one: anonymous requests (no
    principal: the token, or the arguments before it, did not pass) beyond the enclave's budget
    of individual entries per window (docs/decisions/0009-unauthenticated-denials.md).

    `count` denials between `first_ms` and `last_ms`, by deny code; `sample_sha256` is the
    SHA-256 of the first one's decision entry as it would have been encoded."""

    TYPE: ClassVar[str] = "denials"
    FIELDS: ClassVar[dict[str, Field]] = DENIALS_FIELDS
    time_ms: int
    first_ms: int
    last_ms: int
    count: int
    codes: dict[str, int]
    sample_sha256: bytes

    def __post_init__(self) -> None:
        _check_fields(self)
        if not self.first_ms <= self.last_ms <= self.time_ms:
            raise DecodeError("denials entry: expected first <= last <= time")
        if self.count < 1 or sum(self.codes.values()) != self.count:
            raise DecodeError("denials entry: the counts by code must add up to a positive count")

    def to_map(self) -> dict[str, Any]:
        return {
            "t": self.TYPE,
            "v": VERSION,
            "time": self.time_ms,
            "first": self.first_ms,
            "last": self.last_ms,
            "count": self.count,
            "codes": dict(self.codes),
            "sample": self.sample_sha256,
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> DenialsEntry:
        entry: DenialsEntry = _from_map(cls, m)
        return entry


# One limit window in a snapshot: (limit id, key, ((bucket time ms, amount), ...)).
SnapshotWindow = tuple[str, str, tuple[tuple[int, str], ...]]


@dataclass(frozen=True)
class SnapshotEntry:
    """One part of a snapshot: the state a resume needs that would otherwise come from the log's
    history (docs/decisions/0016-snapshots-and-chunked-resume.md).

    A snapshot is `parts` entries at indexes `upto`, `upto + 1`, ..., appended together; it
    summarises the entries [0, upto). It holds the limit windows of the bundle in force (each a
    few time buckets; a charge is counted until its bucket's end leaves the window, so never
    less than its own window), split across the parts, and `open_from`: the index of the oldest
    allowed decision that could still get an outcome (`upto` when none). Every part repeats the
    same header (time, upto, parts, open_from, policy)."""

    TYPE: ClassVar[str] = "snapshot"
    FIELDS: ClassVar[dict[str, Field]] = SNAPSHOT_FIELDS
    time_ms: int
    upto: int
    part: int
    parts: int
    open_from: int
    policy_version: int | None
    policy_sha256: bytes | None
    windows: tuple[SnapshotWindow, ...] = ()

    def __post_init__(self) -> None:
        _check_fields(self)
        if not self.part < self.parts <= MAX_SNAPSHOT_PARTS:
            raise DecodeError(f"snapshot entry: expected part < parts <= {MAX_SNAPSHOT_PARTS}")
        if self.open_from > self.upto:
            raise DecodeError("snapshot entry: open_from is after the index it summarises up to")
        if (self.policy_version is None) != (self.policy_sha256 is None):
            raise DecodeError("snapshot entry: policy version and hash must both be present or both absent")

    def header(self) -> tuple[int, int, int, int, int | None, bytes | None]:
        """What every part of one snapshot repeats."""
        return (self.time_ms, self.upto, self.parts, self.open_from, self.policy_version, self.policy_sha256)

    def to_map(self) -> dict[str, Any]:
        return {
            "t": self.TYPE,
            "v": VERSION,
            "time": self.time_ms,
            "upto": self.upto,
            "part": self.part,
            "parts": self.parts,
            "open_from": self.open_from,
            "policy_version": self.policy_version,
            "policy": self.policy_sha256,
            "windows": [[lid, key, [[t, a] for t, a in buckets]] for lid, key, buckets in self.windows],
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> SnapshotEntry:
        entry: SnapshotEntry = _from_map(cls, m)
        return entry


Entry = DecisionEntry | OutcomeEntry | KeyEntry | PolicyEntry | ServerEntry | DenialsEntry | SnapshotEntry
_TYPES: dict[str, type[Entry]] = {
    t.TYPE: t for t in (DecisionEntry, OutcomeEntry, KeyEntry, PolicyEntry, ServerEntry, DenialsEntry, SnapshotEntry)
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
        raise DecodeError(f"entry has unknown type {quoted(kind)}")
    if m.get("v") != VERSION:
        raise DecodeError(f"{kind} entry has unsupported version {quoted(m.get('v'))}")
    entry = cls.from_map(m)
    expected = entry.to_map()
    if set(m) != set(expected):
        extra = sorted(quoted(k) for k in set(m) - set(expected))
        missing = sorted(set(expected) - set(m))
        raise DecodeError(f"{kind} entry: unexpected fields [{', '.join(extra)}] / missing fields {missing}")
    if dumps_deterministic(expected) != bytes(data):
        raise DecodeError(f"{kind} entry is not in deterministic CBOR encoding (RFC 8949 §4.2.1)")
    return entry
