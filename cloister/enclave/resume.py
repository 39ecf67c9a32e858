"""Resuming a stored log in a fresh enclave, without trusting the parent's storage.

A new enclave has a new grant key, and its log key is the origin's one sealed log key
(decision 0014; `EnclaveCore.resume_log` also requires the key entry below to carry it). The
checks here do not rely on that: they trust the old checkpoints by measurement. The key that
signed the latest checkpoint was introduced by a key entry whose attestation document binds
it, and that document must carry this image's PCR0 (or a predecessor's pinned in the measured
config). Then:

  1. the key entry parses, and its attestation verifies against the pinned trust root,
     as of its own timestamp (it may be old), with an accepted PCR0;
  2. the document's user_data binds exactly that log key, for this log's origin;
  3. the checkpoint is a C2SP signed note by that key, for this origin (C2SP tlog-checkpoint);
  4. the key entry is included in the checkpoint (RFC 9162 §2.1.3.2);
  5. the compact range at S plus the entries [S, N) hash to the checkpoint's root
     (RFC 9162 §2.1.1), so the supplied entries are exactly the log's tail;
  6. when S > 0, the entry at S - 1 is included too and its time tells how far back the
     supplied history reaches; a policy whose limit windows reach further is refused later.

Any failure refuses the resume: the enclave would rather stop than extend a log it cannot
prove it is continuing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cloister.enclave.config import EnclaveConfig
from cloister.verify.attestation import DOCUMENT_TIME
from cloister.verify.checkpoint import Checkpoint, verify_checkpoint
from cloister.verify.enclave_identity import parse_binding
from cloister.verify.entries import Entry, KeyEntry, parse_entry
from cloister.verify.errors import CloisterError, DecodeError, VerificationError
from cloister.verify.merkle import CompactRange, leaf_hash, verify_inclusion


class ResumeRefused(CloisterError):
    """The stored log could not be proven to be this log; the enclave refuses to continue it."""


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Checkpoint
    note: bytes
    tree: CompactRange
    history_start: int  # S
    history: tuple[Entry, ...]  # parsed entries [S, N)
    # Time of the entry before S (ms), or None when the history reaches back to the first entry.
    history_floor_ms: int | None


def verify_resume(
    *,
    config: EnclaveConfig,
    own_pcr0: bytes,
    checkpoint: bytes,
    range_size: int,
    range_hashes: Sequence[bytes],
    entries: Sequence[bytes],
    key_entry: bytes,
    key_entry_index: int,
    key_entry_proof: Sequence[bytes],
    boundary_entry: bytes,
    boundary_proof: Sequence[bytes],
) -> ResumePoint:
    try:
        return _verify(
            config,
            own_pcr0,
            checkpoint,
            range_size,
            range_hashes,
            entries,
            key_entry,
            key_entry_index,
            key_entry_proof,
            boundary_entry,
            boundary_proof,
        )
    except (DecodeError, VerificationError) as exc:
        raise ResumeRefused(f"cannot resume the stored log: {exc}") from exc


def _verify(
    config: EnclaveConfig,
    own_pcr0: bytes,
    checkpoint: bytes,
    range_size: int,
    range_hashes: Sequence[bytes],
    entries: Sequence[bytes],
    key_entry: bytes,
    key_entry_index: int,
    key_entry_proof: Sequence[bytes],
    boundary_entry: bytes,
    boundary_proof: Sequence[bytes],
) -> ResumePoint:
    # Local import: attestation verification pulls in x509 code the decision path never needs.
    from cloister.verify.attestation import AttestationPolicy, verify_attestation

    # 1. The key entry and its attestation, as of the document's own time.
    intro = parse_entry(key_entry)
    if not isinstance(intro, KeyEntry):
        raise ResumeRefused(f"entry {key_entry_index} given as the key entry is a {type(intro).__name__}")
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
    verified = verify_checkpoint(checkpoint, [binding.log_verifier()], origin=config.origin)
    cp = verified.checkpoint
    # 4. The key entry is in the checkpointed tree.
    verify_inclusion(leaf_hash(key_entry), key_entry_index, cp.size, key_entry_proof, cp.root_hash)
    # 5. Compact range at S, extended by the entries [S, N), reproduces the root.
    tree = CompactRange.from_hashes(range_size, range_hashes)
    if range_size + len(entries) != cp.size:
        raise ResumeRefused(f"range size {range_size} + {len(entries)} entries != checkpoint size {cp.size}")
    history: list[Entry] = []
    for data in entries:
        tree.append(leaf_hash(data))
        history.append(parse_entry(data))
    if tree.root() != cp.root_hash:
        raise ResumeRefused("the stored compact range and entries do not hash to the checkpoint's root")
    # 6. How far back the supplied history reaches.
    floor: int | None = None
    if range_size > 0:
        verify_inclusion(leaf_hash(boundary_entry), range_size - 1, cp.size, boundary_proof, cp.root_hash)
        floor = parse_entry(boundary_entry).time_ms
    return ResumePoint(
        checkpoint=cp,
        note=checkpoint,
        tree=tree,
        history_start=range_size,
        history=tuple(history),
        history_floor_ms=floor,
    )
