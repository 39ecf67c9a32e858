"""Resuming a stored log in a fresh enclave, without trusting the parent's storage.

A new enclave has a new grant key, and its log key is the origin's one sealed log key
(decision 0014; `EnclaveCore.resume_log` also requires the key entry below to carry it). The
checks here do not rely on that: they trust the old checkpoints by measurement. The key that
signed the latest checkpoint was introduced by a key entry whose attestation document binds
it, and that document must carry this image's PCR0 (or a predecessor's pinned in the measured
config).

The entries [S, N) arrive in chunks (docs/decisions/0016-snapshots-and-chunked-resume.md), and
`ResumeVerifier` never holds them all: it hashes each into the compact range as it comes and
keeps only what a resume needs (the newest snapshot's windows, the charges after it, the
decisions that may still get an outcome), each bounded. The steps:

  1. the key entry parses, and its attestation verifies against the pinned trust root,
     as of its own timestamp (it may be old), with an accepted PCR0;
  2. the document's user_data binds exactly that log key, for this log's origin;
  3. the checkpoint is a C2SP signed note by that key, for this origin (C2SP tlog-checkpoint);
  4. the key entry is included in the checkpoint (RFC 9162 §2.1.3.2);
  5. when S > 0, the entry at S - 1 is included too (RFC 9162 §2.1.3.2): its time tells how far
     back the supplied history reaches;
  6. chunk by chunk, in order (each starts where the last ended, none reaches past N), every
     entry is hashed into the compact range at S (RFC 9162 §2.1.1) and parsed;
  7. at the end, the range has size N and reproduces the checkpoint's root, so the supplied
     entries are exactly the log's tail, snapshots included;
  8. the newest complete snapshot among them (its parts consecutive from its `upto`, one
     header; one cut short is not used) gives the limit windows; only the charges after it are replayed, and the history
     must start at or before its `open_from` (the oldest decision that could still get an
     outcome). Without a snapshot, the history must reach back past the longest limit window
     (checked when the first bundle is loaded, against the time of entry S - 1).

Any failure refuses the resume: the enclave would rather stop than extend a log it cannot
prove it is continuing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cloister.enclave.config import EnclaveConfig
from cloister.enclave.limits import Charge, charge_of
from cloister.verify.attestation import DOCUMENT_TIME
from cloister.verify.checkpoint import Checkpoint, verify_checkpoint
from cloister.verify.enclave_identity import parse_binding
from cloister.verify.entries import (
    MAX_SNAPSHOT_KEYS,
    OUTCOME_GRACE_MS,
    DecisionEntry,
    KeyEntry,
    OutcomeEntry,
    SnapshotEntry,
    SnapshotWindow,
    parse_entry,
)
from cloister.verify.errors import CloisterError, DecodeError, VerificationError
from cloister.verify.merkle import CompactRange, leaf_hash, verify_inclusion

# Charges replayed at resume, at most: those after the newest snapshot (a snapshot comes every
# SNAPSHOT_INTERVAL entries), or, for a log written before snapshots, those of the whole window.
MAX_RESUME_CHARGES = 200_000
# Entries per chunk, at most (each chunk is one gRPC message, under MAX_MESSAGE_BYTES).
MAX_CHUNK_ENTRIES = 4096


class ResumeRefused(CloisterError):
    """The stored log could not be proven to be this log; the enclave refuses to continue it."""


@dataclass(frozen=True)
class ResumeStart:
    """Everything but the entries: the first message of a resume."""

    checkpoint: bytes
    range_size: int
    range_hashes: Sequence[bytes]
    key_entry: bytes
    key_entry_index: int
    key_entry_proof: Sequence[bytes]
    boundary_entry: bytes
    boundary_proof: Sequence[bytes]


@dataclass(frozen=True)
class Reopened:
    """An allowed decision that may still get its outcome."""

    agent: str
    roles: frozenset[str]
    server: str
    tool: str
    expires_ms: int
    nonce: bytes = b""  # the grant's nonce: what the upstream's response signature covers (decision 0017)


@dataclass(frozen=True)
class Snapshot:
    index: int  # of its first part (its `upto`)
    time_ms: int
    open_from: int
    windows: tuple[SnapshotWindow, ...]


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Checkpoint
    note: bytes
    tree: CompactRange
    history_start: int  # S
    snapshot: Snapshot | None  # the newest complete snapshot in [S, N)
    charges: tuple[Charge, ...]  # allowed decisions' charges after it (all of [S, N) without one)
    open: OrderedDict[int, Reopened]  # by index, oldest first
    # Time of the entry before S (ms), or None when the history reaches back to the first entry
    # or a snapshot summarises what came before.
    history_floor_ms: int | None


def _refuse(exc: DecodeError | VerificationError) -> ResumeRefused:
    return ResumeRefused(f"cannot resume the stored log: {exc}")


class _SnapshotParts:
    """The parts of one snapshot as they arrive."""

    def __init__(self, first: SnapshotEntry, index: int) -> None:
        self.header = first.header()
        self.index = index
        self.windows: list[SnapshotWindow] = list(first.windows)
        self.next_part = 1

    def add(self, part: SnapshotEntry, index: int) -> bool:
        """Whether `part` continues this snapshot (consecutive, one header, within the key cap)."""
        if part.header() != self.header or part.part != self.next_part or index != self.index + part.part:
            return False
        if len(self.windows) + len(part.windows) > MAX_SNAPSHOT_KEYS:
            return False
        self.windows.extend(part.windows)
        self.next_part += 1
        return True

    @property
    def complete(self) -> bool:
        return self.next_part == self.header[2]

    def finish(self) -> Snapshot | None:
        if len({(lid, key) for lid, key, _ in self.windows}) != len(self.windows):
            return None  # a window named twice: not a snapshot this enclave wrote
        time_ms, _, _, open_from, _, _ = self.header
        return Snapshot(index=self.index, time_ms=time_ms, open_from=open_from, windows=tuple(self.windows))


class ResumeVerifier:
    """Steps 1-5 when made, 6 for each chunk (`feed`), 7-8 at `finish`."""

    def __init__(
        self, *, config: EnclaveConfig, own_pcr0: bytes, start: ResumeStart, now_ms: int, max_open: int
    ) -> None:
        self._now_ms = now_ms
        self._max_open = max_open
        try:
            self._cp, self._floor = _verify_start(config, own_pcr0, start)
            self._tree = CompactRange.from_hashes(start.range_size, start.range_hashes)
        except (DecodeError, VerificationError) as exc:
            raise _refuse(exc) from exc
        self._note = start.checkpoint
        self._start = start.range_size
        self._snapshot: Snapshot | None = None
        self._parts: _SnapshotParts | None = None
        self._charges: list[Charge] = []
        self._overflow = False  # more charges than MAX_RESUME_CHARGES since the last snapshot
        self._open: OrderedDict[int, Reopened] = OrderedDict()

    def feed(self, first_index: int, entries: Sequence[bytes]) -> None:
        # 6. In order, nothing past the checkpoint, each entry hashed into the range and parsed.
        if first_index != self._tree.size:
            raise ResumeRefused(f"a chunk starts at entry {first_index}, but entry {self._tree.size} comes next")
        if len(entries) > MAX_CHUNK_ENTRIES:
            raise ResumeRefused(f"a chunk of {len(entries)} entries; at most {MAX_CHUNK_ENTRIES} are accepted")
        if self._tree.size + len(entries) > self._cp.size:
            raise ResumeRefused(
                f"entries up to {self._tree.size + len(entries)} were sent for a checkpoint of size {self._cp.size}"
            )
        for data in entries:
            index = self._tree.size
            self._tree.append(leaf_hash(data))
            try:
                entry = parse_entry(data)
            except DecodeError as exc:
                raise ResumeRefused(f"cannot resume the stored log: entry {index}: {exc}") from exc
            self._take(index, entry)

    def _take(self, index: int, entry: object) -> None:
        if isinstance(entry, SnapshotEntry):
            self._snapshot_part(index, entry)
            return
        self._parts = None  # a snapshot cut short (the enclave stopped mid-append) is not used
        if isinstance(entry, DecisionEntry):
            expiry = entry.grant_expiry_ms
            if expiry is not None and expiry + OUTCOME_GRACE_MS > self._now_ms:
                self._open[index] = Reopened(
                    entry.agent, frozenset(entry.roles), entry.server, entry.tool, expiry, entry.grant_nonce or b""
                )
                while len(self._open) > self._max_open:
                    self._open.popitem(last=False)  # as the live enclave drops the oldest
            charge = charge_of(entry)
            if charge is not None:
                if len(self._charges) < MAX_RESUME_CHARGES:
                    self._charges.append(charge)
                else:
                    self._overflow = True
        elif isinstance(entry, OutcomeEntry):
            self._open.pop(entry.decision_index, None)

    def _snapshot_part(self, index: int, part: SnapshotEntry) -> None:
        """Collect a snapshot's parts. One that is incomplete or inconsistent (which the checks of
        step 7 leave possible only if the enclave stopped mid-append) is not used: the snapshot
        before it, or the history, stands. Using less never loosens a cap."""
        if part.part == 0:
            self._parts = _SnapshotParts(part, index) if part.upto == index else None
        elif self._parts is not None and not self._parts.add(part, index):
            self._parts = None
        if self._parts is None or not self._parts.complete:
            return
        snap, self._parts = self._parts.finish(), None
        if snap is not None:
            # The newest snapshot replaces what came before it; the charges after it count.
            self._snapshot = snap
            self._charges, self._overflow = [], False

    def finish(self) -> ResumePoint:
        # 7. Exactly the tail: size N, and the checkpoint's root.
        if self._tree.size != self._cp.size:
            raise ResumeRefused(
                f"range size {self._start} + {self._tree.size - self._start} entries != checkpoint size {self._cp.size}"
            )
        if self._tree.root() != self._cp.root_hash:
            raise ResumeRefused("the stored compact range and entries do not hash to the checkpoint's root")
        # 8. The snapshot, when there is one, and the history it needs.
        snap = self._snapshot
        if snap is not None and snap.open_from < self._start:
            raise ResumeRefused(
                f"the history starts at entry {self._start}, after entry {snap.open_from}: a decision the snapshot at "
                f"entry {snap.index} says may still get an outcome"
            )
        if self._overflow:
            raise ResumeRefused(
                f"more than {MAX_RESUME_CHARGES} charged decisions to replay "
                + (f"after the snapshot at entry {snap.index}" if snap else "and no snapshot")
                + "; the enclave will not hold them"
            )
        return ResumePoint(
            checkpoint=self._cp,
            note=self._note,
            tree=self._tree,
            history_start=self._start,
            snapshot=snap,
            charges=tuple(self._charges),
            open=self._open,
            history_floor_ms=None if snap is not None else self._floor,
        )


def _verify_start(config: EnclaveConfig, own_pcr0: bytes, start: ResumeStart) -> tuple[Checkpoint, int | None]:
    # Local import: attestation verification pulls in x509 code the decision path never needs.
    from cloister.verify.attestation import AttestationPolicy, verify_attestation

    # 1. The key entry and its attestation, as of the document's own time.
    intro = parse_entry(start.key_entry)
    if not isinstance(intro, KeyEntry):
        raise ResumeRefused(f"entry {start.key_entry_index} given as the key entry is a {type(intro).__name__}")
    policy = AttestationPolicy(root=config.trust_root, at=DOCUMENT_TIME, allow_debug=config.allow_debug)
    doc = verify_attestation(intro.attestation, policy)
    pcr0 = doc.pcrs.get(0, b"")
    if pcr0 != own_pcr0 and pcr0 not in config.predecessor_pcr0:
        raise ResumeRefused(
            f"the log was last signed by an enclave with PCR0 {pcr0.hex()[:24]}..., which is neither this image "
            "nor a predecessor pinned in the enclave config"
        )
    # 2. The document binds exactly this log key, for this origin.
    binding = parse_binding(doc.user_data)
    if binding.log_key != intro.log_key or binding.origin != config.origin:
        raise ResumeRefused("the key entry's attestation does not bind its log key for this origin")
    # 3. The checkpoint is signed by that key, for this origin.
    cp = verify_checkpoint(start.checkpoint, [binding.log_verifier()], origin=config.origin).checkpoint
    # 4. The key entry is in the checkpointed tree.
    verify_inclusion(leaf_hash(start.key_entry), start.key_entry_index, cp.size, start.key_entry_proof, cp.root_hash)
    if start.range_size > cp.size:
        raise ResumeRefused(f"range size {start.range_size} is beyond the checkpoint's size {cp.size}")
    # 5. How far back the supplied history reaches.
    floor: int | None = None
    if start.range_size > 0:
        b = start.boundary_entry
        verify_inclusion(leaf_hash(b), start.range_size - 1, cp.size, start.boundary_proof, cp.root_hash)
        floor = parse_entry(b).time_ms
    return cp, floor


def verify_resume(
    *,
    config: EnclaveConfig,
    own_pcr0: bytes,
    start: ResumeStart,
    chunks: Iterable[tuple[int, Sequence[bytes]]],
    now_ms: int,
    max_open: int,
) -> ResumePoint:
    """Steps 1-8 over `chunks` ((first index, entries), in order), consumed as they come."""
    verifier = ResumeVerifier(config=config, own_pcr0=own_pcr0, start=start, now_ms=now_ms, max_open=max_open)
    try:
        for first, entries in chunks:
            verifier.feed(first, entries)
    except DecodeError as exc:  # a malformed chunk message
        raise _refuse(exc) from exc
    return verifier.finish()
