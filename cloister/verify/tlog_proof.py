"""C2SP transparency-log proofs (https://c2sp.org/tlog-proof): an offline-verifiable proof that
an entry is in a log.

    c2sp.org/tlog-proof@v1\\n
    [extra <base64 opaque data>\\n]
    index <leaf index, ASCII decimal, no leading zeros>\\n
    <base64 inclusion proof hash>\\n      (zero or more, leaf's sibling first, RFC 6962 §2.1.1)
    \\n
    <the log's signed checkpoint note, verbatim, possibly with witness cosignatures>

The proof does not carry the entry: the verifier brings the leaf hash of the data it expects to
be logged, the log's origin and the log's keys. The extra data is not authenticated; it is
returned for the application to check independently and must not be trusted as is.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cloister.verify.checkpoint import Checkpoint, VerifiedCheckpoint, verify_checkpoint
from cloister.verify.errors import DecodeError
from cloister.verify.merkle import HASH_SIZE, MAX_TREE_SIZE, verify_inclusion
from cloister.verify.note import MAX_NOTE_SIZE, NoteVerifier, VerifiedNote, b64decode_strict

__all__ = [
    "HEADER",
    "MAX_EXTRA_SIZE",
    "MAX_PROOF_HASHES",
    "TlogProof",
    "VerifiedTlogProof",
    "format_tlog_proof",
    "parse_tlog_proof",
    "verify_tlog_proof",
]

HEADER = "c2sp.org/tlog-proof@v1"
# An inclusion proof in a tree of fewer than 2**64 leaves has at most 64 hashes.
MAX_PROOF_HASHES = 64
MAX_EXTRA_SIZE = 64 * 1024
_MAX_EXTRA_LINE = len("extra ") + 4 * ((MAX_EXTRA_SIZE + 2) // 3)
_MAX_PROOF_SIZE = _MAX_EXTRA_LINE + 1024 + MAX_PROOF_HASHES * 64 + MAX_NOTE_SIZE
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")


@dataclass(frozen=True)
class TlogProof:
    """A parsed, *unverified* tlog-proof."""

    index: int
    inclusion_proof: tuple[bytes, ...]
    checkpoint_note: bytes
    extra: bytes | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_TREE_SIZE:
            raise DecodeError(f"tlog-proof index {self.index} is outside [0, 2**64)")
        if len(self.inclusion_proof) > MAX_PROOF_HASHES:
            raise DecodeError(f"tlog-proof has {len(self.inclusion_proof)} proof hashes, more than {MAX_PROOF_HASHES}")
        for i, h in enumerate(self.inclusion_proof):
            if len(h) != HASH_SIZE:
                raise DecodeError(f"tlog-proof proof hash {i} is {len(h)} bytes, want {HASH_SIZE}")
        if self.extra is not None and not 1 <= len(self.extra) <= MAX_EXTRA_SIZE:
            raise DecodeError(
                f"tlog-proof extra data is {len(self.extra)} bytes; want 1 to {MAX_EXTRA_SIZE} (no extra data is None)"
            )


@dataclass(frozen=True)
class VerifiedTlogProof:
    """A tlog-proof whose checkpoint verified and whose inclusion proof matched its root.

    `proof.extra` is still unauthenticated.
    """

    proof: TlogProof
    checkpoint: Checkpoint
    note: VerifiedNote


def _next_line(data: bytes, pos: int, what: str, cap: int) -> tuple[str, int]:
    """The line starting at pos (without its newline) and the position after it."""
    end = data.find(b"\n", pos, pos + cap + 1)
    if end < 0:
        if data.find(b"\n", pos) < 0:
            raise DecodeError(f"tlog-proof ends inside the {what} at byte offset {pos}")
        raise DecodeError(f"tlog-proof {what} at byte offset {pos} is longer than {cap} bytes")
    try:
        return data[pos:end].decode("ascii"), end + 1
    except UnicodeDecodeError as e:
        raise DecodeError(f"tlog-proof {what} at byte offset {pos} is not ASCII") from e


def parse_tlog_proof(data: bytes) -> TlogProof:
    """Parse a tlog-proof; the checkpoint note is returned verbatim, not yet verified."""
    if len(data) > _MAX_PROOF_SIZE:
        raise DecodeError(f"tlog-proof is {len(data)} bytes, more than {_MAX_PROOF_SIZE}")
    # Line 1: the header.
    line, pos = _next_line(data, 0, "header line", len(HEADER))
    if line != HEADER:
        raise DecodeError(f"tlog-proof does not start with {HEADER!r}")
    # Line 2 (optional): extra data.
    extra: bytes | None = None
    line, after = _next_line(data, pos, "line after the header", _MAX_EXTRA_LINE)
    if line.startswith("extra "):
        extra = b64decode_strict(line[len("extra ") :], f"tlog-proof extra data (byte offset {pos})")
        if not extra:
            raise DecodeError("tlog-proof extra line is present but empty (omit the line instead)")
        pos = after
        line, after = _next_line(data, pos, "index line", 64)
    # Next line: the leaf index.
    if not line.startswith("index "):
        raise DecodeError(f"tlog-proof line at byte offset {pos} is not 'index <n>'")
    index_text = line[len("index ") :]
    if not _DECIMAL.fullmatch(index_text):
        raise DecodeError(f"tlog-proof index {index_text[:30]!r} is not a decimal without leading zeros")
    index = int(index_text)
    if index >= MAX_TREE_SIZE:
        raise DecodeError(f"tlog-proof index {index} does not fit in 64 bits")
    pos = after
    # Then zero or more proof hashes, up to an empty line.
    hashes: list[bytes] = []
    while True:
        line, after = _next_line(data, pos, "inclusion proof", 64)
        if not line:
            pos = after
            break
        if len(hashes) == MAX_PROOF_HASHES:
            raise DecodeError(f"tlog-proof has more than {MAX_PROOF_HASHES} inclusion proof hashes")
        h = b64decode_strict(line, f"tlog-proof proof hash {len(hashes)} (byte offset {pos})")
        if len(h) != HASH_SIZE:
            raise DecodeError(f"tlog-proof proof hash {len(hashes)} is {len(h)} bytes, want {HASH_SIZE}")
        hashes.append(h)
        pos = after
    # The rest is the checkpoint note, verbatim.
    if pos == len(data):
        raise DecodeError("tlog-proof has no checkpoint after the inclusion proof")
    return TlogProof(index=index, inclusion_proof=tuple(hashes), checkpoint_note=data[pos:], extra=extra)


def format_tlog_proof(proof: TlogProof) -> bytes:
    """Serialise a tlog-proof (the inverse of parse_tlog_proof)."""
    lines = [HEADER]
    if proof.extra is not None:
        lines.append("extra " + base64.b64encode(proof.extra).decode("ascii"))
    lines.append(f"index {proof.index}")
    lines.extend(base64.b64encode(h).decode("ascii") for h in proof.inclusion_proof)
    lines.append("")
    return "\n".join(lines).encode("ascii") + b"\n" + proof.checkpoint_note


def verify_tlog_proof(
    proof_bytes: bytes, verifiers: Sequence[NoteVerifier], *, origin: str, leaf_hash: bytes
) -> VerifiedTlogProof:
    """Verify that the entry with `leaf_hash` is in the log `origin` signed by `verifiers`.

    1. Parse the proof (DecodeError if malformed).
    2. Verify the checkpoint note's signature and origin (verify_checkpoint).
    3. Verify the inclusion proof of `leaf_hash` at the index against the checkpoint's size and
       root (RFC 9162 §2.1.3.2).

    Witness cosignatures in the checkpoint are parsed but not checked here: pass the witnesses'
    verifiers separately to a cosignature policy. Raises VerificationError naming the failed check.
    """
    proof = parse_tlog_proof(proof_bytes)
    verified: VerifiedCheckpoint = verify_checkpoint(proof.checkpoint_note, verifiers, origin=origin)
    cp = verified.checkpoint
    verify_inclusion(leaf_hash, proof.index, cp.size, proof.inclusion_proof, cp.root_hash)
    return VerifiedTlogProof(proof=proof, checkpoint=cp, note=verified.note)
