"""Evidence that a grant key was introduced in a witnessed log (docs/decisions/0015).

An enclave introduces its grant key in a key entry at every start, and grants nothing until a
quorum of its pinned witnesses has cosigned a checkpoint covering that entry. An upstream that
pins the log (origin and verifier key) and the witnesses (keys and quorum) can therefore refuse
grants from any enclave whose start the witnesses never saw: a shadow enclave on a copy of the
log, or one on a log nobody witnesses.

The relay carries the evidence beside every grant, in `params._meta["dev.cloister/key-evidence"]`,
as JSON:

    {"v": 1,
     "checkpoint": "<the C2SP signed note, with the witnesses' cosignature lines>",
     "index": <the key entry's index>,
     "entry": "<base64 of the key entry>",
     "proof": ["<base64 of a 32-byte hash>", ...]}

References: C2SP tlog-checkpoint and signed-note (the log's signature), C2SP tlog-cosignature
(the witnesses'), RFC 9162 §2.1.3.2 (inclusion). No grpc, no mcp, no clock.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass

from cloister.verify.checkpoint import verify_checkpoint
from cloister.verify.cosignature import CosignaturePolicy, verify_cosignatures
from cloister.verify.entries import KeyEntry, parse_entry
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import leaf_hash, verify_inclusion
from cloister.verify.note import Ed25519NoteVerifier

__all__ = [
    "DECISION_EVIDENCE_META_KEY",
    "KEY_EVIDENCE_META_KEY",
    "KeyEvidence",
    "WitnessedLogPolicy",
    "encode_decision_evidence",
    "encode_key_evidence",
    "verify_decision_evidence",
    "verify_key_evidence",
]

KEY_EVIDENCE_META_KEY = "dev.cloister/key-evidence"
MAX_EVIDENCE_BYTES = 64 * 1024
MAX_PROOF_HASHES = 64


@dataclass(frozen=True)
class WitnessedLogPolicy:
    """The log an upstream trusts grants from: its origin and verifier key, and its witnesses."""

    origin: str
    log: Ed25519NoteVerifier
    witnesses: CosignaturePolicy

    @classmethod
    def from_vkeys(cls, origin: str, log_vkey: str, witness_vkeys: Iterable[str], quorum: int) -> WitnessedLogPolicy:
        return cls(origin, Ed25519NoteVerifier.from_vkey(log_vkey), CosignaturePolicy.from_vkeys(witness_vkeys, quorum))


@dataclass(frozen=True)
class KeyEvidence:
    checkpoint: bytes
    index: int
    entry: bytes
    proof: tuple[bytes, ...]


def encode_key_evidence(evidence: KeyEvidence) -> str:
    return json.dumps(
        {
            "v": 1,
            "checkpoint": evidence.checkpoint.decode("utf-8"),
            "index": evidence.index,
            "entry": base64.b64encode(evidence.entry).decode("ascii"),
            "proof": [base64.b64encode(h).decode("ascii") for h in evidence.proof],
        },
        separators=(",", ":"),
    )


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise DecodeError(f"key evidence: {what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"key evidence: {what} is not valid base64") from exc


def _evidence_json(text: str, what: str) -> tuple[dict[str, object], bytes, tuple[bytes, ...]]:
    """The evidence object, its checkpoint note and its proof hashes, within bounds (DecodeError otherwise)."""
    if len(text) > MAX_EVIDENCE_BYTES:
        raise DecodeError(f"{what} is {len(text)} characters; at most {MAX_EVIDENCE_BYTES}")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"{what} is not JSON") from exc
    if not isinstance(data, dict) or data.get("v") != 1:
        raise DecodeError(f"{what} must be a JSON object with v = 1")
    checkpoint, proof = data.get("checkpoint"), data.get("proof")
    if not isinstance(checkpoint, str):
        raise DecodeError(f"{what}: checkpoint must be a string (a signed note)")
    if not isinstance(proof, list) or len(proof) > MAX_PROOF_HASHES:
        raise DecodeError(f"{what}: proof must be a list of at most {MAX_PROOF_HASHES} hashes")
    hashes = tuple(_b64(h, "a proof hash") for h in proof)
    if any(len(h) != 32 for h in hashes):
        raise DecodeError(f"{what}: every proof hash must be 32 bytes")
    return data, checkpoint.encode("utf-8"), hashes


def parse_key_evidence(text: str) -> KeyEvidence:
    """The evidence's JSON, with its sizes bounded (DecodeError otherwise)."""
    data, checkpoint, hashes = _evidence_json(text, "key evidence")
    index = data.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1 << 63:
        raise DecodeError("key evidence: index must be a non-negative integer")
    return KeyEvidence(checkpoint, index, _b64(data.get("entry"), "entry"), hashes)


