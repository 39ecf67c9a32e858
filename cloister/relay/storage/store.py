"""LogStore: the log's durable storage, synchronous and thread-safe.

Layout under the backend's prefix (C2SP tlog-tiles, https://c2sp.org/tlog-tiles, plus ours):

    checkpoint                    the latest *published* checkpoint (C2SP signed note)
    tile/<L>/<N>[.p/<W>]          hash tiles; full tiles are written once, partial ones as they grow
    tile/entries/<N>[.p/<W>]      entry bundles, likewise
    wal/...                       the write-ahead log (parent.storage.wal frames)
    bodies/<N>.<args|result>      bodies beside the log (parent.storage.bodies)
    meta/key-entries              indexes of the log's key entries, for resuming an enclave

Three sizes describe the state, E >= D >= P:

- E (`written_size`): entries in the WAL, contiguous from 0. Entries in [D, E) were never
  acknowledged: no durable checkpoint covers them yet.
- D (`durable_size`): the size of the latest checkpoint in the WAL (or published). Index i is
  acknowledged once D > i. The writer only acknowledges what `append_batch` returned.
- P (`published_size`): tiles, bundles and the public `checkpoint` are materialized up to P.
  Tiles are written before the checkpoint that needs them.

The store is driven by `cloister.relay.storage.writer.LogWriter`: `append_batch` and `compact_wal` run
on one WAL thread, `materialize` on one materializer thread, readers on any thread.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from cloister.relay.storage.base import Backend
from cloister.relay.storage.bodies import BodyKind, BodyRecord, body_path, check_body_kind, encode_body, parse_body
from cloister.relay.storage.check import _KEY_PREFIX, CheckMode, check_published, is_key_entry
from cloister.relay.storage.edge import EntryEdge, TileEdge, subtree_root
from cloister.relay.storage.errors import StorageCorruption, StorageError, StorageInconsistency
from cloister.relay.storage.wal import (
    Frame,
    WalBody,
    WalCheckpoint,
    WalEntries,
    WalRecord,
    WalTruncate,
    decode_chunk,
    encode_frame,
)
from cloister.verify.checkpoint import parse_checkpoint
from cloister.verify.errors import DecodeError
from cloister.verify.merkle import (
    EMPTY_ROOT,
    CompactRange,
    compact_range_hashes,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
)
from cloister.verify.note import parse_note
from cloister.verify.tiles import (
    MAX_ENTRY_SIZE,
    TILE_HEIGHT,
    TILE_WIDTH,
    EntryBundleId,
    encode_entry_bundle,
    entry_bundle_path,
    hash_tile_path,
    parse_entry_bundle,
    parse_hash_tile,
    parse_tile_path,
)

__all__ = ["MAX_READ_ENTRIES", "Batch", "CheckpointInfo", "LogStore", "parse_checkpoint_note"]

logger = logging.getLogger("cloister.storage")

CHECKPOINT_PATH = "checkpoint"
KEY_INDEX_PATH = "meta/key-entries"
_KEY_INDEX_MAGIC = b"CLK1"
# One call never returns more entries than this (resume material is bounded by the caller).
MAX_READ_ENTRIES = 1 << 20
MAX_KEY_ENTRIES = 1 << 20
_TILE_CACHE = 512
_BUNDLE_CACHE = 16
_RECENT_ROOTS = 4096


@dataclass(frozen=True)
class CheckpointInfo:
    """What the storage needs from a signed checkpoint note: size, root, origin (unverified)."""

    size: int
    root: bytes
    origin: str
    note: bytes


def parse_checkpoint_note(note: bytes) -> CheckpointInfo:
    """Split a C2SP signed note (cloister.verify.note) and parse its text as a C2SP checkpoint.

    Signatures are not verified: on the write path the checkpoint comes from the enclave, and
    auditors verify what is served. DecodeError if the note is malformed.
    """
    cp = parse_checkpoint(parse_note(note).text)
    return CheckpointInfo(cp.size, cp.root_hash, cp.origin, bytes(note))


@dataclass
class Batch:
    """One group commit: contiguous entries from `first_index`, checkpoints covering at most
    `first_index + len(entries)`, and bodies. Becomes one WAL frame."""

    first_index: int
    entries: list[bytes] = field(default_factory=list)
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    bodies: list[BodyRecord] = field(default_factory=list)


class _Expanded:
    """A full tile and the Merkle levels above its hashes, computed on demand."""

    __slots__ = ("levels",)

    def __init__(self, hashes: list[bytes]) -> None:
        self.levels = [hashes]

    def level(self, r: int) -> list[bytes]:
        while len(self.levels) <= r:
            below = self.levels[-1]
            self.levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below), 2)])
        return self.levels[r]


def _encode_key_index(indexes: Sequence[int]) -> bytes:
    return _KEY_INDEX_MAGIC + b"".join(struct.pack(">Q", i) for i in indexes)


def _parse_key_index(data: bytes, size: int, where: str) -> list[int]:
    body = data[len(_KEY_INDEX_MAGIC) :]
    if not data.startswith(_KEY_INDEX_MAGIC) or len(body) % 8 or len(body) // 8 > MAX_KEY_ENTRIES:
        raise StorageCorruption(f"{where}: {KEY_INDEX_PATH} is not a list of at most {MAX_KEY_ENTRIES} indexes")
    out = [int.from_bytes(body[i : i + 8], "big") for i in range(0, len(body), 8)]
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise StorageCorruption(f"{where}: {KEY_INDEX_PATH} is not increasing")
    # A crash after materializing but before publishing leaves indexes beyond the published
    # size; the WAL replay finds those key entries again.
    return [i for i in out if i < size]


def _fold(hashes: Sequence[bytes]) -> bytes:
    """Root of a tree from its compact range (RFC 9162 §2.1.1, right to left)."""
    h = hashes[-1]
    for left in reversed(hashes[:-1]):
        h = node_hash(left, h)
    return h


class LogStore:
    """The durable log. Open with `LogStore.open(backend)`; see the module docstring."""

    def __init__(self, backend: Backend) -> None:
        # Use LogStore.open; the constructor only sets up an empty store.
        self.backend = backend
        self._lock = threading.RLock()
        self._failed: BaseException | None = None
        self._origin: str | None = None
        self._tiles = TileEdge(0, [])
        self._entries = EntryEdge(0, [])
        self._range = CompactRange()  # at E, to check checkpoint roots as entries arrive
        self._durable: CheckpointInfo | None = None
        self._published: CheckpointInfo | None = None
        self._keys: list[int] = []
        self._keys_stored = -1  # how many of _keys meta/key-entries holds (-1: unknown)
        self._bodies: dict[tuple[int, str], BodyRecord] = {}  # in the WAL, not yet materialized
        self._next_seq = 0
        self._frames: list[tuple[int, int]] = []  # (seq, highest index it mentions) of kept frames
        self._materialized_seq = -1
        self._tile_cache: OrderedDict[tuple[int, int], _Expanded] = OrderedDict()
        self._bundle_cache: OrderedDict[int, list[bytes]] = OrderedDict()
        self._recent_roots: OrderedDict[int, bytes] = OrderedDict()

    # --- Opening and recovery ----------------------------------------------------------------

    @classmethod
    def open(cls, backend: Backend, *, verify: CheckMode = "full") -> LogStore:
        """Open (or create) the log in `backend`, recovering from a crash if needed.

        1. Check the published tiles and bundles against the published checkpoint (`verify`).
        2. Replay the WAL: cut a torn last frame, refuse corruption, rebuild entries,
           checkpoints and bodies; the durable size D is the largest checkpoint.
        3. Check that the entries reproduce every checkpoint's root; forget entries and bodies
           at or beyond D (never acknowledged), durably (a TRUNCATE frame).
        4. Materialize up to D and publish its checkpoint.

        The store owns `backend` from here on: it is closed if opening fails, and by close().
        """
        store = cls(backend)
        try:
            store._recover(verify)
            store.materialize()
            store.compact_wal()
        except BaseException:
            backend.close()
            raise
        return store

    def _recover(self, verify: CheckMode) -> None:
        where = self.backend.description
        published_note = self.backend.read(CHECKPOINT_PATH)
        size, root = 0, b""
        if published_note is not None:
            try:
                pub = parse_checkpoint_note(published_note)
            except DecodeError as e:
                raise StorageCorruption(f"{where}: {CHECKPOINT_PATH} is not a checkpoint note: {e}") from e
            self._published = self._durable = pub
            self._origin = pub.origin
            size, root = pub.size, pub.root
        published = check_published(self.backend, size, root, verify)
        self._tiles = TileEdge(size, published.partial_tiles)
        self._entries = EntryEdge(size, published.partial_bundle)
        if size:
            self._range = CompactRange.from_hashes(size, compact_range_hashes(size, self._node_unchecked))
        keys = published.key_indexes
        if keys is None:
            keys = self._load_key_index(size)
        else:
            stored = self.backend.read(KEY_INDEX_PATH)
            if stored is not None and stored == _encode_key_index(keys):
                self._keys_stored = len(keys)
        self._keys = keys
        self._replay_wal(size)

    def _load_key_index(self, size: int) -> list[int]:
        data = self.backend.read(KEY_INDEX_PATH)
        if data is not None:
            keys = _parse_key_index(data, size, self.backend.description)
            if data == _encode_key_index(keys):
                self._keys_stored = len(keys)
            return keys
        if size == 0:
            return []
        logger.warning(
            "%s: %s is missing; scanning all %d entries for key entries", self.backend.description, KEY_INDEX_PATH, size
        )
        keys = []
        for start in range(0, size, TILE_WIDTH):
            for i, e in enumerate(self._read(start, min(size, start + TILE_WIDTH), size)):
                if e[1:7] == _KEY_PREFIX and is_key_entry(e):
                    keys.append(start + i)
        return keys

    def _wal_frames(self) -> list[Frame]:
        chunks = self.backend.wal_load()
        frames: list[Frame] = []
        next_seq = chunks[0].first_seq if chunks else 0
        for n, chunk in enumerate(chunks):
            if chunk.first_seq != next_seq:
                raise StorageCorruption(
                    f"{self.backend.description}: WAL {chunk.name} starts at frame {chunk.first_seq}, "
                    f"expected {next_seq} (a WAL chunk is missing)"
                )
            last = n == len(chunks) - 1
            decoded = decode_chunk(
                chunk.data, chunk.name, chunk.first_seq, tail_may_tear=last and self.backend.wal_tail_may_tear
            )
            if decoded.torn_reason is not None:
                logger.warning(
                    "%s: WAL %s: cutting a torn write at offset %d (%s); it was never acknowledged",
                    self.backend.description,
                    chunk.name,
                    decoded.valid_length,
                    decoded.torn_reason,
                )
            if decoded.valid_length < len(chunk.data):
                # A torn write, or the preallocated zeros after the last frame.
                self.backend.wal_truncate_tail(chunk, decoded.valid_length)
            frames.extend(decoded.frames)
            next_seq = chunk.first_seq + len(decoded.frames)
        self._next_seq = next_seq
        return frames

    def _replay_wal(self, published: int) -> None:  # noqa: C901 (over the gate before it existed; split when next changed)
        where = self.backend.description
        frames = self._wal_frames()
        tail_first: int | None = None
        tail: list[bytes] = []
        checkpoints: list[tuple[CheckpointInfo, str]] = []
        bodies: dict[tuple[int, str], BodyRecord] = {}
        for frame in frames:
            top = -1
            for rec in frame.records:
                if isinstance(rec, WalEntries):
                    if tail_first is None:
                        tail_first = rec.first
                    elif rec.first != tail_first + len(tail):
                        raise StorageCorruption(
                            f"{where}: {frame.where}: entries start at {rec.first}, but the WAL so far ends at "
                            f"{tail_first + len(tail)}"
                        )
                    tail.extend(rec.entries)
                    top = max(top, rec.first + len(rec.entries) - 1)
                elif isinstance(rec, WalCheckpoint):
                    try:
                        cp = parse_checkpoint_note(rec.note)
                    except DecodeError as e:
                        raise StorageCorruption(f"{where}: {frame.where}: checkpoint note: {e}") from e
                    checkpoints.append((cp, frame.where))
                elif isinstance(rec, WalBody):
                    bodies[(rec.body.index, rec.body.kind)] = rec.body
                    top = max(top, rec.body.index)
                else:
                    self._replay_truncate(rec, frame.where, checkpoints, bodies)
                    if tail_first is not None:
                        del tail[max(0, rec.size - tail_first) :]
                        if rec.size < tail_first:
                            tail_first = rec.size
            self._frames.append((frame.seq, top))
        durable = self._durable
        for cp, cp_where in checkpoints:
            if self._origin is not None and cp.origin != self._origin:
                raise StorageCorruption(f"{where}: {cp_where}: checkpoint origin {cp.origin!r} is not {self._origin!r}")
            self._origin = cp.origin
            if durable is None or cp.size > durable.size:
                durable = cp
        d = durable.size if durable else 0
        if d > published and (tail_first is None or tail_first > published or tail_first + len(tail) < d):
            have = "none" if tail_first is None else f"[{tail_first}, {tail_first + len(tail)})"
            raise StorageCorruption(
                f"{where}: the WAL's checkpoint at size {d} needs entries [{published}, {d}), but the WAL holds {have}"
            )
        # Entries the WAL repeats below the published size must match the stored ones in memory.
        if tail_first is not None and tail_first < published:
            lo = max(tail_first, self._entries.base)
            if lo < published and tail[lo - tail_first : published - tail_first] != self._entries.get(lo, published):
                raise StorageCorruption(f"{where}: WAL entries in [{lo}, {published}) differ from the stored bundles")
        # Extend to D, checking the root of every checkpoint on the way.
        by_size = sorted(checkpoints, key=lambda c: c[0].size)
        for cp, cp_where in by_size:
            if cp.size <= published:
                if self._root_at(cp.size) != cp.root:
                    raise StorageCorruption(
                        f"{where}: {cp_where}: checkpoint at size {cp.size} does not match the stored tree's root"
                    )
                continue
            assert tail_first is not None
            self._extend(tail[self._range.size - tail_first : cp.size - tail_first], self._range.size)
            if self._range.root() != cp.root:
                raise StorageCorruption(
                    f"{where}: {cp_where}: checkpoint at size {cp.size} has root {cp.root.hex()}, the WAL's "
                    f"entries hash to {self._range.root().hex()}"
                )
        self._durable = durable
        dropped_entries = (tail_first + len(tail) - d) if tail_first is not None else 0
        dropped_bodies = [k for k in bodies if k[0] >= d]
        for k in dropped_bodies:
            del bodies[k]
        self._bodies = bodies
        if dropped_entries > 0 or dropped_bodies:
            logger.warning(
                "%s: recovery truncates the log to its latest durable checkpoint (size %d): %d entries and %d "
                "bodies beyond it were never acknowledged and are forgotten",
                where,
                d,
                max(0, dropped_entries),
                len(dropped_bodies),
            )
            self._append_frame([WalTruncate(d)], -1)

    @staticmethod
    def _replay_truncate(
        rec: WalTruncate,
        where: str,
        checkpoints: list[tuple[CheckpointInfo, str]],
        bodies: dict[tuple[int, str], BodyRecord],
    ) -> None:
        for cp, _ in checkpoints:
            if cp.size > rec.size:
                raise StorageCorruption(f"{where}: TRUNCATE to {rec.size} below a durable checkpoint at {cp.size}")
        for k in [k for k in bodies if k[0] >= rec.size]:
            del bodies[k]

    def _extend(self, entries: Sequence[bytes], first: int) -> None:
        """Add entries [first, first + len) to the in-memory edge (the caller checks roots)."""
        hashes = [leaf_hash(e) for e in entries]
        with self._lock:
            for h in hashes:
                self._range.append(h)
            self._tiles.append(hashes)
            self._entries.extend(entries)
            for i, e in enumerate(entries):
                if e[1:7] == _KEY_PREFIX and is_key_entry(e):
                    if len(self._keys) >= MAX_KEY_ENTRIES:
                        raise StorageError(f"more than {MAX_KEY_ENTRIES} key entries in one log")
                    self._keys.append(first + i)

    # --- State ---------------------------------------------------------------------------------

    @property
    def written_size(self) -> int:
        """E: entries in the WAL (some maybe not yet covered by a durable checkpoint)."""
        with self._lock:
            return self._tiles.size

    @property
    def durable_size(self) -> int:
        """D: entries covered by a durable checkpoint; every index below D is acknowledged."""
        with self._lock:
            return self._durable.size if self._durable else 0

    @property
    def published_size(self) -> int:
        """P: entries in the materialized tiles and the public checkpoint."""
        with self._lock:
            return self._published.size if self._published else 0

    @property
    def origin(self) -> str | None:
        return self._origin

    def latest_checkpoint(self) -> bytes | None:
        """The latest durable checkpoint note (size D), or None for an empty log."""
        with self._lock:
            return self._durable.note if self._durable else None

    def published_checkpoint(self) -> bytes | None:
        with self._lock:
            return self._published.note if self._published else None

    def _check_ok(self) -> None:
        if self._failed is not None:
            raise StorageError(f"the log store failed earlier and accepts no more writes: {self._failed}")

    # --- Write path (WAL thread) ---------------------------------------------------------------

    def _append_frame(self, records: list[WalRecord], top: int) -> None:
        with self._lock:
            seq = self._next_seq
        self.backend.wal_append(seq, encode_frame(seq, records))
        with self._lock:
            self._next_seq = seq + 1
            self._frames.append((seq, top))

    def append_batch(self, batch: Batch) -> int:
        """Make `batch` durable as one WAL frame (one fsync or PUT) and return the durable size.

        Before anything is written, every checkpoint's root is checked against the entries
        (StorageInconsistency if they disagree). Any error here is fatal for the store: its
        memory may be ahead of the WAL, so it must be reopened.
        """
        self._check_ok()
        try:
            return self._append_batch(batch)
        except BaseException as e:
            self._failed = e
            raise

    def _append_batch(self, batch: Batch) -> int:  # noqa: C901 (over the gate before it existed; split when next changed)
        start = self.written_size
        if batch.first_index != start:
            raise ValueError(f"batch starts at {batch.first_index}, the WAL ends at {start}")
        end = start + len(batch.entries)
        for i, e in enumerate(batch.entries):
            if len(e) > MAX_ENTRY_SIZE:
                raise ValueError(f"entry {start + i} is {len(e)} bytes, more than {MAX_ENTRY_SIZE}")
        durable: CheckpointInfo | None = self._durable
        new: list[CheckpointInfo] = []
        for cp in batch.checkpoints:
            if self._origin is not None and cp.origin != self._origin:
                raise StorageInconsistency(
                    f"checkpoint for size {cp.size} has origin {cp.origin!r}, the stored log's is {self._origin!r}"
                )
            if cp.size > end:
                raise ValueError(f"checkpoint at size {cp.size} is beyond the batch's end {end}")
            if cp.size > start:
                new.append(cp)
            else:
                self._check_old_checkpoint(cp)
        new.sort(key=lambda c: c.size)
        # Hash the new entries, checking each checkpoint's root at its size as it is reached.
        pos = start
        for target in [*new, None]:
            stop = end if target is None else target.size
            if stop > pos:
                self._extend(batch.entries[pos - start : stop - start], pos)
                pos = stop
            if target is not None:
                cp = target
                root = self._range.root()
                if root != cp.root:
                    raise StorageInconsistency(
                        f"checkpoint at size {cp.size} has root {cp.root.hex()}, but the entries the enclave sent "
                        f"hash to {root.hex()}"
                    )
                self._remember_root(cp.size, cp.root)
                if durable is None or cp.size > durable.size:
                    durable = cp
        records: list[WalRecord] = [WalBody(b) for b in batch.bodies]
        if batch.entries:
            records.append(WalEntries(start, tuple(batch.entries)))
        advanced = durable is not None and durable is not self._durable
        if advanced:
            assert durable is not None
            records.append(WalCheckpoint(durable.note))
            self._origin = durable.origin
        if records:
            top = max([end - 1, *(b.index for b in batch.bodies)])
            self._append_frame(records, top)
        with self._lock:
            for b in batch.bodies:
                self._bodies[(b.index, b.kind)] = b
            self._durable = durable
        return durable.size if durable else 0

    def _remember_root(self, size: int, root: bytes) -> None:
        self._recent_roots[size] = root
        while len(self._recent_roots) > _RECENT_ROOTS:
            self._recent_roots.popitem(last=False)

    def _check_old_checkpoint(self, cp: CheckpointInfo) -> None:
        """A checkpoint at or below the WAL's end (e.g. a late response): its root must agree."""
        known = self._recent_roots.get(cp.size)
        root = known if known is not None else self._root_at(cp.size)
        if root != cp.root:
            raise StorageInconsistency(
                f"checkpoint at size {cp.size} has root {cp.root.hex()}, the stored log's root at that size is "
                f"{root.hex()}"
            )

    def compact_wal(self) -> None:
        """Drop WAL frames whose content is all materialized (WAL thread)."""
        with self._lock:
            published = self._published.size if self._published else 0
            drop = 0
            while (
                drop < len(self._frames)
                and self._frames[drop][0] <= self._materialized_seq
                and self._frames[drop][1] < published
            ):
                drop += 1
            if not drop:
                return
            keep_from = self._frames[drop][0] if drop < len(self._frames) else self._next_seq
            next_seq = self._next_seq
            del self._frames[:drop]
        self.backend.wal_drop_before(keep_from, next_seq)

    # --- Materialization (materializer thread) -------------------------------------------------

    def unmaterialized(self) -> int:
        """Entries durable but not yet in tiles (D - P)."""
        return self.durable_size - self.published_size

    def needs_materialize(self) -> bool:
        with self._lock:
            d = self._durable.size if self._durable else 0
            return (
                self._durable is not self._published
                or any(k[0] < d for k in self._bodies)
                or self._keys_stored != self._count_keys_below(d)
            )

    def _count_keys_below(self, size: int) -> int:
        n = len(self._keys)
        while n and self._keys[n - 1] >= size:
            n -= 1
        return n

    def materialize(self) -> bool:
        """Write tiles, bundles, bodies and the key index up to D, then publish D's checkpoint.

        Idempotent and retryable: state changes only after every write succeeded.
        Returns False if there was nothing to do.
        """
        with self._lock:
            durable = self._durable
            d = durable.size if durable else 0
            p = self._published.size if self._published else 0
            items = self._tiles.tiles_to_store(d, p) + self._entries.bundles_to_store(d, p)
            bodies = [(k, b) for k, b in self._bodies.items() if k[0] < d]
            nkeys = self._count_keys_below(d)
            keys = self._keys[:nkeys] if nkeys != self._keys_stored else None
            seq_mark = self._next_seq - 1
            publish = durable is not None and durable is not self._published
        if not items and not bodies and keys is None and not publish:
            with self._lock:
                self._materialized_seq = max(self._materialized_seq, seq_mark)
            return False
        writes = [(path, data) for path, data, _ in items]
        writes += [(body_path(b.index, b.kind), encode_body(b)) for _, b in bodies]
        if keys is not None:
            writes.append((KEY_INDEX_PATH, _encode_key_index(keys)))
        self.backend.write_many(writes)
        if publish:
            assert durable is not None
            self.backend.write(CHECKPOINT_PATH, durable.note)
        with self._lock:
            self._published = durable
            self._tiles.forget_stored(d)
            self._entries.forget_stored(d)
            for k, b in bodies:
                if self._bodies.get(k) is b:
                    del self._bodies[k]
            if keys is not None:
                self._keys_stored = len(keys)
            self._materialized_seq = max(self._materialized_seq, seq_mark)
        # Partial versions of tiles that are now full are obsolete: clients fall back to the
        # full tile (tlog-tiles), and read_path serves any narrower width from it.
        for path, _, full in items:
            if full:
                try:
                    self.backend.delete_prefix(path + ".p/")
                except Exception:  # best effort: a leftover partial tile is harmless
                    logger.exception("%s: could not delete partial tiles of %s", self.backend.description, path)
        return True

    # --- Reading ------------------------------------------------------------------------------

    def _expanded(self, level: int, tile: int) -> _Expanded:
        """A full tile (immutable), from memory or storage, through a small LRU cache."""
        key = (level, tile)
        with self._lock:
            cached = self._tile_cache.get(key)
            if cached is not None:
                self._tile_cache.move_to_end(key)
                return cached
            hashes = self._tiles.hashes(level, tile * TILE_WIDTH, (tile + 1) * TILE_WIDTH)
        if hashes is None:
            path = hash_tile_path(level, tile)
            data = self.backend.read(path)
            if data is None:
                raise StorageCorruption(f"{self.backend.description}: {path} is missing")
            try:
                hashes = parse_hash_tile(data, TILE_WIDTH)
            except DecodeError as e:
                raise StorageCorruption(f"{self.backend.description}: {path}: {e}") from e
        tile_obj = _Expanded(hashes)
        with self._lock:
            self._tile_cache[key] = tile_obj
            while len(self._tile_cache) > _TILE_CACHE:
                self._tile_cache.popitem(last=False)
        return tile_obj

    def _node_unchecked(self, level: int, index: int) -> bytes:
        tile_level, r = divmod(level, TILE_HEIGHT)
        first = index << r
        tile, offset = divmod(first, TILE_WIDTH)
        with self._lock:
            count = self._tiles.size >> (TILE_HEIGHT * tile_level)
            if (tile + 1) * TILE_WIDTH > count:
                # The tile is partial: always in memory.
                hashes = self._tiles.hashes(tile_level, first, first + (1 << r))
                if hashes is None:
                    raise StorageError(f"partial tile {tile} at level {tile_level} is not in memory")
                return subtree_root(hashes)
        return self._expanded(tile_level, tile).level(r)[offset >> r]

    def get_node(self, level: int, index: int) -> bytes:
        """Hash of the perfect subtree of 2**level leaves at leaf index * 2**level, within D.

        The `merkle.GetNode` for proofs: from stored tiles or the in-memory right edge.
        """
        d = self.durable_size
        if level < 0 or index < 0 or (index + 1) << level > d:
            raise ValueError(f"no perfect subtree ({level}, {index}) in the durable tree of size {d}")
        return self._node_unchecked(level, index)

    def _root_at(self, size: int) -> bytes:
        return _fold(compact_range_hashes(size, self._node_unchecked)) if size else EMPTY_ROOT

    def _check_size(self, size: int, what: str = "tree size") -> int:
        d = self.durable_size
        if not 0 <= size <= d:
            raise ValueError(f"{what} {size} is outside the durable log [0, {d}]")
        return d

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 §2.1.3.1 inclusion proof of leaf `index` in the tree of `size` (<= D)."""
        self._check_size(size)
        return inclusion_proof(index, size, self.get_node)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """RFC 9162 §2.1.4.1 consistency proof from size1 to size2 (<= D)."""
        self._check_size(size2, "size2")
        return consistency_proof(size1, size2, self.get_node)

    def compact_range(self, size: int) -> list[bytes]:
        """The roots of the perfect subtrees covering [0, size), left to right."""
        self._check_size(size)
        return compact_range_hashes(size, self.get_node)

    def _full_bundle(self, index: int) -> list[bytes]:
        with self._lock:
            cached = self._bundle_cache.get(index)
            if cached is not None:
                self._bundle_cache.move_to_end(index)
                return cached
        path = entry_bundle_path(index)
        data = self.backend.read(path)
        if data is None:
            raise StorageCorruption(f"{self.backend.description}: {path} is missing")
        try:
            entries = parse_entry_bundle(data, TILE_WIDTH)
        except DecodeError as e:
            raise StorageCorruption(f"{self.backend.description}: {path}: {e}") from e
        with self._lock:
            self._bundle_cache[index] = entries
            while len(self._bundle_cache) > _BUNDLE_CACHE:
                self._bundle_cache.popitem(last=False)
        return entries

    def _read(self, start: int, end: int, limit: int) -> list[bytes]:
        if not 0 <= start <= end <= limit:
            raise ValueError(f"entries [{start}, {end}) are outside the log [0, {limit})")
        if end - start > MAX_READ_ENTRIES:
            raise ValueError(f"{end - start} entries requested, at most {MAX_READ_ENTRIES} per read")
        with self._lock:
            base = self._entries.base
            memory = self._entries.get(max(start, base), end) if end > base else []
        out: list[bytes] = []
        pos = start
        while pos < min(end, base):
            bundle = pos // TILE_WIDTH
            stop = min(end, base, (bundle + 1) * TILE_WIDTH)
            out.extend(self._full_bundle(bundle)[pos - bundle * TILE_WIDTH : stop - bundle * TILE_WIDTH])
            pos = stop
        out.extend(memory)
        return out

    def read_entries(self, start: int, end: int) -> list[bytes]:
        """Entries [start, end) of the durable log (at most MAX_READ_ENTRIES)."""
        return self._read(start, end, self.durable_size)

    def written_entries(self, start: int, end: int) -> list[bytes]:
        """Entries [start, end) of everything in the WAL, durable or not (for duplicate checks)."""
        return self._read(start, end, self.written_size)

    def read_path(self, path: str) -> bytes | None:
        """The bytes of a tlog-tiles object of the *published* tree, or None.

        Serves `checkpoint`, hash tiles and entry bundles at any width up to the published one
        (a narrower partial tile is a prefix of a wider one). Never bodies, WAL or meta.
        """
        if path == CHECKPOINT_PATH:
            return self.published_checkpoint()
        try:
            tid = parse_tile_path(path)
        except DecodeError:
            return None
        p = self.published_size
        if isinstance(tid, EntryBundleId):
            have = min(TILE_WIDTH, p - tid.index * TILE_WIDTH)
            if tid.width > have:
                return None
            start = tid.index * TILE_WIDTH
            return encode_entry_bundle(self._read(start, start + tid.width, p))
        have = min(TILE_WIDTH, (p >> (TILE_HEIGHT * tid.level)) - tid.index * TILE_WIDTH)
        if tid.width > have:
            return None
        first = tid.index * TILE_WIDTH
        with self._lock:
            full = (tid.index + 1) * TILE_WIDTH <= self._tiles.size >> (TILE_HEIGHT * tid.level)
            hashes = None if full else self._tiles.hashes(tid.level, first, first + tid.width)
        if hashes is None:
            hashes = self._expanded(tid.level, tid.index).level(0)[: tid.width]
        return b"".join(hashes)

    # --- Key entries and bodies ---------------------------------------------------------------

    def latest_key_entry(self, size: int) -> int | None:
        """Index of the latest key entry below `size`, or None."""
        with self._lock:
            n = self._count_keys_below(size)
            return self._keys[n - 1] if n else None

    def get_body_record(self, index: int, kind: str) -> BodyRecord | None:
        """The stored body (or tombstone) committed to by entry `index`, or None."""
        kind_ = check_body_kind(kind)
        with self._lock:
            rec = self._bodies.get((index, kind_))
        if rec is not None:
            return rec
        path = body_path(index, kind_)
        data = self.backend.read(path)
        if data is None:
            return None
        rec = parse_body(data, f"{self.backend.description}: {path}")
        if (rec.index, rec.kind) != (index, kind_):
            raise StorageCorruption(
                f"{self.backend.description}: {path} holds the {rec.kind} body of entry {rec.index}"
            )
        return rec

    def prune_bodies(self, older_than_ms: int) -> int:
        """Delete stored bodies and tombstones last written before `older_than_ms`; return how many."""
        old = [path for path, mtime in self.backend.list_objects("bodies/") if mtime * 1000 < older_than_ms]
        if old:
            self.backend.delete(old)
        return len(old)

    def close(self) -> None:
        self.backend.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


__all__ += ["BodyKind", "now_ms"]
