"""Replay a whole log: recompute its tree from the entries, decode every entry, check the structure.

What a replay proves, given a verified checkpoint (size N, root R):

  1. Tree. Every entry bundle `tile/entries/<n>` is read and split (C2SP tlog-tiles); the leaf
     hashes (RFC 9162 §2.1.1) of the N entries and the tree above them are recomputed, and the
     root must equal R. Every stored hash tile, at every level, must equal the recomputed one: a
     tampered tile is reported with its path even when the entries are intact.
  2. Entries. Every entry decodes as a Cloister record (cloister.verify.entries.parse_entry, the
     one parser; cloister.audit.templates memoises it for entries that differ only in
     fixed-size fields).
  3. Structure across entries:
     - an outcome names an earlier decision that issued a grant (an allow, or a log-only deny),
       and no decision has two outcomes;
     - every key entry's attestation verifies against the trust root and the PCR expectations
       as of its own timestamp, binds that entry's log and grant keys for this log's origin, and
       its previous_size/previous_root are the log's own size and root just before it (None
       only for the entry that starts a new log, at index 0);
     - policy entries have increasing versions, and every decision names the policy version and
       bundle hash in force at its index (the latest policy entry before it);
     - the checkpoint is signed by the log key introduced by the last key entry before N;
     - every decision that issued a grant has an outcome, unless its outcome may still come: a
       decision whose grant expired more than OUTCOME_GRACE_MS before the log's last entry (the
       enclave refuses its outcome from then on) and has none is a problem ("missing outcome");
       one still within that window is counted as open;
     - response signatures (decision 0017): an outcome whose recorded response is "missing" or
       "invalid" (an attested server's result that is not shown to be its own) is a problem;
       every recorded signature is verified again (cloister.verify.response_sig) over its
       decision's grant nonce and its result hash, with the key a verified nitro server entry for
       that decision's server introduced earlier in the log;
     - snapshots (docs/decisions/0016): each part sits where it says (its first part at its
       `upto`, the others right after, one header), names the policy in force at its index, and
       its `open_from` is at or before every decision that was still open then and never got an
       outcome. (Its limit windows are not recomputed: that needs the bundles, which a replay
       does not have; the enclave's own tests check them against the live book.) A snapshot cut
       short (the enclave stopped mid-append) is not a problem: a resume does not use it.

Problems are collected (with the entry index, the tile path and the byte offset when known), not
raised, so that one replay reports everything it finds; the caller exits non-zero if there are
any. A fetch failure (network) aborts the replay: nothing can be concluded from a partial read.

Work is split into chunks of bundles, processed in worker processes when there is more than one
CPU and enough entries (`jobs`); a chunk returns its bundle roots and compact per-entry facts
that the main process merges in log order.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2

from cloister.audit.errors import FetchError, MissingData
from cloister.audit.source import MAX_ENTRY_BUNDLE, MAX_HASH_TILE, LogSource, SourceSpec, open_source, read_tile
from cloister.audit.templates import (
    KIND_DECISION_DENIED,
    KIND_DECISION_GRANTED,
    KIND_DENIALS,
    KIND_KEY,
    KIND_OUTCOME,
    KIND_POLICY,
    KIND_SERVER,
    KIND_SNAPSHOT,
    KIND_UNDECODABLE,
    KIND_UNKNOWN,
    RESPONSE_PROBLEM,
    RESPONSE_SIGNED,
    DecisionInfo,
    OutcomeInfo,
    Template,
    TemplateCache,
    decision_kind,
    response_flags,
)
from cloister.verify.entries import (
    DECISION_FIELDS,
    OUTCOME_GRACE_MS,
    DecisionEntry,
    DenialsEntry,
    Entry,
    KeyEntry,
    OutcomeEntry,
    PolicyEntry,
    ServerEntry,
    SnapshotEntry,
    parse_entry,
)
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import EMPTY_ROOT, CompactRange, compact_range_hashes, root_from_leaf_hashes
from cloister.verify.response_sig import ResponseCheck, ResponseStatus, response_verdict
from cloister.verify.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    entry_bundle_path,
    hash_tile_path,
    hash_tiles,
    parse_entry_bundle,
)

__all__ = [
    "KeyIntroduction",
    "PolicyChange",
    "Problem",
    "ReplayResult",
    "Summary",
    "replay_tree",
]

MAX_PROBLEMS = 200
MAX_MISSING_LISTED = 100  # indexes of decisions without an outcome kept for the report
DENIED_UNLOGGED = "deny (counted, not logged one by one)"
MAX_REASONS = 500
_KIND_NAMES = {
    KIND_UNKNOWN: "an entry that could not be read",
    KIND_DECISION_GRANTED: "a decision",
    KIND_DECISION_DENIED: "an enforced deny",
    KIND_OUTCOME: "an outcome",
    KIND_KEY: "a key entry",
    KIND_POLICY: "a policy entry",
    KIND_SERVER: "a server entry",
    KIND_UNDECODABLE: "an undecodable entry",
    KIND_DENIALS: "a count of denials",
    KIND_SNAPSHOT: "a snapshot",
}
MAX_SNAPSHOTS_CHECKED = 10_000  # snapshots whose open_from is checked at the end (one per 10,000 entries)


@dataclass(frozen=True)
class Problem:
    where: str  # "entry 17 (tile/entries/000, byte offset 4410)", "tile/1/000", "checkpoint"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Summary:
    decisions: Counter[str] = field(default_factory=Counter)  # allow / deny / deny (log-only)
    by_agent: Counter[str] = field(default_factory=Counter)
    by_tool: Counter[str] = field(default_factory=Counter)  # "server/tool"
    denials: Counter[str] = field(default_factory=Counter)  # by code
    deny_reasons: Counter[tuple[str, str]] = field(default_factory=Counter)  # (code, reason)
    outcomes: int = 0
    outcome_errors: int = 0
    payments: int = 0
    servers: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (server, kind, status)
    # Outcomes by their recorded response-signature status (decision 0017; "" before it), and how
    # many recorded signatures this replay verified again.
    responses: Counter[str] = field(default_factory=Counter)
    signatures_checked: int = 0
    fast_decodes: int = 0
    full_decodes: int = 0

    def merge(self, other: Summary) -> None:
        self.decisions.update(other.decisions)
        self.by_agent.update(other.by_agent)
        self.by_tool.update(other.by_tool)
        self.denials.update(other.denials)
        for key, n in other.deny_reasons.items():
            if key in self.deny_reasons or len(self.deny_reasons) < MAX_REASONS:
                self.deny_reasons[key] += n
            else:
                self.deny_reasons[(key[0], "(other reasons)")] += n
        self.outcomes += other.outcomes
        self.outcome_errors += other.outcome_errors
        self.payments += other.payments
        self.servers.update(other.servers)
        self.responses.update(other.responses)
        self.signatures_checked += other.signatures_checked
        self.fast_decodes += other.fast_decodes
        self.full_decodes += other.full_decodes

    def count_decision(self, info: DecisionInfo, n: int) -> None:
        label = info.decision if info.mode == "enforce" or info.decision == "allow" else "deny (log-only)"
        self.decisions[label] += n
        self.by_agent[info.agent or "(unauthenticated)"] += n
        self.by_tool[f"{info.server}/{info.tool}"] += n
        if info.decision == "deny":
            self.denials[info.code] += n

    def count_denials(self, entry: DenialsEntry) -> None:
        """Anonymous denials the enclave counted rather than logged one by one (decision 0009)."""
        self.decisions[DENIED_UNLOGGED] += entry.count
        self.by_agent["(unauthenticated)"] += entry.count
        self.denials.update(entry.codes)

    def count_outcome(self, info: OutcomeInfo, n: int) -> None:
        self.outcomes += n
        if info.error:
            self.outcome_errors += n
        if info.paid:
            self.payments += n
        self.responses[info.response] += n


@dataclass
class ChunkResult:
    """What one chunk of bundles [first, end) contributes, in log order."""

    first: int
    end: int
    entries: int = 0
    full_roots: list[bytes | None] = field(default_factory=list)  # Merkle level 8, one per full bundle
    leaves: dict[int, list[bytes]] = field(default_factory=dict)  # bundle -> leaf hashes (when asked)
    kinds: bytearray = field(default_factory=bytearray)  # one KIND_* per entry (decode mode)
    # Outcomes naming a decision of an earlier chunk, as flat (index, decision index) pairs; the
    # others are checked in the worker, which marks their decisions in `used`.
    outcomes: array[int] = field(default_factory=lambda: array("q"))
    used: bytearray = field(default_factory=bytearray)  # one byte per entry: 1 if an outcome closed it
    policy_runs: list[tuple[int, int, bytes]] = field(default_factory=list)  # (first index, version, sha)
    key_entries: list[tuple[int, bytes]] = field(default_factory=list)
    policy_entries: list[tuple[int, PolicyEntry]] = field(default_factory=list)
    snapshots: list[tuple[int, int, tuple[Any, ...]]] = field(default_factory=list)  # (index, part, header)
    summary: Summary = field(default_factory=Summary)
    problems: list[Problem] = field(default_factory=list)
    current_policy: tuple[int, bytes] | None = None  # the policy of the last decision (within the chunk)
    unreadable: list[int] = field(default_factory=list)  # first index of each bundle that could not be read
    # Decisions that issued a grant and that no outcome of this chunk closes, as flat
    # (index, grant expiry ms) pairs; a later chunk's outcome may still close them.
    unclosed: array[int] = field(default_factory=lambda: array("q"))
    last_time_ms: int | None = None  # the time of the tree's last entry, from the chunk that holds it
    # Response signatures (decision 0017): outcomes that carry one, by index (checked after the
    # chunk is decoded); those left for the main process (their decision is in an earlier chunk,
    # or the enclave recorded them unchecked) as (index, entry bytes); the verified nitro server
    # entries' keys as (index, server, key); and each (server, key) used, with its first outcome.
    signed: array[int] = field(default_factory=lambda: array("q"))
    deferred: list[tuple[int, bytes]] = field(default_factory=list)
    key_intros: list[tuple[int, str, bytes]] = field(default_factory=list)
    key_uses: dict[tuple[str, bytes], int] = field(default_factory=dict)


@dataclass(frozen=True)
class ScanPlan:
    spec: SourceSpec
    tree_size: int
    decode: bool
    want_leaves: frozenset[int]  # bundles whose leaf hashes must be returned
    # Verify recorded response signatures again (an Ed25519 verification and two entry parses per
    # signed outcome: the replay's main cost on a log of attested calls). Statuses are always checked.
    recheck_signatures: bool = True


# --- The worker side: one chunk of bundles ---------------------------------------------------

_worker_state: dict[str, Any] = {}


def _source_for(spec: SourceSpec) -> LogSource:
    cached = _worker_state.get("source")
    if cached is None or cached.spec != spec:
        cached = open_source(spec)
        _worker_state["source"] = cached
    return cached


def _templates() -> TemplateCache:
    cache = _worker_state.get("templates")
    if cache is None:
        cache = _worker_state["templates"] = TemplateCache()
    return cache


def _read_all(source: LogSource, requests: Sequence[tuple[str, int]]) -> list[bytes | Exception]:
    """Read each (path, cap); MissingData and DecodeError are returned, FetchError is raised."""

    def one(req: tuple[str, int]) -> bytes | Exception:
        try:
            return read_tile(source, req[0], req[1])
        except (MissingData, DecodeError) as exc:
            return exc

    if source.parallelism <= 1 or len(requests) <= 1:
        return [one(r) for r in requests]
    pool = _worker_state.get("pool")
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        pool = _worker_state["pool"] = ThreadPoolExecutor(max_workers=source.parallelism)
    return list(pool.map(one, requests))


def scan_chunk(plan: ScanPlan, first: int, end: int) -> ChunkResult:  # noqa: C901 (over the gate before it existed; split when next changed)
    """Bundles [first, end) of the tree: hashes, level-0 tile checks, and (decode mode) entry facts."""
    source = _source_for(plan.spec)
    n = plan.tree_size
    out = ChunkResult(first, end)
    requests: list[tuple[str, int]] = []
    widths = []
    for b in range(first, end):
        width = min(TILE_WIDTH, n - b * TILE_WIDTH)
        widths.append(width)
        requests.append((entry_bundle_path(b, width), MAX_ENTRY_BUNDLE))
        requests.append((hash_tile_path(0, b, width), MAX_HASH_TILE))
    data = _read_all(source, requests)
    templates = _templates() if plan.decode else None
    sha256 = hashlib.sha256
    for i, b in enumerate(range(first, end)):
        width = widths[i]
        bundle_path, tile_path = requests[2 * i][0], requests[2 * i + 1][0]
        raw, tile = data[2 * i], data[2 * i + 1]
        out.entries += width
        entries: list[bytes] | None = None
        if isinstance(raw, Exception):
            out.problems.append(Problem(bundle_path, _missing_or(raw)))
        else:
            try:
                entries = parse_entry_bundle(raw, width)
            except DecodeError as exc:
                out.problems.append(Problem(bundle_path, str(exc)))
        if entries is None:
            out.unreadable.append(b * TILE_WIDTH)
            if width == TILE_WIDTH:
                out.full_roots.append(None)
            if plan.decode:
                out.kinds.extend(bytes([KIND_UNKNOWN]) * width)
            continue
        # 1. Leaf hashes, checked against the stored level-0 tile.
        hashes = [sha256(b"\x00" + e).digest() for e in entries]
        if isinstance(tile, Exception):
            out.problems.append(Problem(tile_path, _missing_or(tile)))
        elif tile != b"".join(hashes):
            out.problems.append(Problem(tile_path, _tile_diff(tile, hashes, b * TILE_WIDTH, 0, bundle_path)))
        if width == TILE_WIDTH:
            level = hashes
            while len(level) > 1:
                level = [sha256(b"\x01" + level[j] + level[j + 1]).digest() for j in range(0, len(level), 2)]
            out.full_roots.append(level[0])
        if width < TILE_WIDTH or b in plan.want_leaves:
            out.leaves[b] = hashes
        # 2. Entries.
        if templates is not None:
            keys_before = len(out.key_entries)
            _decode_bundle(out, templates, entries, b, bundle_path)
            if len(out.key_entries) > keys_before:
                # A key entry's previous_root is checked against the root just before it.
                out.leaves[b] = hashes
    if templates is not None:
        for template, hits in templates.drain():
            if isinstance(template.info, DecisionInfo):
                out.summary.count_decision(template.info, hits)
            elif isinstance(template.info, OutcomeInfo):
                out.summary.count_outcome(template.info, hits)
        _local_outcomes(out, first * TILE_WIDTH)
        _unclosed_grants(out, plan, first, data, widths)
        if plan.recheck_signatures:
            _check_signatures(out, first * TILE_WIDTH, _BundleEntries(data, widths, first * TILE_WIDTH))
    return out


_GRANT_EXPIRY_KEY = DECISION_FIELDS["grant_expiry_ms"].key


def _grant_expiry(data: bytes) -> int:
    """The grant expiry of a decision entry this chunk's decode already checked. Read from the map
    alone: a second full parse_entry of each such entry halved the replay's speed on a million
    entries (9.4 µs instead of about 4 per entry, measured)."""
    m = cbor2.loads(data)
    expiry = m.get(_GRANT_EXPIRY_KEY) if isinstance(m, dict) else None
    if not isinstance(expiry, int):
        raise DecodeError("a decision that issued a grant has no grant expiry")  # not reached: decoded before
    return expiry


def _unclosed_grants(
    out: ChunkResult, plan: ScanPlan, first: int, data: Sequence[bytes | Exception], widths: Sequence[int]
) -> None:
    """Note the grant expiry of each decision no outcome in this chunk closes (few: those whose
    outcome is in a later chunk, and those that have none), and the time of the tree's last entry."""
    base = first * TILE_WIDTH
    kinds, used = out.kinds, out.used
    split: dict[int, list[bytes]] = {}

    def entries_of(i: int) -> list[bytes]:
        if i not in split:
            raw = data[2 * i]
            try:
                split[i] = [] if isinstance(raw, Exception) else parse_entry_bundle(raw, widths[i])
            except DecodeError:  # reported already
                split[i] = []
        return split[i]

    for k in range(len(kinds)):
        if kinds[k] != KIND_DECISION_GRANTED or used[k]:
            continue
        i, offset = divmod(k, TILE_WIDTH)
        out.unclosed.append(base + k)
        out.unclosed.append(_grant_expiry(entries_of(i)[offset]))
    if widths and base + sum(widths) == plan.tree_size:
        for data_entry in reversed(entries_of(len(widths) - 1)):
            try:
                out.last_time_ms = parse_entry(data_entry).time_ms
                break
            except DecodeError:
                continue


