"""The add-checkpoint call of C2SP tlog-witness (C2SP/C2SP @ 5ba5ee83, tlog-witness.md).

Request body: `old <size>\\n`, zero to 63 base64 consistency-proof lines, an empty line, then a
signed checkpoint note. The checks run in the spec's order; each refusal is one status:

    400  malformed body; old size above the checkpoint's size
    404  the checkpoint's origin is not a log this witness follows
    403  no signature by a key trusted for the origin, or such a signature fails
    409  old size is not the size this witness last cosigned (body: that size, text/x.tlog.size)
    422  a size-0 checkpoint without the empty root; a proof from 0 that is not empty; a
         consistency proof that does not verify (which includes same size, other root: a fork)
    413  body over MAX_BODY (a transport limit of this server, not of the spec)

On success the checkpoint becomes the origin's latest, durably, before the 200 carries the
cosignature line. Checking the old size and persisting happen under one per-origin lock (the
spec's race between two requests that would roll back the recorded size).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cloister.verify.checkpoint import Checkpoint, VerifiedCheckpoint, parse_checkpoint, verify_checkpoint
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import EMPTY_ROOT, HASH_SIZE, MAX_TREE_SIZE, verify_consistency
from cloister.verify.note import Note, NoteVerifier, b64decode_strict, format_note, parse_note
from cloister.witness.state import Record, WitnessState, origin_hash

__all__ = [
    "MAX_BODY",
    "MAX_PROOF_LINES",
    "SIZE_CONTENT_TYPE",
    "AddCheckpointRequest",
    "Refused",
    "Response",
    "Witness",
    "parse_add_checkpoint",
]

logger = logging.getLogger(__name__)

# A checkpoint with a log signature and a few dozen cosignatures is a few kB; ML-DSA-44
# cosignature lines are ~3.3 kB each. Anything larger is refused before it is read.
MAX_BODY = 128 * 1024
# tlog-witness: "The client MUST NOT send more than 63 consistency proof lines."
MAX_PROOF_LINES = 63
SIZE_CONTENT_TYPE = "text/x.tlog.size"
TEXT = "text/plain; charset=utf-8"

_OLD_LINE = re.compile(rb"old (0|[1-9][0-9]{0,19})")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT


class Refused(Exception):
    """A request the witness answers with an error status (never a 500)."""

    def __init__(self, status: int, message: str, *, body: bytes | None = None, content_type: str = TEXT) -> None:
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else message.encode("utf-8") + b"\n"
        self.content_type = content_type

    def response(self) -> Response:
        return Response(self.status, self.body, self.content_type)


@dataclass(frozen=True)
class AddCheckpointRequest:
    """A parsed add-checkpoint body. `checkpoint` is the claimed, not yet verified, checkpoint."""

    old_size: int
    proof: tuple[bytes, ...]
    note: bytes
    checkpoint: Checkpoint


def _proof_line(i: int, line: bytes) -> bytes:
    where = f"consistency proof line {i + 1}"
    try:
        value = b64decode_strict(line.decode("ascii"), where)
    except (UnicodeDecodeError, DecodeError) as e:
        raise Refused(400, f"{where} is not base64") from e
    if len(value) != HASH_SIZE:
        raise Refused(400, f"{where} is {len(value)} bytes, want a {HASH_SIZE}-byte hash")
    return value


def parse_add_checkpoint(body: bytes) -> AddCheckpointRequest:
    """tlog-witness §add-checkpoint, the request body; Refused(400) (or 413) if malformed."""
    if len(body) > MAX_BODY:
        raise Refused(413, f"request body is {len(body)} bytes, more than {MAX_BODY}")
    # 1. "an old size line, zero or more consistency proof lines, and an empty line": the first
    #    empty line ends them (none of them may be empty).
    end = body.find(b"\n\n")
    if end < 0:
        raise Refused(400, "request has no empty line after the old size and proof lines")
    head = body[:end].split(b"\n")
    if len(head) > 1 + MAX_PROOF_LINES:
        raise Refused(400, f"request has {len(head) - 1} consistency proof lines, more than {MAX_PROOF_LINES}")
    # 2. "old", a space, the size in ASCII decimal with no leading zeroes.
    m = _OLD_LINE.fullmatch(head[0])
    if not m:
        raise Refused(400, "first line is not 'old <size>' (ASCII decimal, no leading zeroes)")
    old_size = int(m.group(1))
    if old_size >= MAX_TREE_SIZE:
        raise Refused(400, f"old size {old_size} does not fit in 64 bits")
    # 3. "Each consistency proof line MUST encode a single hash in base64."
    proof = tuple(_proof_line(i, line) for i, line in enumerate(head[1:]))
    # 4. "followed by a checkpoint": a signed note whose text is a checkpoint.
    note = body[end + 2 :]
    try:
        checkpoint = parse_checkpoint(parse_note(note).text)
    except DecodeError as e:
        raise Refused(400, f"checkpoint: {e}") from e
    return AddCheckpointRequest(old_size, proof, note, checkpoint)


class Witness:
    """The witness's logic, without HTTP: bytes in, a Response out."""

    def __init__(
        self,
        state: WitnessState,
        logs: Mapping[str, Sequence[NoteVerifier]],
        clock: Callable[[], int],
    ) -> None:
        """`clock` returns the time as POSIX seconds (the CLI passes the wall clock)."""
        self._state = state
        self._logs = {origin: tuple(keys) for origin, keys in logs.items()}
        self._locks = {origin: threading.Lock() for origin in self._logs}
        self._by_hash = {origin_hash(o): o for o in self._logs}
        self._clock = clock

    @property
    def vkey(self) -> str:
        return self._state.cosigner.vkey

    def add_checkpoint(self, body: bytes) -> Response:
        """POST <submission prefix>/add-checkpoint."""
        try:
            return self._add_checkpoint(body)
        except Refused as r:
            return r.response()

    def get_checkpoint(self, origin_hash: str) -> Response:
        """GET <monitoring prefix>/<origin hash>/checkpoint: the latest cosigned checkpoint, or 404."""
        origin = self._by_hash.get(origin_hash)
        record = self._state.latest(origin) if origin is not None else None
        if record is None:
            return Response(404, b"this witness has cosigned no checkpoint for that origin\n")
        return Response(200, record.note)

    def _add_checkpoint(self, body: bytes) -> Response:
        request = parse_add_checkpoint(body)
        origin = request.checkpoint.origin
        # "If the checkpoint origin is unknown, the witness MUST respond with a 404 Not Found."
        keys = self._logs.get(origin)
        if keys is None:
            raise Refused(404, f"unknown log origin {origin[:200]!r}")
        # "403 Forbidden if either no signature from a trusted key for the origin is present, or a
        # signature line's key name and ID match a trusted key but the signature fails to verify."
        try:
            verified = verify_checkpoint(request.note, keys, origin=origin)
        except (VerificationError, DecodeError) as e:
            raise Refused(403, f"log signature: {e}") from e
        # "The old size MUST be equal to or lower than the checkpoint size. Otherwise ... 400."
        if request.old_size > verified.checkpoint.size:
            raise Refused(400, f"old size {request.old_size} is above the checkpoint size {verified.checkpoint.size}")
        # Checking the old size and persisting the new checkpoint are one atomic step.
        with self._locks[origin]:
            return self._check_and_cosign(request, verified)

    def _check_and_cosign(self, request: AddCheckpointRequest, verified: VerifiedCheckpoint) -> Response:
        cp = verified.checkpoint
        latest = self._state.latest(cp.origin)
        size, root, last_time = (latest.size, latest.root_hash, latest.timestamp) if latest else (0, EMPTY_ROOT, 0)
        # "If it doesn't match, the witness MUST respond with a 409 Conflict ... the tree size of the
        # latest cosigned checkpoint in decimal, followed by a newline ... text/x.tlog.size."
        if request.old_size != size:
            raise Refused(409, f"witness is at size {size}", body=b"%d\n" % size, content_type=SIZE_CONTENT_TYPE)
        # "A checkpoint of size zero MUST have the root hash of the empty tree ... 422."
        if cp.size == 0 and cp.root_hash != EMPTY_ROOT:
            raise Refused(422, "a checkpoint of size 0 must have the empty tree's root hash")
        # "If the proof is not empty when the old size is zero ... 422."
        if request.old_size == 0 and request.proof:
            raise Refused(422, "the consistency proof from old size 0 must be empty")
        # "Otherwise, the consistency proof lines MUST encode a Merkle Consistency Proof from the old
        # size to the checkpoint size" and "If the old size matches the checkpoint size, the witness
        # MUST check that the root hashes are also identical": both are 422 (verify_consistency).
        try:
            verify_consistency(size, cp.size, request.proof, root, cp.root_hash)
        except VerificationError as e:
            # "the witness MAY log the request ... as it might be proof of log misbehavior."
            logger.warning("refused a signed checkpoint of %r inconsistent with size %d: %s", cp.origin, size, e)
            raise Refused(422, f"consistency proof: {e}") from e
        # Timestamps never go backwards for an origin, even if the clock does.
        timestamp = max(self._clock(), last_time)
        cosignature = self._state.cosigner.cosign(verified.note.text, timestamp)
        note = format_note(Note(verified.note.text, (*verified.note.signatures, cosignature)))
        # "The witness MUST persist the new checkpoint before responding."
        self._state.commit(Record(cp.origin, cp.size, cp.root_hash, timestamp, note))
        return Response(200, cosignature.to_line().encode("utf-8"))
