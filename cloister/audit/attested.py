"""Attested checkpoints, and their consistency with what the auditor saw before.

An auditor believes a checkpoint because the enclave that signed it says so in an attestation
document made for the auditor's own fresh nonce:

  1. GET <log>/attestation?nonce=<fresh random>; the reply echoes the nonce.
  2. The document verifies against the pinned trust root at the current time, carries that
     nonce (so it is fresh, not replayed) and the expected PCRs (AWS's procedure,
     cloister.verify.attestation), and its user_data is a Cloister enclave binding
     (cloister.verify.enclave_identity) that commits to exactly the checkpoint note served
     with it (SHA-256 of the note's bytes).
  3. The note is a C2SP signed checkpoint (c2sp.org/tlog-checkpoint, c2sp.org/signed-note) by the
     bound log key, for the bound origin (and for the origin the auditor pinned, if any).

Then, against the checkpoint remembered for that origin (cloister.audit.state):

  4. a smaller tree than remembered is a fork (rollback or split view);
  5. the same size with a different root is a fork;
  6. a larger tree must prove the remembered one a prefix (RFC 9162 §2.1.4), with the proof
     computed here from the hash tiles. If the proof fails, the tiles are checked against the new
     checkpoint first: tiles that do not match their own checkpoint are bad storage (exit 1),
     tiles that match it but not the remembered root prove a fork (exit 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cloister.audit.errors import ForkDetected, ForkEvidence
from cloister.audit.proofs import TileNodes, b64
from cloister.audit.source import LogSource
from cloister.audit.state import CheckpointStore, RememberedCheckpoint
from cloister.verify.attestation import AttestationDocument, AttestationPolicy, TrustRoot
from cloister.verify.checkpoint import Checkpoint, verify_checkpoint
from cloister.verify.cosignature import CosignaturePolicy, verify_cosignatures
from cloister.verify.enclave_identity import EnclaveBinding, verify_enclave
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import consistency_proof, verify_consistency

__all__ = [
    "AttestedCheckpoint",
    "ConsistencyResult",
    "WitnessedCheckpoint",
    "check_cosigned",
    "check_remembered",
    "fetch_attested_checkpoint",
    "fetch_cosigned_note",
]

MIN_NONCE = 8
MAX_NONCE = 64  # the relay accepts 8 to 64 bytes


@dataclass(frozen=True)
class AttestedCheckpoint:
    checkpoint: Checkpoint
    note: bytes
    binding: EnclaveBinding
    document: AttestationDocument
    document_bytes: bytes

    @property
    def origin(self) -> str:
        return self.checkpoint.origin


def fetch_attested_checkpoint(
    source: LogSource,
    *,
    root: TrustRoot,
    now: datetime,
    nonce: bytes,
    expected_pcrs: Mapping[int, bytes] | None = None,
    allow_debug: bool = False,
    origin: str | None = None,
) -> AttestedCheckpoint:
    """Steps 1 to 3 of the module docstring. `nonce` must be fresh random bytes (8 to 64)."""
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise ValueError(f"the nonce must be {MIN_NONCE} to {MAX_NONCE} bytes")
    # 1. Ask for a document made for our nonce.
    reply = source.attestation(nonce)
    if reply.nonce != nonce:
        raise VerificationError("the attestation reply is for another nonce than the one asked for (a replay?)")
    # 2. The document: trust root, time, nonce, PCRs, debug mode, and the exact checkpoint bytes.
    policy = AttestationPolicy(
        root=root, at=now, now=now, expected_pcrs=expected_pcrs or {}, nonce=nonce, allow_debug=allow_debug
    )
    verified = verify_enclave(reply.document, policy, origin=origin, checkpoint=reply.checkpoint)
    binding = verified.binding
    # 3. The note is signed by the bound log key, for the bound origin.
    try:
        checkpoint = verify_checkpoint(reply.checkpoint, [binding.log_verifier()], origin=binding.origin).checkpoint
    except DecodeError as exc:
        raise DecodeError(f"the attested checkpoint: {exc}") from exc
    except VerificationError as exc:
        raise VerificationError(f"the attested checkpoint: {exc}") from exc
    return AttestedCheckpoint(
        checkpoint=checkpoint,
        note=reply.checkpoint,
        binding=binding,
        document=verified.document,
        document_bytes=reply.document,
    )


@dataclass(frozen=True)
class ConsistencyResult:
    status: Literal["first", "same", "extended"]
    previous: RememberedCheckpoint | None
    proof: tuple[bytes, ...] = ()


def check_remembered(
    store: CheckpointStore,
    *,
    checkpoint: Checkpoint,
    note: bytes,
    log_key: bytes,
    now: datetime,
    source: LogSource | None = None,
    prefix_root: bytes | None = None,
    remember: bool = True,
) -> ConsistencyResult:
    """Steps 4 to 6: prove `checkpoint` consistent with the remembered one, then remember it.

    The prefix root at the remembered size comes from `prefix_root` when the caller already
    computed it from authenticated data (a replay recomputes the whole tree), else from a
    consistency proof built from `source`'s tiles. Raises ForkDetected (with the evidence saved
    under the state directory) or VerificationError.
    """
    old = store.load(checkpoint.origin)
    result: ConsistencyResult
    if old is None:
        result = ConsistencyResult("first", None)
    elif checkpoint.size < old.size:
        # 4. Logs only grow.
        raise _fork(
            store,
            old,
            checkpoint,
            note,
            now,
            f"the served tree has {checkpoint.size} entries, fewer than the {old.size} of a checkpoint "
            "the log signed before (a rollback, or a different view for different auditors)",
        )
    elif checkpoint.size == old.size:
        # 5. One size, one root.
        if checkpoint.root_hash != old.root:
            raise _fork(store, old, checkpoint, note, now, f"two different roots for the same size {old.size}")
        result = ConsistencyResult("same", old)
    elif prefix_root is not None:
        # 6, with a prefix root the caller authenticated itself.
        if prefix_root != old.root:
            raise _fork(
                store,
                old,
                checkpoint,
                note,
                now,
                f"the first {old.size} entries of the served tree hash to {b64(prefix_root)}, not to the "
                "remembered root",
            )
        result = ConsistencyResult("extended", old)
    else:
        # 6. A consistency proof from the tiles.
        if source is None:
            raise ValueError("check_remembered needs a source or a prefix root")
        nodes = TileNodes(source, checkpoint.size)
        proof = consistency_proof(old.size, checkpoint.size, nodes.get_node)
        try:
            verify_consistency(old.size, checkpoint.size, proof, old.root, checkpoint.root_hash)
        except VerificationError as exc:
            # Authenticate the tiles against the new root alone: if they pass, the prefix they
            # give is the new tree's, and it differs from the remembered root.
            served_prefix = nodes.root_at(old.size)
            try:
                verify_consistency(old.size, checkpoint.size, proof, served_prefix, checkpoint.root_hash)
            except VerificationError as tiles_exc:
                tiles = ", ".join(dict.fromkeys(nodes.paths))
                raise VerificationError(
                    f"cannot prove the checkpoint of size {checkpoint.size} consistent with the remembered one of "
                    f"size {old.size}: the hash tiles ({tiles}) do not match the served checkpoint itself "
                    f"({tiles_exc}); a hash tile was altered"
                ) from exc
            raise _fork(
                store,
                old,
                checkpoint,
                note,
                now,
                f"the first {old.size} entries of the served tree hash to {b64(served_prefix)}, not to the "
                "remembered root",
            ) from exc
        result = ConsistencyResult("extended", old, tuple(proof))
    if remember:
        store.remember(
            origin=checkpoint.origin,
            size=checkpoint.size,
            root=checkpoint.root_hash,
            log_key=log_key,
            note=note,
            now=now,
        )
    return result


def _fork(
    store: CheckpointStore, old: RememberedCheckpoint, new: Checkpoint, new_note: bytes, now: datetime, reason: str
) -> ForkDetected:
    evidence = ForkEvidence(
        origin=new.origin,
        old_size=old.size,
        old_root=old.root,
        new_size=new.size,
        new_root=new.root_hash,
        reason=reason,
        old_note=old.note,
        new_note=new_note,
    )
    try:
        saved: str | None = str(store.save_fork(evidence, now))
    except OSError:
        saved = None  # the fork is reported all the same
    return ForkDetected(evidence, saved)


# --- Witness cosignatures (c2sp.org/tlog-cosignature) ----------------------------------------

COSIGNED_PATH = "checkpoint.cosigned"  # the relay serves the cosigned checkpoint at <log>/checkpoint.cosigned
MAX_COSIGNED = 64 * 1024
COSIGNATURE_SKEW_S = 600  # a cosignature dated further in the future than this is refused


@dataclass(frozen=True)
class WitnessedCheckpoint:
    checkpoint: Checkpoint
    note: bytes
    cosigned: dict[str, int]  # witness name -> cosignature timestamp (POSIX seconds)
    proof: tuple[bytes, ...]  # consistency proof from it to the attested checkpoint


def fetch_cosigned_note(source: LogSource) -> bytes:
    """The relay's cosigned checkpoint: fetch it *before* the attested one, so it is not newer."""
    return source.read(COSIGNED_PATH, max_size=MAX_COSIGNED)