# --- Response signatures (decision 0017) ---------------------------------------------------------


def _response_flags(out: ChunkResult, flags: int, info: DecisionInfo | OutcomeInfo, index: int) -> None:
    if flags & RESPONSE_PROBLEM and isinstance(info, OutcomeInfo):
        why = (
            "carries no signature"
            if info.response == ResponseStatus.MISSING
            else "carries a signature that did not verify"
        )
        out.problems.append(
            Problem(
                f"entry {index}",
                f"outcome's response signature is {info.response}: the attested server's result {why}, so it "
                "is not shown to be the server's (a host may have answered the call itself or changed the answer)",
            )
        )
    if flags & RESPONSE_SIGNED:
        out.signed.append(index)


class _BundleEntries:
    """The entries of a chunk's bundles, split on first use, by log index."""

    def __init__(self, data: Sequence[bytes | Exception], widths: Sequence[int], base: int) -> None:
        self.data, self.widths, self.base = data, widths, base
        self.split: dict[int, list[bytes]] = {}

    def get(self, index: int) -> bytes | None:
        i, offset = divmod(index - self.base, TILE_WIDTH)
        if index < self.base or i >= len(self.widths):
            return None
        if i not in self.split:
            raw = self.data[2 * i]
            try:
                self.split[i] = [] if isinstance(raw, Exception) else parse_entry_bundle(raw, self.widths[i])
            except DecodeError:  # reported already
                self.split[i] = []
        bundle = self.split[i]
        return bundle[offset] if offset < len(bundle) else None


