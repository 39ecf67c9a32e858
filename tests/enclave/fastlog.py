"""A long log made fast, for resume tests and `scripts/bench_resume.py`.

A call here is what `EnclaveCore._decide` does under the sequencer lock, without the parts that
do not touch a resume (token, Cedar, grant signature, a checkpoint per call): the real limit
book checks and charges, the real decision entry goes through the enclave's own `_log` (so the
enclave writes its snapshots itself), and the outcome follows at once. Storage keeps every leaf
hash (for proofs and compact ranges) but only the newest entries, as much as a resume reads.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cloister.enclave.core import EnclaveCore, LogAppend
from cloister.enclave.resume import MAX_CHUNK_ENTRIES, ResumeStart
from cloister.verify.entries import DecisionEntry, OutcomeEntry, SnapshotEntry, decimal_text, parse_entry
from cloister.verify.merkle import compact_range_hashes, inclusion_proof, leaf_hash, root_from_leaf_hashes
from tests.world import World

AGENT, ROLES, SERVER, TOOL = "refund-bot", ("refund-agent",), "refunds", "refund.create"


@dataclass
class TailLog:
    """A log's leaf hashes, and its newest `keep` entries (plus the ones a resume proves with)."""

    keep: int
    leaves: list[bytes] = field(default_factory=list)
    tail: deque[bytes] = field(default_factory=deque)
    pinned: dict[int, bytes] = field(default_factory=dict)  # key entries
    checkpoint: bytes = b""

    def __post_init__(self) -> None:
        self.tail = deque(maxlen=self.keep)

    @property
    def size(self) -> int:
        return len(self.leaves)

    def add(self, first: int, entries: Sequence[bytes]) -> None:
        assert first == self.size, f"gap: got {first}, have {self.size}"
        for data in entries:
            if b"\x61t\x63key" in data[:8]:
                self.pinned[self.size] = data
            self.leaves.append(leaf_hash(data))
            self.tail.append(data)

    def persist(self, a: LogAppend) -> None:
        self.add(a.first_index, a.entries[max(0, self.size - a.first_index) :])
        self.checkpoint = a.checkpoint.note

    def entry(self, index: int) -> bytes:
        if index in self.pinned:
            return self.pinned[index]
        offset = index - (self.size - len(self.tail))
        if offset < 0:
            raise IndexError(f"entry {index} is no longer kept")
        return self.tail[offset]

    def node(self, level: int, index: int) -> bytes:
        return root_from_leaf_hashes(self.leaves[index << level : (index + 1) << level])

    def snapshot_start(self) -> int | None:
        """S for the newest complete snapshot in the kept tail (as the relay's storage finds it)."""
        base = self.size - len(self.tail)
        for i in range(len(self.tail) - 1, -1, -1):
            data = self.tail[i]
            if b"\x61t\x68snapshot" not in data[:16]:
                continue
            e = parse_entry(data)
            if isinstance(e, SnapshotEntry) and e.part == 0 and base + i + e.parts <= self.size:
                return min(e.upto, e.open_from)
        return None

    def start(self, s: int) -> ResumeStart:
        n = self.size
        key_index = max(self.pinned)
        return ResumeStart(
            checkpoint=self.checkpoint,
            range_size=s,
            range_hashes=compact_range_hashes(s, self.node),
            key_entry=self.pinned[key_index],
            key_entry_index=key_index,
            key_entry_proof=inclusion_proof(key_index, n, self.node),
            boundary_entry=self.entry(s - 1) if s else b"",
            boundary_proof=inclusion_proof(s - 1, n, self.node) if s else [],
        )

    def chunks(self, s: int, per: int = MAX_CHUNK_ENTRIES) -> Iterator[tuple[int, list[bytes]]]:
        for first in range(s, self.size, per):
            yield first, [self.entry(i) for i in range(first, min(self.size, first + per))]


def from_world(w: World, keep: int) -> TailLog:
    log = TailLog(keep)
    log.add(0, w.log)
    log.checkpoint = w.checkpoints[-1]
    return log


def fast_call(core: EnclaveCore, log: TailLog, now_ms: int, amount: int, n: int, *, release: bool = True) -> bool:
    """One refund call at `now_ms` and its outcome; whether the limits allowed it."""
    ps, seq = core.policy, core.sequencer
    assert ps is not None and seq is not None
    args = {"customer_id": "c", "amount": amount}
    with seq.lock:
        check = ps.limits.check(AGENT, SERVER, TOOL, args, now_ms)
        charges = {k: decimal_text(v) for k, v in check.charges.items() if v}
        entry = DecisionEntry(
            time_ms=now_ms,
            agent=AGENT,
            roles=ROLES,
            issuer="cloister-dev",
            server=SERVER,
            tool=TOOL,
            args_sha256=hashlib.sha256(json.dumps(args).encode()).digest(),
            decision="allow" if check.ok else "deny",
            code="" if check.ok else "limit",
            reason="permitted" if check.ok else check.reason,
            policies=("refund-agents-create",) if check.ok else (),
            policy_sha256=ps.sha256,
            policy_version=ps.version,
            request_id=f"r{n}",
            grant_nonce=n.to_bytes(16, "big") if check.ok else None,
            grant_expiry_ms=now_ms + 60_000 if check.ok else None,
            charges=charges if check.ok else {},
        )
        first, encoded = core._log(seq, [entry])  # the enclave's own append: snapshots included
        if check.ok:
            ps.limits.charge(AGENT, SERVER, TOOL, check.charges, now_ms)
            outcome = OutcomeEntry(
                time_ms=now_ms, decision_index=first + len(encoded) - 1, result_sha256=None, error="", duration_us=9
            )
            _, encoded2 = core._log(seq, [outcome])
            encoded += encoded2
        if release:
            seq.release(first + len(encoded))  # as the parent acknowledges
    log.add(first, encoded)
    return check.ok


def seal(core: EnclaveCore, log: TailLog) -> None:
    """A checkpoint over everything, as the parent holds after a clean stop."""
    assert core.sequencer is not None
    log.checkpoint = core.sync(log.size).checkpoint.note
