"""Witnessed continuation: the enclave grants only on a log a quorum of witnesses is keeping up with.

A host that owns the parent's storage can put back an old copy of the log, or start a second
enclave of the same image on a copy: either way the enclave is handed a validly signed log that
is not the newest. Nothing inside the enclave can tell (it has no memory across starts and no
network). C2SP witnesses can: a witness cosigns a checkpoint only if it is consistent with, and
not smaller than, the largest tree it has cosigned for that origin (c2sp.org/tlog-witness,
add-checkpoint: 409 for a stale old size, 422 for a fork). So (docs/decisions/0015):

  1. Every start appends a key entry (fresh grant key, fresh attestation document): the tree
     that includes it exists nowhere before this start. Until a quorum of the witnesses pinned in
     the measured config cosigned a checkpoint of this run at or beyond that entry, nothing is
     granted. A rolled-back or forked copy cannot get that quorum: the witnesses have seen more.
  2. After that, the enclave stops granting when its log runs more than `max_entries` entries, or
     holds an uncosigned checkpoint for longer than `max_ms`, ahead of the newest quorum-cosigned
     checkpoint. That bounds what a later rollback could erase: at most that many entries, that
     recent.

A cosigned checkpoint counts only if this enclave signed it in this run (same size, same root):
a checkpoint of an erased branch, signed by the same sealed key in an earlier run and cosigned
then, proves nothing about this run. Cosignature timestamps are not used; freshness comes from
the start entry, not from clocks.

Pure: time is passed in; the gRPC layer and the relay do the talking (`EnclaveCore.add_cosignatures`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cloister.enclave.config import WitnessRequirement
from cloister.verify.checkpoint import parse_checkpoint
from cloister.verify.cosignature import verify_cosignatures
from cloister.verify.errors import CloisterError, VerificationError
from cloister.verify.note import parse_note

# Checkpoints of this run remembered for matching cosignatures: more than the entries bound can
# produce (each checkpoint covers at least one new entry), oldest dropped first.
MAX_TRACKED = 4096
MAX_COSIGNED_NOTE = 64 * 1024


class Unwitnessed(CloisterError):
    """The enclave will not grant: the witnesses have not cosigned its start, or lag too far behind."""


@dataclass(frozen=True)
class GateStatus:
    required: bool
    start_size: int
    witnessed_size: int
    granting: bool
    reason: str

    def json(self) -> dict[str, Any]:
        return {
            "required": self.required,
            "start_size": self.start_size,
            "witnessed_size": self.witnessed_size,
            "granting": self.granting,
            "reason": self.reason,
        }


class WitnessGate:
    """The witness state of one enclave run; thread-safe (its own lock), no I/O."""

    def __init__(self, requirement: WitnessRequirement, origin: str, start_size: int) -> None:
        self._req = requirement
        self._origin = origin
        self.start_size = start_size  # the log's size once this run's key entry is in
        self._lock = threading.Lock()
        self._signed: OrderedDict[int, tuple[bytes, int]] = OrderedDict()  # size -> (root, signed at ms)
        self.witnessed_size = 0
        self._witnessed_root = b""  # so the same cosigned checkpoint may be handed over again

    def signed(self, size: int, root: bytes, now_ms: int) -> None:
        """Remember a checkpoint this run signed (the sequencer calls this for every one)."""
        with self._lock:
            if size <= self.witnessed_size or size in self._signed:
                return
            self._signed[size] = (root, now_ms)
            while len(self._signed) > MAX_TRACKED:
                self._signed.popitem(last=False)

    def accept(self, note: bytes) -> int:
        """Take a cosigned checkpoint; the witnessed size after it. Raises VerificationError (or
        DecodeError) when it is not a quorum-cosigned checkpoint of this run."""
        policy = self._req.cosignatures
        if policy is None:
            raise VerificationError("this enclave is configured without witnesses (unsafe_unwitnessed)")
        # 1. A bounded C2SP signed note whose text is a checkpoint of this log (tlog-checkpoint).
        if len(note) > MAX_COSIGNED_NOTE:
            raise VerificationError(f"cosigned checkpoint is {len(note)} bytes; at most {MAX_COSIGNED_NOTE}")
        cp = parse_checkpoint(parse_note(note).text)
        if cp.origin != self._origin:
            raise VerificationError(f"cosigned checkpoint is for origin {cp.origin[:80]!r}, not this log's")
        # 2. This run signed exactly this tree (an earlier run's, or an erased branch's, does not count).
        with self._lock:
            mine = self._signed.get(cp.size)
            if cp.size == self.witnessed_size and cp.root_hash == self._witnessed_root:
                mine = (cp.root_hash, 0)
        if mine is None or mine[0] != cp.root_hash:
            raise VerificationError(
                f"cosigned checkpoint of size {cp.size} is not one this enclave signed since it started"
            )
        # 3. A quorum of the pinned witnesses cosigned it (tlog-cosignature; a bad line by a
        #    pinned key refuses the note).
        verify_cosignatures(note, policy)
        # 4. Move forward only; forget what is now witnessed.
        with self._lock:
            if cp.size > self.witnessed_size:
                self.witnessed_size, self._witnessed_root = cp.size, cp.root_hash
                for size in [s for s in self._signed if s <= cp.size]:
                    del self._signed[size]
            return self.witnessed_size

    def status(self, log_size: int, now_ms: int) -> GateStatus:
        req = self._req
        with self._lock:
            witnessed = self.witnessed_size
            oldest = next(iter(self._signed.values()), None)
        if req.unsafe:
            return GateStatus(False, self.start_size, witnessed, True, "unwitnessed (unsafe_unwitnessed = true)")
        reason = ""
        if witnessed < self.start_size:
            reason = (
                f"the witnesses have not cosigned this enclave's start (log size {self.start_size}; witnessed "
                f"{witnessed}): a log older than what they have seen is never continued"
            )
        elif log_size - witnessed >= req.max_entries:
            reason = (
                f"the log is {log_size - witnessed} entries ahead of its newest witnessed checkpoint "
                f"(bound {req.max_entries})"
            )
        elif oldest is not None and log_size > witnessed and now_ms - oldest[1] > req.max_ms:
            reason = (
                f"a checkpoint has waited {(now_ms - oldest[1]) / 1000:.1f}s for the witnesses "
                f"(bound {req.max_ms / 1000:g}s)"
            )
        return GateStatus(True, self.start_size, witnessed, not reason, reason or "witnessed")

    def check(self, log_size: int, now_ms: int) -> None:
        """Raise Unwitnessed unless the enclave may grant now."""
        status = self.status(log_size, now_ms)
        if not status.granting:
            raise Unwitnessed(f"calls are paused: {status.reason}")