def signature_problem(outcome: OutcomeEntry, decision: Entry | None, key: bytes | None) -> str | None:
    """Verify an outcome's recorded response signature again, with its decision's grant nonce and
    `key` (the entry's own, or for an unchecked one the key the log introduced); what is wrong, or None."""
    if not isinstance(decision, DecisionEntry) or decision.grant_nonce is None or outcome.response_sig is None:
        return None  # an outcome without a granted decision is reported by the structure checks
    if not key:
        return (
            f"outcome has a response signature for server {decision.server!r}, but no verified nitro server "
            "entry introduced a response key for it before the decision"
        )
    check = ResponseCheck(
        required=True,
        response_key=key,
        nonce=decision.grant_nonce,
        result_hash=outcome.result_sha256,
        signature=outcome.response_sig,
    )
    again = response_verdict(check)
    recorded = outcome.response
    if recorded in (ResponseStatus.VERIFIED, ResponseStatus.UNCHECKED) and again is not ResponseStatus.VERIFIED:
        return (
            f"outcome's response signature (recorded {recorded}) does not verify with key {key.hex()[:16]}... "
            f"over decision {outcome.decision_index}'s grant nonce and the result hash"
        )
    if recorded == ResponseStatus.INVALID and again is ResponseStatus.VERIFIED:
        return "outcome's response signature was recorded invalid, but it verifies: the log contradicts itself"
    return None