def check_cosigned(
    source: LogSource, note: bytes, attested: AttestedCheckpoint, policy: CosignaturePolicy, *, now: datetime
) -> WitnessedCheckpoint:
    """A quorum of the pinned witnesses cosigned a checkpoint of this log, signed by the attested
    log key, that the attested checkpoint extends (the same one, or a prefix proven from tiles)."""
    try:
        checkpoint = verify_checkpoint(note, [attested.binding.log_verifier()], origin=attested.origin).checkpoint
    except (DecodeError, VerificationError) as exc:
        raise VerificationError(f"the cosigned checkpoint is not signed by the attested log key: {exc}") from exc
    cosigned = verify_cosignatures(note, policy, not_after=int(now.timestamp()) + COSIGNATURE_SKEW_S)
    head = attested.checkpoint
    if checkpoint.size > head.size:
        raise VerificationError(f"the cosigned checkpoint (size {checkpoint.size}) is beyond the attested one")
    proof: tuple[bytes, ...] = ()
    if checkpoint.size == head.size:
        if checkpoint.root_hash != head.root_hash:
            raise VerificationError(f"the witnesses cosigned another root than the attested one at size {head.size}")
    elif checkpoint.size > 0:
        proof = tuple(consistency_proof(checkpoint.size, head.size, TileNodes(source, head.size).get_node))
        try:
            verify_consistency(checkpoint.size, head.size, proof, checkpoint.root_hash, head.root_hash)
        except VerificationError as exc:
            raise VerificationError(
                f"the attested checkpoint is not consistent with the cosigned one of size {checkpoint.size}: {exc}"
            ) from exc
    return WitnessedCheckpoint(checkpoint, note, cosigned, proof)
