"""Receipts: self-contained, offline-verifiable proofs that one entry is in a Cloister log.

A receipt is a C2SP tlog-proof (https://c2sp.org/tlog-proof, `c2sp.org/tlog-proof@v1`): the leaf
index, the inclusion proof and the log's signed checkpoint, verbatim. Its `extra` line carries
what an offline verifier needs besides the log's public data, as deterministic CBOR
(RFC 8949 §4.2.1), base64-encoded as tlog-proof requires:

    {"f": "cloister-receipt/1",
     "entry": bytes,        the logged entry, exactly (leaf hash = SHA-256(0x00 || entry))
     "attestation": bytes}  the NSM attestation document (COSE_Sign1) the enclave produced for
                            the auditor's fresh nonce when the receipt was made; its user_data
                            (cloister-enclave/1) binds the log key, the origin, and the SHA-256
                            of exactly the checkpoint note in the receipt

A verifier needs nothing else but a trust root (and, ideally, the expected PCRs):

  1. the tlog-proof parses, and its extra data is a cloister-receipt/1 map in deterministic CBOR;
  2. the attestation verifies against the trust root as of its own timestamp (the receipt may be
     old; the certificates were valid then), with the expected PCRs, and binds this checkpoint;
  3. the checkpoint is a signed note by the bound log key, for the bound origin;
  4. the entry's leaf hash is included at the index (RFC 9162 §2.1.3.2);
  5. the entry decodes as a Cloister record (cloister.verify.entries.parse_entry).

The extra data is unauthenticated by the tlog-proof format itself; steps 2 to 4 authenticate it
(the document by the trust root, the entry by the inclusion proof).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import cbor2

from cloister.verify.attestation import DOCUMENT_TIME, AttestationDocument, AttestationPolicy, TrustRoot
from cloister.verify.checkpoint import Checkpoint
from cloister.verify.cose import decode_cbor
from cloister.verify.enclave_identity import EnclaveBinding, verify_enclave
from cloister.verify.entries import Entry, parse_entry
from cloister.verify.errors import DecodeError
from cloister.verify.merkle import leaf_hash
from cloister.verify.tlog_proof import (
    MAX_EXTRA_SIZE,
    TlogProof,
    format_tlog_proof,
    parse_tlog_proof,
    verify_tlog_proof,
)

__all__ = ["FORMAT", "MAX_RECEIPT_SIZE", "VerifiedReceipt", "make_receipt", "verify_receipt"]

FORMAT = "cloister-receipt/1"
# tlog-proof's own cap: an extra line of 64 KiB in base64, the proof, and a note of at most 1 MiB.
MAX_RECEIPT_SIZE = (1 << 20) + 128 * 1024


def _encode_extra(entry: bytes, attestation: bytes) -> bytes:
    return cbor2.dumps({"f": FORMAT, "entry": entry, "attestation": attestation}, canonical=True)


def make_receipt(
    *, index: int, proof: tuple[bytes, ...], checkpoint_note: bytes, entry: bytes, attestation: bytes
) -> bytes:
    """Serialise a receipt. The caller has verified every part (an attested checkpoint, a proof)."""
    extra = _encode_extra(entry, attestation)
    if len(extra) > MAX_EXTRA_SIZE:
        raise DecodeError(
            f"entry {index} ({len(entry)} bytes) and the attestation ({len(attestation)} bytes) do not fit in a "
            f"receipt's extra data ({len(extra)} > {MAX_EXTRA_SIZE} bytes)"
        )
    return format_tlog_proof(
        TlogProof(index=index, inclusion_proof=proof, checkpoint_note=checkpoint_note, extra=extra)
    )


def _parse_extra(extra: bytes | None) -> tuple[bytes, bytes]:
    if extra is None:
        raise DecodeError(f"the tlog-proof has no extra data: it is not a {FORMAT} receipt")
    m = decode_cbor(extra, what="receipt extra data")
    if not isinstance(m, dict) or m.get("f") != FORMAT:
        raise DecodeError(f"the tlog-proof's extra data is not a {FORMAT} map")
    entry, attestation = m.get("entry"), m.get("attestation")
    if set(m) != {"f", "entry", "attestation"}:
        raise DecodeError(f"receipt extra data has fields {sorted(map(str, m))}, want f, entry, attestation")
    if not isinstance(entry, bytes) or not isinstance(attestation, bytes):
        raise DecodeError("receipt extra data: 'entry' and 'attestation' must be byte strings")
    if _encode_extra(entry, attestation) != extra:
        raise DecodeError("receipt extra data is not in deterministic CBOR encoding (RFC 8949 §4.2.1)")
    return entry, attestation


@dataclass(frozen=True)
class VerifiedReceipt:
    index: int
    entry: Entry
    entry_bytes: bytes
    checkpoint: Checkpoint
    binding: EnclaveBinding
    document: AttestationDocument


def verify_receipt(
    data: bytes,
    *,
    root: TrustRoot,
    at: datetime | Literal["document"] = DOCUMENT_TIME,
    expected_pcrs: Mapping[int, bytes] | None = None,
    allow_debug: bool = False,
    origin: str | None = None,
) -> VerifiedReceipt:
    """Steps 1 to 5 of the module docstring; raises DecodeError or VerificationError."""
    if len(data) > MAX_RECEIPT_SIZE:
        raise DecodeError(f"receipt is {len(data)} bytes, more than {MAX_RECEIPT_SIZE}")
    # 1. The tlog-proof and its extra data.
    proof = parse_tlog_proof(data)
    entry_bytes, attestation = _parse_extra(proof.extra)
    # 2. The attestation, as of its own time (or the caller's), binding exactly this checkpoint note.
    policy = AttestationPolicy(root=root, at=at, expected_pcrs=expected_pcrs or {}, allow_debug=allow_debug)
    verified = verify_enclave(attestation, policy, origin=origin, checkpoint=proof.checkpoint_note)
    binding = verified.binding
    # 3 and 4. The checkpoint signature by the bound key, and the entry's inclusion.
    result = verify_tlog_proof(data, [binding.log_verifier()], origin=binding.origin, leaf_hash=leaf_hash(entry_bytes))
    # 5. The entry is a Cloister record.
    entry = parse_entry(entry_bytes)
    return VerifiedReceipt(
        index=proof.index,
        entry=entry,
        entry_bytes=entry_bytes,
        checkpoint=result.checkpoint,
        binding=binding,
        document=verified.document,
    )