def _check_signatures(out: ChunkResult, base: int, entries: _BundleEntries) -> None:
    """Verify again the signatures of this chunk's outcomes whose decision is in the chunk; leave
    the others (and those the enclave could not check) to the main process."""
    for j in out.signed:
        data = entries.get(j)
        if data is None:
            continue
        outcome = parse_entry(data)
        assert isinstance(outcome, OutcomeEntry)
        d = outcome.decision_index
        if outcome.response_key is None and outcome.response != ResponseStatus.UNCHECKED:
            continue  # invalid without a key (the server bound none): the status is the problem
        if outcome.response_key is None or not base <= d < j:
            out.deferred.append((j, data))
            continue
        raw = entries.get(d)
        decision = _parse_or_none(raw)
        problem = signature_problem(outcome, decision, outcome.response_key)
        out.summary.signatures_checked += 1
        if problem:
            out.problems.append(Problem(f"entry {j}", problem))
        if isinstance(decision, DecisionEntry):
            use = (decision.server, outcome.response_key)
            out.key_uses[use] = min(out.key_uses.get(use, j), j)


def _parse_or_none(data: bytes | None) -> Entry | None:
    if data is None:
        return None
    try:
        return parse_entry(data)
    except DecodeError:  # reported already
        return None


def _outcome_problem(j: int, d: int, kind: int, used: int) -> str | None:
    """Outcome `j` names decision `d`: it must be an earlier decision that issued a grant, closed once."""
    if d >= j:
        return f"outcome names decision {d}, which is not an earlier entry"
    if kind in (KIND_UNKNOWN, KIND_UNDECODABLE):
        return None  # that entry's own problem is reported already
    if kind != KIND_DECISION_GRANTED:
        what = _KIND_NAMES.get(kind, "an entry")
        return f"outcome names entry {d}, which is {what}, not a decision that issued a grant"
    if used:
        return f"second outcome for decision {d}"
    return None


def _local_outcomes(out: ChunkResult, base: int) -> None:
    """Check the outcomes whose decision is in this chunk (nearly all); pass the others on."""
    kinds = out.kinds
    used = out.used = bytearray(len(kinds))
    pairs = out.outcomes
    cross = out.outcomes = array("q")
    for k in range(0, len(pairs), 2):
        j, d = pairs[k], pairs[k + 1]
        if base <= d < j:
            if kinds[d - base] == KIND_DECISION_GRANTED and not used[d - base]:
                used[d - base] = 1
                continue
        elif d < base:
            cross.append(j)
            cross.append(d)
            continue
        local = base <= d < j
        problem = _outcome_problem(j, d, kinds[d - base] if local else KIND_UNKNOWN, used[d - base] if local else 0)
        if problem:
            out.problems.append(Problem(f"entry {j}", problem))
        elif local:
            used[d - base] = 1


def _missing_or(exc: Exception) -> str:
    if isinstance(exc, MissingData):
        return "missing: the log's storage does not have it, but the checkpoint covers it"
    return str(exc)


def _tile_diff(stored: bytes, computed: Sequence[bytes], first_leaf: int, tile_level: int, source_path: str) -> str:
    """Which hashes of a stored tile differ from the recomputed ones (a few, by index)."""
    width = len(computed)
    if len(stored) != width * 32:
        return f"is {len(stored)} bytes, but the tree needs {width} hashes of 32 bytes here ({width * 32} bytes)"
    bad = [j for j in range(width) if stored[32 * j : 32 * j + 32] != computed[j]]
    span = TILE_WIDTH**tile_level
    shown = ", ".join(
        f"hash {j} (byte offset {32 * j}, leaves {first_leaf + j * span}"
        + (f"..{first_leaf + (j + 1) * span - 1})" if span > 1 else ")")
        for j in bad[:3]
    )
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"{len(bad)} of its {width} hashes differ from those recomputed from {source_path}: {shown}{more}"