def verify_key_evidence(text: str, policy: WitnessedLogPolicy) -> KeyEntry:
    """The key entry the evidence proves was introduced in the witnessed log, or raise
    VerificationError / DecodeError. The caller compares its `grant_key` with the grant's signer."""
    # 1. Parse, within bounds.
    evidence = parse_key_evidence(text)
    # 2. C2SP tlog-checkpoint: the checkpoint is signed by the pinned log key, for the pinned origin.
    cp = verify_checkpoint(evidence.checkpoint, [policy.log], origin=policy.origin).checkpoint
    # 3. C2SP tlog-cosignature: a quorum of the pinned witnesses cosigned exactly that checkpoint.
    verify_cosignatures(evidence.checkpoint, policy.witnesses)
    # 4. RFC 9162 §2.1.3.2: the entry is leaf `index` of the cosigned tree.
    if evidence.index >= cp.size:
        raise VerificationError(f"key entry index {evidence.index} is not below the checkpoint's size {cp.size}")
    verify_inclusion(leaf_hash(evidence.entry), evidence.index, cp.size, evidence.proof, cp.root_hash)
    # 5. The entry introduces keys of this log: a key entry naming the pinned log key.
    entry = parse_entry(evidence.entry)
    if not isinstance(entry, KeyEntry):
        raise VerificationError(f"entry {evidence.index} is a {type(entry).__name__}, not a key entry")
    if entry.log_key != policy.log.public_key.public_bytes_raw():
        raise VerificationError(f"key entry {evidence.index} introduces another log key than the pinned one")
    return entry


# ---- A decision witnessed before its call goes upstream (the wait-for-witness mode) -------------

DECISION_EVIDENCE_META_KEY = "dev.cloister/decision-evidence"


def encode_decision_evidence(checkpoint: bytes, proof: Iterable[bytes]) -> str:
    """{"v": 1, "checkpoint": "<cosigned note>", "proof": [...]}: the grant's decision entry (its
    log index and leaf hash are in the grant) is in a tree a quorum of the witnesses cosigned."""
    return json.dumps(
        {
            "v": 1,
            "checkpoint": checkpoint.decode("utf-8"),
            "proof": [base64.b64encode(h).decode("ascii") for h in proof],
        },
        separators=(",", ":"),
    )


def verify_decision_evidence(text: str, policy: WitnessedLogPolicy, *, index: int, entry_hash: bytes) -> None:
    """Check that leaf `index` with hash `entry_hash` (from a verified grant) is in a checkpoint of
    the pinned log cosigned by a quorum of the pinned witnesses; raise otherwise."""
    # 1. Parse, within bounds (the same caps as key evidence).
    _, note, hashes = _evidence_json(text, "decision evidence")
    # 2. C2SP tlog-checkpoint: signed by the pinned log key, for the pinned origin.
    cp = verify_checkpoint(note, [policy.log], origin=policy.origin).checkpoint
    # 3. C2SP tlog-cosignature: a quorum of the pinned witnesses.
    verify_cosignatures(note, policy.witnesses)
    # 4. RFC 9162 §2.1.3.2: the decision entry is in that tree.
    if index >= cp.size:
        raise VerificationError(f"decision entry {index} is not below the cosigned checkpoint's size {cp.size}")
    verify_inclusion(entry_hash, index, cp.size, hashes, cp.root_hash)
