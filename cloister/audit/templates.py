"""Memoised `parse_entry` for the replay's hot loop: entries that differ from one already parsed
only in the contents of fixed-size fields are recognised by a single regular-expression match.

`cloister.verify.entries.parse_entry` is the one parser of log entries, and it stays the only
judge: a template is made only from an entry that parse_entry accepted, and anything that does not
match a template goes to parse_entry. The template is that entry's exact bytes with *slots*: the
content bytes of some fields are left free, under rules that make every filling one that
parse_entry would also accept, with the same values outside the slots.

Why a match is as good as parse_entry (RFC 8949 §4.2.1 deterministic CBOR, as entries.py encodes
it): the template keeps every byte outside the slots, including every CBOR head (major type and
length), every key and the key order, so a matching entry decodes to the same map shape with only
the slot values changed. Each slot admits exactly the values that keep the entry valid and its
encoding canonical:

- an unsigned integer whose head says "n following bytes" (n = 1, 2, 4, 8) admits any value that
  still needs n bytes (>= 24, 256, 2**16, 2**32 respectively), so the encoding stays the
  shortest form; parse_entry asks nothing more of these fields (time, grant expiry, an outcome's
  decision index, durations);
- a byte string of fixed length admits any content (hashes, nonces: parse_entry checks only
  their length);
- a text string of fixed byte length admits ASCII only (always valid UTF-8; one character per
  byte, so length caps still hold): request ids, deny reasons, errors, amounts.

Fields the summary or the cross-entry checks read (type, agent, roles, server, tool, decision,
code, mode, policy version and hash, grant presence) are never slots, so they are the template's.
Entries of other types (key, policy, server, denials) are rare and always go to parse_entry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2

from cloister.verify.entries import (
    DECISION_FIELDS,
    OUTCOME_FIELDS,
    DecisionEntry,
    Entry,
    OutcomeEntry,
    dumps_deterministic,
)

__all__ = [
    "KIND_DECISION_DENIED",
    "KIND_DECISION_GRANTED",
    "KIND_DENIALS",
    "KIND_KEY",
    "KIND_OUTCOME",
    "KIND_POLICY",
    "KIND_SERVER",
    "KIND_SNAPSHOT",
    "KIND_UNDECODABLE",
    "KIND_UNKNOWN",
    "RESPONSE_PROBLEM",
    "RESPONSE_SIGNED",
    "Bucket",
    "DecisionInfo",
    "OutcomeInfo",
    "Template",
    "TemplateCache",
    "decision_kind",
    "response_flags",
]

# One byte per entry in the replay's index of the log.
KIND_UNKNOWN = 0  # not decoded (generic mode, or the bundle could not be read)
KIND_DECISION_GRANTED = 1  # a decision that issued a grant: an allow, or a log-only deny
KIND_DECISION_DENIED = 2  # an enforced deny (no grant, so no outcome may follow)
KIND_OUTCOME = 3
KIND_KEY = 4
KIND_POLICY = 5
KIND_SERVER = 6
KIND_UNDECODABLE = 7
KIND_DENIALS = 8  # denials counted, not logged one by one (cloister.verify.entries.DenialsEntry)
KIND_SNAPSHOT = 9  # a part of a snapshot (cloister.verify.entries.SnapshotEntry, decision 0016)

_UINT_SLOTS = {"decision": frozenset({"time", "grant_exp"}), "outcome": frozenset({"time", "decision", "duration_us"})}
# An outcome's response signature (decision 0017) is a slot; its status and key stay literal.
_BYTES_SLOTS = {"decision": frozenset({"args", "grant_nonce"}), "outcome": frozenset({"result", "rsig"})}
# Text slots and the character caps parse_entry applies to them (a slot is made only within the cap),
# read from the entries' own table of field limits.
_TEXT_SLOTS = {
    "decision": {f.key: f.max_len for f in (DECISION_FIELDS["request_id"], DECISION_FIELDS["reason"])},
    "outcome": {f.key: f.max_len for f in (OUTCOME_FIELDS["error"], OUTCOME_FIELDS["paid"])},
}
_NESTED_TEXT_SLOTS = {"decision": {"charges": DECISION_FIELDS["charges"].value_len}}  # limit id -> amount text
# For a head byte announcing n following bytes: the pattern of values that need exactly n bytes.
_UINT_CONTENT = {
    0x18: rb"[\x18-\xff]",
    0x19: rb"(?!\x00).{2}",
    0x1A: rb"(?!\x00\x00).{4}",
    0x1B: rb"(?!\x00\x00\x00\x00).{8}",
}
MAX_TEMPLATES = 4096
MAX_PER_LENGTH = 64


@dataclass(frozen=True)
class DecisionInfo:
    agent: str
    server: str
    tool: str
    decision: str
    code: str
    mode: str
    granted: bool
    policy: tuple[int, bytes]  # (version, bundle SHA-256)
    reason: str  # the reason when it is not a slot


@dataclass(frozen=True)
class OutcomeInfo:
    error: bool
    paid: bool
    response: str = ""  # the recorded response-signature status; "" for entries before decision 0017
    signed: bool = False  # the entry carries a response signature (which the replay checks again)

    @staticmethod
    def of(entry: OutcomeEntry) -> OutcomeInfo:
        return OutcomeInfo(
            error=bool(entry.error),
            paid=bool(entry.paid),
            response=entry.response or "",
            signed=entry.response_sig is not None,
        )


# What the replay does per outcome beyond counting it (decision 0017), as bits: the recorded
# response status is itself a problem ("missing", "invalid"); the entry carries a signature.
RESPONSE_PROBLEM = 1
RESPONSE_SIGNED = 2


def response_flags(info: OutcomeInfo) -> int:
    problem = RESPONSE_PROBLEM if info.response in ("missing", "invalid") else 0
    return problem | (RESPONSE_SIGNED if info.signed else 0)


def decision_kind(entry: DecisionEntry) -> int:
    return KIND_DECISION_GRANTED if entry.grant_nonce is not None else KIND_DECISION_DENIED


class Template:
    """One parsed entry with slots; the fields the replay reads per match are plain attributes."""

    __slots__ = (
        "data",
        "decision_const",
        "decision_group",
        "deny_code",
        "fullmatch",
        "hints",
        "hits",
        "info",
        "kind",
        "mask",
        "policy",
        "reason",
        "reason_group",
        "response_flags",
    )

    def __init__(
        self,
        pattern: bytes,
        kind: int,
        info: DecisionInfo | OutcomeInfo,
        *,
        decision_group: int = 0,
        decision_const: int = 0,
        reason_group: int = 0,
    ) -> None:
        self.fullmatch: Callable[[bytes], re.Match[bytes] | None] = re.compile(pattern, re.DOTALL).fullmatch
        self.kind = kind
        self.info = info
        # Outcome: the group holding the decision index, or 0 and the index itself (a constant below 24).
        self.decision_group = decision_group
        self.decision_const = decision_const
        # Decision: the policy in force, and for a deny its code and reason (or the group holding it).
        self.policy: tuple[int, bytes] | None = info.policy if isinstance(info, DecisionInfo) else None
        self.deny_code: str | None = info.code if isinstance(info, DecisionInfo) and info.decision == "deny" else None
        self.reason = info.reason if isinstance(info, DecisionInfo) else ""
        self.reason_group = reason_group
        self.response_flags = response_flags(info) if isinstance(info, OutcomeInfo) else 0
        self.hits = 0
        # The entry it was made from, which of its bytes are fixed, and where to tell it from others.
        self.data = b""
        self.mask = b""
        self.hints: tuple[int, ...] = ()


class _Builder:
    def __init__(self, data: bytes, record_type: str) -> None:
        self.data = data
        self.type = record_type
        self.parts: list[bytes] = []
        self.groups = 0
        self.pos = 0
        self.mask = bytearray(len(data))  # 1 where the template's byte is fixed
        self.hints: list[int] = []  # offsets of fixed values, where templates of one length tend to differ

    def literal(self, n: int) -> None:
        self.parts.append(re.escape(self.data[self.pos : self.pos + n]))
        self.mask[self.pos : self.pos + n] = b"\x01" * n
        self.pos += n

    def literal_value(self, n: int) -> None:
        # Names differ anywhere (tool-a, tool-b): every byte of a short value is a candidate.
        self.hints.extend(range(self.pos, self.pos + min(n, 32)))
        self.literal(n)

    def expect(self, encoded: bytes) -> bool:
        return self.data[self.pos : self.pos + len(encoded)] == encoded

    def slot(self, head_len: int, content_len: int, content: bytes, *, group: bool) -> int:
        """The head literally, then `content_len` bytes matched by the pattern `content`."""
        self.literal(head_len)
        self.pos += content_len
        if group:
            self.groups += 1
            self.parts.append(b"(" + content + b")")
        else:
            self.parts.append(content)
        return self.groups if group else 0


def build_template(data: bytes, entry: Entry) -> Template | None:
    """A template from an entry that parse_entry accepted; None if this entry type is not templated."""
    if isinstance(entry, DecisionEntry):
        kind: int = decision_kind(entry)
        info: DecisionInfo | OutcomeInfo = DecisionInfo(
            agent=entry.agent,
            server=entry.server,
            tool=entry.tool,
            decision=entry.decision,
            code=entry.code,
            mode=entry.mode,
            granted=entry.grant_nonce is not None,
            policy=(entry.policy_version, entry.policy_sha256),
            reason=entry.reason,
        )
    elif isinstance(entry, OutcomeEntry):
        kind, info = KIND_OUTCOME, OutcomeInfo.of(entry)
    else:
        return None
    m = cbor2.loads(data)
    if not isinstance(m, dict):
        return None
    b = _Builder(data, entry.TYPE)
    body = sum(len(dumps_deterministic(k)) + len(dumps_deterministic(v)) for k, v in m.items())
    b.literal(len(data) - body)  # the map head
    decision_group = reason_group = 0
    # cbor2 keeps the map's keys in the order of the bytes, which parse_entry proved canonical.
    for key, value in m.items():
        kb = dumps_deterministic(key)
        if not b.expect(kb):
            return None
        b.literal(len(kb))
        vb = dumps_deterministic(value)
        if not b.expect(vb):
            return None
        if key == "reason" and not (isinstance(entry, DecisionEntry) and entry.decision == "deny"):
            b.literal_value(len(vb))  # allow reasons name the permitting policies: part of the template
            continue
        group = _value(b, key, value, vb)
        if key == "decision" and isinstance(entry, OutcomeEntry):
            decision_group = group
        if key == "reason":
            reason_group = group
    if b.pos != len(data):
        return None
    decision_const = entry.decision_index if isinstance(entry, OutcomeEntry) and not decision_group else 0
    template = Template(
        b"".join(b.parts),
        kind,
        info,
        decision_group=decision_group,
        decision_const=decision_const,
        reason_group=reason_group,
    )
    template.data, template.mask, template.hints = data, bytes(b.mask), tuple(b.hints)
    return template


def _value(b: _Builder, key: str, value: Any, vb: bytes) -> int:
    """Append the pattern of one value (a slot or a literal); returns its group number, or 0."""
    t = b.type
    if key in _UINT_SLOTS.get(t, ()) and type(value) is int and value >= 24:
        return b.slot(1, len(vb) - 1, _UINT_CONTENT[vb[0]], group=key == "decision")
    if key in _BYTES_SLOTS.get(t, ()) and isinstance(value, bytes) and value:
        return b.slot(len(vb) - len(value), len(value), b".{%d}" % len(value), group=False)
    cap = _TEXT_SLOTS.get(t, {}).get(key)
    if cap is not None and isinstance(value, str) and value:
        return _text(b, value, vb, cap, group=key == "reason")
    nested_cap = _NESTED_TEXT_SLOTS.get(t, {}).get(key)
    if nested_cap is not None and isinstance(value, dict):
        body = sum(len(dumps_deterministic(k)) + len(dumps_deterministic(v)) for k, v in value.items())
        b.literal(len(vb) - body)
        for k, v in value.items():
            b.literal(len(dumps_deterministic(k)))
            if isinstance(v, str) and v:
                _text(b, v, dumps_deterministic(v), nested_cap, group=False)
            else:
                b.literal(len(dumps_deterministic(v)))
        return 0
    b.literal_value(len(vb))
    return 0


def _text(b: _Builder, value: str, vb: bytes, cap: int, *, group: bool) -> int:
    n = len(value.encode("utf-8"))
    if n > cap:
        b.literal(len(vb))
        return 0
    return b.slot(len(vb) - n, n, rb"[\x00-\x7f]{%d}" % n, group=group)


class Bucket:
    """The templates of one entry length, indexed by the bytes at two offsets that tell them apart.

    Offsets are chosen among the templates' fixed values (agent, tool, code...) where every
    template has a fixed byte, so a matching entry always has its template's bytes there.
    """

    __slots__ = ("index", "p1", "p2", "templates")

    def __init__(self) -> None:
        self.templates: list[Template] = []
        self.p1 = -1  # -1: no index, try every template
        self.p2 = -1
        self.index: dict[int, list[Template]] = {}

    def candidates(self, data: bytes) -> list[Template]:
        if self.p1 < 0:
            return self.templates
        return self.index.get(data[self.p1] << 8 | data[self.p2], [])

    def add(self, template: Template, cap: int) -> Template | None:
        """Add a template; returns the one evicted to stay within `cap`, if any."""
        evicted = self.templates.pop(0) if len(self.templates) >= cap else None
        self.templates.append(template)
        p1, p2 = self.p1, self.p2
        if evicted is None and p1 >= 0 and template.mask[p1] and template.mask[p2]:
            group = self.index.setdefault(template.data[p1] << 8 | template.data[p2], [])
            group.insert(0, template)
            if len(group) <= 4:
                return None
        self._rebuild()
        return evicted

    def _rebuild(self) -> None:
        ts = self.templates
        self.p1 = self.p2 = -1
        self.index = {}
        if len(ts) <= 2:
            return
        fixed = [p for p in sorted(set().union(*(t.hints for t in ts))) if all(t.mask[p] for t in ts)]
        if not fixed:
            return
        p1 = max(fixed, key=lambda p: len({t.data[p] for t in ts}))
        p2 = max(fixed, key=lambda p: len({(t.data[p1], t.data[p]) for t in ts}))
        self.p1, self.p2 = p1, p2
        for t in ts:
            self.index.setdefault(t.data[p1] << 8 | t.data[p2], []).append(t)


class TemplateCache:
    """Templates by entry length (then by two discriminating bytes); bounded in number."""

    def __init__(self, *, max_templates: int = MAX_TEMPLATES, per_length: int = MAX_PER_LENGTH) -> None:
        self.by_length: dict[int, Bucket] = {}
        self.count = 0
        self._max = max_templates
        self._per_length = per_length
        self.all: list[Template] = []

    def match(self, data: bytes) -> tuple[Template, re.Match[bytes]] | None:
        bucket = self.by_length.get(len(data))
        if bucket is None:
            return None
        candidates = bucket.candidates(data)
        for i, t in enumerate(candidates):
            m = t.fullmatch(data)
            if m is not None:
                if i:
                    candidates.insert(0, candidates.pop(i))
                return t, m
        return None

    def learn(self, data: bytes, entry: Entry) -> Template | None:
        """Make (and keep, if there is room) a template from an entry parse_entry accepted."""
        template = build_template(data, entry)
        if template is None:
            return None
        self.all.append(template)
        if self.count >= self._max:
            return template  # kept until the next drain only; the cache stays bounded
        bucket = self.by_length.get(len(data))
        if bucket is None:
            bucket = self.by_length[len(data)] = Bucket()
        if bucket.add(template, self._per_length) is None:
            self.count += 1
        return template

    def drain(self) -> list[tuple[Template, int]]:
        """The templates matched since the last drain, with their counts (which restart at zero)."""
        used = [(t, t.hits) for t in self.all if t.hits]
        for t, _ in used:
            t.hits = 0
        self.all = [t for bucket in self.by_length.values() for t in bucket.templates]
        return used