def _decode_bundle(
    out: ChunkResult, templates: TemplateCache, entries: list[bytes], bundle: int, bundle_path: str
) -> None:
    """Decode one bundle's entries: templates first, parse_entry for the rest (the hot loop)."""
    base = bundle * TILE_WIDTH
    kinds_append = out.kinds.append
    outcomes_append = out.outcomes.append
    runs = out.policy_runs
    reasons = out.summary.deny_reasons
    current = out.current_policy
    by_length = templates.by_length
    outcome_kind = KIND_OUTCOME
    slow = 0
    for i, data in enumerate(entries):
        t: Template | None = None
        m: re.Match[bytes] | None = None
        bucket = by_length.get(len(data))
        if bucket is not None:
            p1 = bucket.p1
            for c in bucket.templates if p1 < 0 else bucket.index.get(data[p1] << 8 | data[bucket.p2], ()):
                m = c.fullmatch(data)
                if m is not None:
                    t = c
                    break
        if t is None or m is None:
            # Not (yet) templated: the one parser decides.
            slow += 1
            try:
                entry = parse_entry(data)
            except DecodeError as exc:
                offset = sum(2 + len(e) for e in entries[:i])
                out.problems.append(
                    Problem(f"entry {base + i} ({bundle_path}, byte offset {offset})", f"does not decode: {exc}")
                )
                kinds_append(KIND_UNDECODABLE)
                continue
            out.summary.full_decodes += 1
            if not isinstance(entry, DecisionEntry | OutcomeEntry):
                _other_entry(out, entry, base + i, data)
                current = None  # a policy (or key) entry starts a new run of decisions
                continue
            t = templates.learn(data, entry)
            m = t.fullmatch(data) if t is not None else None
            if t is None or m is None:
                current = _count_direct(out, entry, base + i, current)
                continue
        t.hits += 1
        kind = t.kind
        kinds_append(kind)
        if kind == outcome_kind:
            outcomes_append(base + i)
            outcomes_append(int.from_bytes(m.group(t.decision_group), "big") if t.decision_group else t.decision_const)
            if t.response_flags:
                _response_flags(out, t.response_flags, t.info, base + i)
            continue
        policy = t.policy
        if policy is not current:
            if policy != current and policy is not None:
                runs.append((base + i, policy[0], policy[1]))
            current = policy
        if t.deny_code is not None:
            reasons[(t.deny_code, m.group(t.reason_group).decode("ascii") if t.reason_group else t.reason)] += 1
    out.current_policy = current
    out.summary.fast_decodes += len(entries) - slow


