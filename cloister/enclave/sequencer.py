"""The log sequencer: where an entry gets its index.

The enclave keeps only the compact range of the tree (O(log n) hashes, RFC 9162 §2.1), so its
memory does not grow with the log. `append` assigns the next index and extends the range;
`checkpoint_covering` returns a C2SP signed checkpoint that covers a given size, signing at
most one checkpoint at a time: callers that arrive while a signature is being made wait for
it and share the next one (group commit), so throughput holds under concurrency.

Entries stay in a bounded buffer until the parent confirms it persisted them (its durable
size rides on every request). When the buffer is full the sequencer refuses to append:
the enclave stops deciding rather than sequence entries that storage cannot keep up with.
"""

from __future__ import annotations

import base64
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cloister.verify.checkpoint import Checkpoint
from cloister.verify.errors import DecodeError
from cloister.verify.merkle import HASH_SIZE, MAX_TREE_SIZE, CompactRange, leaf_hash
from cloister.verify.note import Ed25519NoteSigner

MAX_PENDING_ENTRIES = 100_000
MAX_PENDING_BYTES = 64 << 20


class Backpressure(Exception):
    """The parent has not persisted enough of the log; the enclave will not sequence more."""


@dataclass(frozen=True)
class SignedCheckpoint:
    size: int
    root: bytes
    note: bytes


class CheckpointText:
    """A checkpoint's note text for one origin and extension lines: `Checkpoint.to_text`, byte for
    byte (tests/enclave pin it), with the lines that do not change checked and joined once. Lines
    a checkpoint cannot carry fail every signature, as Checkpoint would (the error is kept)."""

    __slots__ = ("_error", "_head", "_tail")

    def __init__(self, origin: str, extensions: tuple[str, ...]) -> None:
        self._error: DecodeError | None = None
        try:  # the checks Checkpoint makes of these lines, once (a size and a root pass them)
            Checkpoint(origin=origin, size=0, root_hash=bytes(HASH_SIZE), extensions=extensions)
        except DecodeError as exc:
            self._error = exc
        self._head = f"{origin}\n".encode()
        self._tail = "".join(f"{line}\n" for line in extensions).encode()

    def of(self, size: int, root: bytes) -> bytes:
        if self._error is not None:
            raise self._error
        if not 0 <= size < MAX_TREE_SIZE or len(root) != HASH_SIZE:
            raise DecodeError(f"no checkpoint has size {size} and a {len(root)}-byte root")
        return b"".join((self._head, b"%d\n" % size, base64.b64encode(root), b"\n", self._tail))


class Sequencer:
    def __init__(
        self,
        origin: str,
        signer: Ed25519NoteSigner,
        tree: CompactRange | None = None,
        *,
        max_pending: int = MAX_PENDING_ENTRIES,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        on_signed: Callable[[SignedCheckpoint], None] | None = None,
    ) -> None:
        """`on_signed` sees every checkpoint signed, before anyone receives it (the witness gate
        remembers them, cloister.enclave.freshness)."""
        self.origin = origin
        self._on_signed = on_signed
        self._signer = signer
        self._tree = tree.copy() if tree is not None else CompactRange.empty()
        # Serialises appends; callers that must make a decision and its append atomic hold it.
        self.lock = threading.RLock()
        self._pending: deque[bytes] = deque()
        self._pending_first = self._tree.size
        self._pending_bytes = 0
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._cp_cond = threading.Condition()
        self._signing = False
        self._latest: SignedCheckpoint | None = None
        self._text = CheckpointText(origin, ())  # replaced whole under `lock`

    def set_extensions(self, extensions: tuple[str, ...]) -> None:
        """Extension lines for the checkpoints that follow (the caller holds `lock`). Lines a
        checkpoint cannot carry make every later signature fail (DecodeError), until replaced."""
        self._text = CheckpointText(self.origin, extensions)

    @property
    def size(self) -> int:
        return self._tree.size

    def tree(self) -> CompactRange:
        with self.lock:
            return self._tree.copy()

    def append(self, entry: bytes) -> int:
        """Sequence one entry and return its index. Raises Backpressure when storage lags."""
        with self.lock:
            if len(self._pending) >= self._max_pending or self._pending_bytes + len(entry) > self._max_pending_bytes:
                raise Backpressure(
                    f"{len(self._pending)} log entries are waiting to be persisted by the parent; "
                    "refusing to sequence more until storage catches up"
                )
            index = self._tree.size
            self._tree.append(leaf_hash(entry))
            self._pending.append(entry)
            self._pending_bytes += len(entry)
            return index

    def release(self, persisted_size: int) -> None:
        """The parent has durably stored every entry below `persisted_size`."""
        with self.lock:
            persisted_size = min(persisted_size, self._tree.size)
            while self._pending_first < persisted_size and self._pending:
                self._pending_bytes -= len(self._pending.popleft())
                self._pending_first += 1

    def pending_from(self, start: int) -> tuple[int, list[bytes]]:
        """Buffered entries from `start` (or the oldest still buffered) to the end."""
        with self.lock:
            skip = max(0, start - self._pending_first)
            return self._pending_first + skip, list(self._pending)[skip:]

    def pending_range(self, first: int, count: int) -> list[bytes]:
        with self.lock:
            offset = first - self._pending_first
            if offset < 0:
                raise IndexError(f"entry {first} is no longer buffered")
            return [self._pending[offset + i] for i in range(count)]

    def checkpoint_covering(self, size: int) -> SignedCheckpoint:
        """A signed checkpoint whose size is at least `size` (group commit)."""
        with self._cp_cond:
            while True:
                if self._latest is not None and self._latest.size >= size:
                    return self._latest
                if not self._signing:
                    self._signing = True
                    break
                self._cp_cond.wait()
        signed: SignedCheckpoint | None = None
        try:
            with self.lock:
                tree_size, root, text = self._tree.size, self._tree.root(), self._text
            signed = SignedCheckpoint(
                size=tree_size, root=root, note=self._signer.sign_note_alone(text.of(tree_size, root))
            )
            if self._on_signed is not None:
                self._on_signed(signed)
        finally:
            with self._cp_cond:
                self._signing = False
                if signed is not None and (self._latest is None or signed.size > self._latest.size):
                    self._latest = signed
                self._cp_cond.notify_all()
        assert signed is not None and signed.size >= size
        return signed

    def latest_checkpoint(self) -> SignedCheckpoint:
        return self.checkpoint_covering(self.size)