def _count_direct(
    out: ChunkResult, entry: DecisionEntry | OutcomeEntry, index: int, current: tuple[int, bytes] | None
) -> tuple[int, bytes] | None:
    """Facts of a decision or outcome that no template covers; returns the policy now current."""
    if isinstance(entry, OutcomeEntry):
        out.kinds.append(KIND_OUTCOME)
        out.outcomes.append(index)
        out.outcomes.append(entry.decision_index)
        facts = OutcomeInfo.of(entry)
        out.summary.count_outcome(facts, 1)
        flags = response_flags(facts)
        if flags:
            _response_flags(out, flags, facts, index)
        return current
    out.kinds.append(decision_kind(entry))
    info = DecisionInfo(
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
    out.summary.count_decision(info, 1)
    if entry.decision == "deny":
        out.summary.deny_reasons[(entry.code, entry.reason)] += 1
    if info.policy != current:
        out.policy_runs.append((index, *info.policy))
    return info.policy


def _other_entry(out: ChunkResult, entry: Any, index: int, data: bytes) -> None:
    if isinstance(entry, KeyEntry):
        out.kinds.append(KIND_KEY)
        out.key_entries.append((index, data))
    elif isinstance(entry, PolicyEntry):
        out.kinds.append(KIND_POLICY)
        out.policy_entries.append((index, entry))
    elif isinstance(entry, ServerEntry):
        out.kinds.append(KIND_SERVER)
        out.summary.servers[(entry.server, entry.kind, entry.status)] += 1
        if entry.kind == "nitro" and entry.status == "verified":
            # b"": verified, but bound no response key (no signature of it can verify).
            out.key_intros.append((index, entry.server, entry.response_key or b""))
    elif isinstance(entry, DenialsEntry):
        out.kinds.append(KIND_DENIALS)
        out.summary.count_denials(entry)
    elif isinstance(entry, SnapshotEntry):
        out.kinds.append(KIND_SNAPSHOT)
        out.snapshots.append((index, entry.part, entry.header()))
    else:  # a record type parse_entry knows and this replay does not: say so rather than skip it
        out.kinds.append(KIND_UNKNOWN)
        out.problems.append(Problem(f"entry {index}", f"record type {type(entry).__name__} is not audited"))


# --- The main side: merge chunks in order, then check the tree and the structure ------------


@dataclass(frozen=True)
class KeyIntroduction:
    index: int
    time_ms: int
    log_vkey: str
    pcr0: str
    previous_size: int | None
    verified: bool


@dataclass(frozen=True)
class PolicyChange:
    index: int
    time_ms: int
    version: int
    bundle_sha256: str
    signer: str
    mode: str


@dataclass
class ReplayResult:
    tree_size: int
    root: bytes | None  # recomputed; None if some bundle could not be read
    summary: Summary
    problems: list[Problem]
    problem_count: int
    keys: list[KeyIntroduction]
    policies: list[PolicyChange]
    last_key: Any = None  # EnclaveBinding of the last verified key entry before tree_size
    last_key_index: int | None = None
    prefix_roots: dict[int, bytes] = field(default_factory=dict)
    # Decisions that issued a grant and have no outcome: past their outcome window (problems, the
    # first MAX_MISSING_LISTED indexes listed), or still within it (open). `outcomes_as_of_ms` is
    # the time they were judged at: the log's last entry (None if unknown: then all count as open).
    missing_outcomes: int = 0
    missing_outcome_indexes: list[int] = field(default_factory=list)
    open_decisions: int = 0
    outcomes_as_of_ms: int | None = None


# Verifies one key entry (called by the main process): (index, KeyEntry, root before it) -> binding.
KeyChecker = Callable[[int, KeyEntry, bytes], Any]


class _Merger:
    def __init__(
        self,
        tree_size: int,
        decode: bool,
        check_key: KeyChecker | None,
        want_sizes: Sequence[int],
        leaves_wanted: frozenset[int],
    ) -> None:
        self.n = tree_size
        self.decode = decode
        self.check_key = check_key
        self.level8: list[bytes | None] = []
        self.leaves: dict[int, list[bytes]] = {}
        self.kinds = bytearray()
        self.used = bytearray()
        self.summary = Summary()
        self.problems: list[Problem] = []
        self.problem_count = 0
        self.policy: tuple[int, bytes] | None = None
        self.policy_index = -1
        self.keys: list[KeyIntroduction] = []
        self.policies: list[PolicyChange] = []
        self.last_key: Any = None
        self.last_key_index: int | None = None
        self.want_sizes = list(want_sizes)
        self.leaves_wanted = leaves_wanted
        self.prefix_roots: dict[int, bytes] = {}
        self.unreadable: list[int] = []  # first index of each bundle that could not be read
        self.unclosed: list[array[int]] = []
        self.last_time_ms: int | None = None
        # Response keys the log introduced, per server in index order; keys used, first use; and
        # the signed outcomes left to this process (decision 0017).
        self.key_intros: dict[str, list[tuple[int, bytes]]] = {}
        self.key_uses: dict[tuple[str, bytes], int] = {}
        self.deferred: list[tuple[int, bytes]] = []
        # Snapshots: the one whose parts are still arriving ((index, header, next part)), and the
        # complete ones' (index, time, open_from), for the open-decision check at the end.
        self.snapshot_parts: tuple[int, tuple[Any, ...], int] | None = None
        self.snapshots: list[tuple[int, int, int]] = []

    def _gap(self, start: int, end: int) -> bool:
        """Some entry in [start, end) could not be read (so what it would have changed is unknown)."""
        return any(start - TILE_WIDTH < u < end for u in self.unreadable)

    def problem(self, where: str, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(where, message))

    def merge(self, r: ChunkResult) -> None:
        for p in r.problems:
            self.problem(p.where, p.message)
        self.level8.extend(r.full_roots)
        self.leaves.update(r.leaves)
        self.unreadable += r.unreadable
        self.summary.merge(r.summary)
        if r.unclosed:
            self.unclosed.append(r.unclosed)
        if r.last_time_ms is not None:
            self.last_time_ms = r.last_time_ms
        for index, server, key in r.key_intros:
            self.key_intros.setdefault(server, []).append((index, key))
        for use, j in r.key_uses.items():
            self.key_uses[use] = min(self.key_uses.get(use, j), j)
        self.deferred += r.deferred
        if self.decode:
            self._structure(r)
        for s in self.want_sizes:
            if s not in self.prefix_roots and s <= r.end * TILE_WIDTH:
                root = self.prefix_root(s)
                if root is not None:
                    self.prefix_roots[s] = root
        # Leaf hashes are kept only as long as something still needs them.
        for b in list(self.leaves):
            if b < r.first and b not in self.leaves_wanted and b != (self.n - 1) // TILE_WIDTH:
                del self.leaves[b]

    def _structure(self, r: ChunkResult) -> None:
        kinds, used = self.kinds, self.used
        kinds.extend(r.kinds)
        used.extend(r.used)
        # Policy entries, runs of decisions and key entries, in index order.
        events: list[tuple[int, int, Any]] = [(i, 0, e) for i, e in r.policy_entries]
        events += [(i, 1, (v, sha)) for i, v, sha in r.policy_runs]
        events += [(i, 2, data) for i, data in r.key_entries]
        events += [(i, 3, (part, header)) for i, part, header in r.snapshots]
        events.sort(key=lambda ev: (ev[0], ev[1]))
        for index, what, payload in events:
            if what == 0:
                self._policy_entry(index, payload)
            elif what == 1:
                self._policy_run(index, payload)
            elif what == 2:
                self._key_entry(index, payload)
            else:
                self._snapshot(index, *payload)
        # Outcomes of decisions in earlier chunks.
        pairs = r.outcomes
        for k in range(0, len(pairs), 2):
            j, d = pairs[k], pairs[k + 1]
            problem = _outcome_problem(j, d, kinds[d], used[d])
            if problem:
                self.problem(f"entry {j}", problem)
            else:
                used[d] = 1

    def _policy_entry(self, index: int, entry: PolicyEntry) -> None:
        if self.policy is not None and entry.version <= self.policy[0]:
            self.problem(
                f"entry {index}",
                f"policy version {entry.version} does not increase on version "
                f"{self.policy[0]} (entry {self.policy_index})",
            )
        self.policy = (entry.version, entry.bundle_sha256)
        self.policy_index = index
        self.policies.append(
            PolicyChange(
                index=index,
                time_ms=entry.time_ms,
                version=entry.version,
                bundle_sha256=entry.bundle_sha256.hex(),
                signer=entry.signer,
                mode=entry.mode,
            )
        )

    def _policy_run(self, index: int, policy: tuple[int, bytes]) -> None:
        if self._gap(self.policy_index + 1, index):
            return  # a policy entry may be in the entries that could not be read (reported already)
        if self.policy is None:
            self.problem(
                f"entry {index}", f"a decision under policy version {policy[0]}, but no policy entry precedes it"
            )
        elif policy != self.policy:
            self.problem(
                f"entry {index}",
                f"a decision under policy version {policy[0]} "
                f"(bundle {policy[1].hex()[:16]}...), but version {self.policy[0]} (bundle "
                f"{self.policy[1].hex()[:16]}..., entry {self.policy_index}) is in force",
            )

    def _snapshot(self, index: int, part: int, header: tuple[Any, ...]) -> None:
        time_ms, upto, parts, open_from, version, sha = header
        where = f"entry {index}"
        current = self.snapshot_parts
        if part == 0:
            if upto != index:
                self.problem(where, f"a snapshot that says it sits at entry {upto}")
                return
            if version is not None and not self._gap(self.policy_index + 1, index) and (version, sha) != self.policy:
                shown = f"version {self.policy[0]}" if self.policy else "no policy"
                self.problem(where, f"a snapshot that names policy version {version}, but {shown} is in force")
            current = (index, header, 1)
        elif current is None or current[1] != header or index != current[0] + part or part != current[2]:
            self.problem(where, f"snapshot part {part} of {parts} that does not continue a snapshot begun before it")
            self.snapshot_parts = None
            return
        else:
            current = (current[0], header, part + 1)
        if current[2] < parts:
            self.snapshot_parts = current
            return
        self.snapshot_parts = None
        if len(self.snapshots) < MAX_SNAPSHOTS_CHECKED:
            self.snapshots.append((upto, time_ms, open_from))

    def _key_entry(self, index: int, data: bytes) -> None:
        entry = parse_entry(data)
        assert isinstance(entry, KeyEntry)
        verified = False
        pcr0 = ""
        before = self.prefix_root(index)
        if self.check_key is not None and before is not None:
            try:
                binding, pcr0 = self.check_key(index, entry, before)
                verified = True
                self.last_key, self.last_key_index = binding, index
            except (DecodeError, VerificationError) as exc:
                self.problem(f"entry {index}", f"key entry does not verify: {exc}")
                self.last_key, self.last_key_index = None, index
        elif before is None:
            self.problem(f"entry {index}", "key entry cannot be checked: the log before it could not be read")
            self.last_key, self.last_key_index = None, index
        self.keys.append(
            KeyIntroduction(
                index=index,
                time_ms=entry.time_ms,
                log_vkey=entry.log_vkey,
                pcr0=pcr0,
                previous_size=entry.previous_size,
                verified=verified,
            )
        )

    def prefix_root(self, size: int) -> bytes | None:
        """The root of the first `size` leaves, from recomputed hashes; None if some are unknown."""
        if size == 0:
            return EMPTY_ROOT
        try:
            return CompactRange.from_hashes(size, compact_range_hashes(size, self._node)).root()
        except _Unknown:
            return None

    def _node(self, level: int, index: int) -> bytes:
        if level >= TILE_HEIGHT:
            span = level - TILE_HEIGHT
            part = self.level8[index << span : (index + 1) << span]
            if len(part) != 1 << span or any(h is None for h in part):
                raise _Unknown
            return root_from_leaf_hashes(part)  # type: ignore[arg-type]
        first = index << level
        bundle, offset = divmod(first, TILE_WIDTH)
        hashes = self.leaves.get(bundle)
        if not hashes or len(hashes) < offset + (1 << level):
            raise _Unknown
        return root_from_leaf_hashes(hashes[offset : offset + (1 << level)])


class _Unknown(Exception):
    """A hash the replay could not recompute (its bundle was missing or malformed)."""


def _chunks(bundles: int, size: int) -> Iterator[tuple[int, int]]:
    for first in range(0, bundles, size):
        yield first, min(first + size, bundles)


def replay_tree(
    spec: SourceSpec,
    tree_size: int,
    *,
    decode: bool = True,
    check_key: KeyChecker | None = None,
    want_sizes: Sequence[int] = (),
    jobs: int = 1,
    chunk_bundles: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    now_ms: int | None = None,
    recheck_signatures: bool = True,
) -> ReplayResult:
    """Recompute the tree of `tree_size` leaves from `spec`, decode and check every entry.

    `check_key(index, entry, root_before)` verifies a key entry and returns (binding, PCR0 hex),
    raising DecodeError/VerificationError. `want_sizes` are sizes whose prefix roots to report
    (e.g. the remembered checkpoint's size). `jobs` > 1 uses that many worker processes.
    Outcomes are judged as of the log's last entry, or `now_ms` if that is earlier.
    `recheck_signatures=False` skips verifying recorded response signatures again (decision 0017).
    """
    bundles = -(-tree_size // TILE_WIDTH)
    leaves_wanted = frozenset(s // TILE_WIDTH for s in want_sizes if s % TILE_WIDTH)
    plan = ScanPlan(
        spec=spec,
        tree_size=tree_size,
        decode=decode,
        want_leaves=leaves_wanted,
        recheck_signatures=recheck_signatures,
    )
    merger = _Merger(tree_size, decode, check_key, want_sizes, leaves_wanted)
    if chunk_bundles is None:
        chunk_bundles = max(1, min(64, bundles // max(1, jobs * 8)))
    done = 0
    if progress:
        progress(0, tree_size)
    for result in _run_chunks(plan, bundles, chunk_bundles, jobs):
        merger.merge(result)
        done += result.entries
        if progress:
            progress(done, tree_size)
    root = merger.prefix_root(tree_size)
    _check_upper_tiles(open_source(spec), tree_size, merger)
    if decode and recheck_signatures:
        _check_response_keys(open_source(spec), tree_size, merger)
    as_of = merger.last_time_ms if now_ms is None or merger.last_time_ms is None else min(now_ms, merger.last_time_ms)
    missing, open_count = _missing_outcomes(merger, as_of)
    if decode:
        _check_snapshot_opens(merger)
    return ReplayResult(
        tree_size=tree_size,
        root=root,
        summary=merger.summary,
        problems=merger.problems,
        problem_count=merger.problem_count,
        keys=merger.keys,
        policies=merger.policies,
        last_key=merger.last_key,
        last_key_index=merger.last_key_index,
        prefix_roots=merger.prefix_roots,
        missing_outcomes=len(missing),
        missing_outcome_indexes=missing[:MAX_MISSING_LISTED],
        open_decisions=open_count,
        outcomes_as_of_ms=as_of,
    )


def _missing_outcomes(merger: _Merger, as_of_ms: int | None) -> tuple[list[int], int]:
    """Decisions that issued a grant and that no outcome closed: those whose outcome window (grant
    expiry + OUTCOME_GRACE_MS) ended before `as_of_ms` are problems; the others are open."""
    missing: list[int] = []
    open_count = 0
    for pairs in merger.unclosed:
        for k in range(0, len(pairs), 2):
            index, expiry_ms = pairs[k], pairs[k + 1]
            if merger.used[index]:
                continue  # closed by an outcome in a later chunk
            # An outcome may sit in entries that could not be read (reported already): not judged.
            if as_of_ms is None or expiry_ms + OUTCOME_GRACE_MS >= as_of_ms or merger._gap(index + 1, merger.n):
                open_count += 1
                continue
            missing.append(index)
            merger.problem(
                f"entry {index}",
                f"allowed decision {index} has no outcome, and none can come: its grant expired at "
                f"{_iso(expiry_ms)}, more than {OUTCOME_GRACE_MS // 60_000} minutes before the log's last "
                f"entry ({_iso(as_of_ms)})",
            )
    return missing, open_count


def _key_before(merger: _Merger, server: str, index: int) -> bytes | None:
    """The response key of the last verified nitro entry for `server` before `index` (b"" if that
    entry bound none; None if there is none)."""
    key = None
    for i, k in merger.key_intros.get(server, ()):
        if i >= index:
            break
        key = k
    return key


def _check_response_keys(source: LogSource, tree_size: int, merger: _Merger) -> None:
    """The signed outcomes the workers left (their decision in an earlier chunk, or recorded
    unchecked), and that every key an outcome was checked against was introduced, for that
    outcome's server, by a verified nitro server entry before the outcome."""
    bundles: dict[int, list[bytes]] = {}

    def entry_at(index: int) -> Entry | None:
        b, offset = divmod(index, TILE_WIDTH)
        if b not in bundles:
            width = min(TILE_WIDTH, tree_size - b * TILE_WIDTH)
            try:
                bundles[b] = parse_entry_bundle(read_tile(source, entry_bundle_path(b, width), MAX_ENTRY_BUNDLE), width)
            except (MissingData, DecodeError):  # reported already
                bundles[b] = []
        return _parse_or_none(bundles[b][offset]) if offset < len(bundles[b]) else None

    for j, data in merger.deferred:
        outcome = parse_entry(data)
        assert isinstance(outcome, OutcomeEntry)
        decision = entry_at(outcome.decision_index) if outcome.decision_index < j else None
        if not isinstance(decision, DecisionEntry):
            continue  # reported by the structure checks
        # An unchecked signature (a decision reopened after a restart) was made by the server
        # that took the call: the key it had proven when the call was decided.
        key = outcome.response_key or _key_before(merger, decision.server, outcome.decision_index)
        merger.summary.signatures_checked += 1
        problem = signature_problem(outcome, decision, key)
        if problem:
            merger.problem(f"entry {j}", problem)
        if outcome.response_key is not None:
            use = (decision.server, outcome.response_key)
            merger.key_uses[use] = min(merger.key_uses.get(use, j), j)
    for (server, key), j in sorted(merger.key_uses.items(), key=lambda kv: kv[1]):
        introduced = [i for i, k in merger.key_intros.get(server, ()) if k == key]
        if not introduced or introduced[0] >= j:
            merger.problem(
                f"entry {j}",
                f"outcome's response signature was checked with key {key.hex()[:16]}..., which no verified nitro "
                f"server entry for {server!r} introduced before it",
            )


def _check_snapshot_opens(merger: _Merger) -> None:
    """A snapshot's `open_from` is at or before every decision still open at it: one that issued a
    grant, never got an outcome, and whose outcome window had not ended at the snapshot's time.
    (A decision closed later is not checked: the replay keeps no index of where outcomes sit.)"""
    if not merger.snapshots:
        return
    never: list[tuple[int, int]] = []  # (decision index, grant expiry) of decisions no outcome closed
    for pairs in merger.unclosed:
        for k in range(0, len(pairs), 2):
            if not merger.used[pairs[k]]:
                never.append((pairs[k], pairs[k + 1]))
    for upto, time_ms, open_from in merger.snapshots:
        for index, expiry_ms in never:
            if open_from <= index:
                break  # `never` is in index order
            if index < upto and expiry_ms + OUTCOME_GRACE_MS > time_ms and not merger._gap(index + 1, merger.n):
                merger.problem(
                    f"entry {upto}",
                    f"the snapshot says no decision before entry {open_from} may still get an outcome, but "
                    f"decision {index} could (its grant expired at {_iso(expiry_ms)})",
                )
                break


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"


MIN_BUNDLES_FOR_PROCESSES = 64  # below ~16k entries, starting worker processes costs more than it saves


def _run_chunks(plan: ScanPlan, bundles: int, chunk_bundles: int, jobs: int) -> Iterator[ChunkResult]:
    if jobs <= 1 or bundles < MIN_BUNDLES_FOR_PROCESSES:
        for first, end in _chunks(bundles, chunk_bundles):
            yield scan_chunk(plan, first, end)
        return
    import multiprocessing
    import threading
    from collections import deque
    from concurrent.futures import Future, ProcessPoolExecutor

    # fork starts workers at once, but is only safe when this process has no other thread (a lock
    # held by one would stay locked in the child forever); otherwise spawn.
    method = "fork" if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(method)) as pool:
        pending: deque[Future[ChunkResult]] = deque()
        try:
            for first, end in _chunks(bundles, chunk_bundles):
                pending.append(pool.submit(scan_chunk, plan, first, end))
                # A bounded window keeps memory flat and results in order.
                while len(pending) >= jobs * 3:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _check_upper_tiles(source: LogSource, tree_size: int, merger: _Merger) -> None:
    """Every stored hash tile above level 0 must equal the one recomputed from the entries."""
    levels: dict[int, list[bytes | None]] = {1: merger.level8}
    for tile in hash_tiles(tree_size):
        if tile.level == 0:
            continue
        hashes = levels.get(tile.level)
        if hashes is None:
            below = levels[tile.level - 1]
            hashes = []
            for g in range(0, len(below) - TILE_WIDTH + 1, TILE_WIDTH):
                group = below[g : g + TILE_WIDTH]
                hashes.append(None if any(h is None for h in group) else root_from_leaf_hashes(group))  # type: ignore[arg-type]
            levels[tile.level] = hashes
        computed = hashes[tile.index * TILE_WIDTH : tile.index * TILE_WIDTH + tile.width]
        path = tile.path()
        if any(h is None for h in computed):
            continue  # the bundles below it are already reported
        try:
            stored = read_tile(source, path, MAX_HASH_TILE)
        except (MissingData, DecodeError) as exc:
            merger.problem(path, _missing_or(exc))
            continue
        except FetchError:
            raise
        if stored != b"".join(computed):  # type: ignore[arg-type]
            first_leaf = tile.index * TILE_WIDTH * TILE_WIDTH**tile.level
            merger.problem(path, _tile_diff(stored, computed, first_leaf, tile.level, "the entry bundles"))  # type: ignore[arg-type]
