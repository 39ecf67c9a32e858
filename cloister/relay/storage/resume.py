"""What a restarted enclave needs to continue the stored log: the proto's `ResumeFrom`.

The enclave (enclave/resume.py) trusts none of it: it verifies the key entry's attestation,
the checkpoint's signature by that key, the key entry's inclusion (RFC 9162 §2.1.3), that the
compact range at S plus the entries [S, N) hash to the checkpoint's root (RFC 9162 §2.1.1), and
the boundary entry at S - 1 with its inclusion proof. This module only gathers the material.

S is chosen from the newest complete snapshot (docs/decisions/0016-snapshots-and-chunked-resume.md):
its first part's index, or its `open_from` when that is earlier (a decision still open at the
snapshot must be in the history). A snapshot comes every few thousand entries, so S is close to
N whatever the log's size. For a log with no snapshot within `SNAPSHOT_SEARCH` entries of its end
(one written before snapshots), the entries [S, N) cover the enclave's longest limit window: the
first index whose entry time is at or after `window_start_ms`, so that entry S - 1 is older than
the window; but never more than `max_history_entries` entries back.

The entries themselves are read in chunks as they are sent (`resume_chunks`), never all at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from cloister.relay.storage.errors import StorageCorruption, StorageError
from cloister.relay.storage.store import MAX_READ_ENTRIES, LogStore
from cloister.verify.entries import SnapshotEntry, parse_entry
from cloister.verify.errors import DecodeError
from cloister.verify.tiles import TILE_WIDTH

__all__ = ["SNAPSHOT_SEARCH", "ResumeMaterial", "ResumePlan", "resume_chunks", "resume_material", "resume_plan"]

# How far back from the end a snapshot is looked for: a few snapshot intervals (the enclave
# writes one every 10,000 entries), so one cut short by a stop is passed over.
SNAPSHOT_SEARCH = 50_000
# A chunk of a streamed resume: at most this many entries (the enclave's cap) and about this
# many bytes (one gRPC message, well under MAX_MESSAGE_BYTES).
CHUNK_ENTRIES = 4096
CHUNK_BYTES = 4 << 20
_SNAPSHOT_TYPE = b"\x61t\x68snapshot"  # "t": "snapshot", as CBOR text


@dataclass(frozen=True)
class ResumeMaterial:
    """Exactly the fields of `cloister.wire.ResumeFrom`: `ResumeFrom(**dataclasses.asdict(m))`."""

    checkpoint: bytes
    range_size: int
    range_hashes: list[bytes]
    entries: list[bytes]
    key_entry: bytes
    key_entry_index: int
    key_entry_proof: list[bytes]
    boundary_entry: bytes
    boundary_proof: list[bytes]


def _time_ms(store: LogStore, index: int, data: bytes) -> int:
    try:
        return parse_entry(data).time_ms
    except DecodeError as e:
        raise StorageCorruption(f"{store.backend.description}: stored entry {index} does not parse: {e}") from e


def _history_start(store: LogStore, size: int, max_history_entries: int, window_start_ms: int | None) -> int:
    if window_start_ms is None:
        return size
    floor = max(0, size - max_history_entries)
    start = size
    # Walk back a bundle at a time until an entry older than the window (or the floor).
    while start > floor:
        chunk_start = max(floor, (start - 1) // TILE_WIDTH * TILE_WIDTH)
        chunk = store.read_entries(chunk_start, start)
        for i in range(len(chunk) - 1, -1, -1):
            if _time_ms(store, chunk_start + i, chunk[i]) < window_start_ms:
                return chunk_start + i + 1
        start = chunk_start
    return floor


def _snapshot_start(store: LogStore, size: int, search: int) -> int | None:
    """S for the newest complete snapshot within `search` entries of the end, or None.

    Only the enclave's checks count: a snapshot that does not prove out is refused there."""
    floor = max(0, size - search)
    end = size
    while end > floor:
        chunk_start = max(floor, (end - 1) // TILE_WIDTH * TILE_WIDTH)
        chunk = store.read_entries(chunk_start, end)
        for i in range(len(chunk) - 1, -1, -1):
            index = chunk_start + i
            if _SNAPSHOT_TYPE not in chunk[i][:16]:
                continue  # cheap filter: the type comes first in deterministic CBOR (shortest key)
            try:
                entry = parse_entry(chunk[i])
            except DecodeError as e:
                raise StorageCorruption(f"{store.backend.description}: stored entry {index} does not parse: {e}") from e
            if isinstance(entry, SnapshotEntry) and entry.part == 0 and _complete(store, index, entry, size):
                return min(entry.upto, entry.open_from)
        end = chunk_start
    return None


def _complete(store: LogStore, index: int, first: SnapshotEntry, size: int) -> bool:
    """Whether all the parts of the snapshot at `index` are stored after it (one cut short by a
    stop is not used by the enclave, so a resume must start before an earlier one)."""
    if first.upto != index or index + first.parts > size:
        return False
    for k, data in enumerate(store.read_entries(index + 1, index + first.parts), start=1):
        try:
            part = parse_entry(data)
        except DecodeError:
            return False
        if not isinstance(part, SnapshotEntry) or part.part != k or part.header() != first.header():
            return False
    return True


@dataclass(frozen=True)
class ResumePlan:
    """A resume of the log of size `end`: its material without entries, which are [range_size, end)."""

    material: ResumeMaterial
    end: int


def resume_plan(
    store: LogStore, max_history_entries: int, window_start_ms: int | None, *, snapshot_search: int = SNAPSHOT_SEARCH
) -> ResumePlan | None:
    """What resuming the latest durable checkpoint (size N) takes, or None for an empty log."""
    if not 0 <= max_history_entries <= MAX_READ_ENTRIES:
        raise ValueError(f"max_history_entries {max_history_entries} is outside [0, {MAX_READ_ENTRIES}]")
    note = store.latest_checkpoint()
    size = store.durable_size
    if note is None or size == 0:
        return None
    key_index = store.latest_key_entry(size)
    if key_index is None:
        raise StorageError(f"{store.backend.description}: the log of size {size} has no key entry to resume from")
    start = _snapshot_start(store, size, snapshot_search)
    if start is None:
        start = _history_start(store, size, max_history_entries, window_start_ms)
    (key_entry,) = store.read_entries(key_index, key_index + 1)
    boundary_entry, boundary_proof = b"", []
    if start > 0:
        (boundary_entry,) = store.read_entries(start - 1, start)
        boundary_proof = store.inclusion_proof(start - 1, size)
    material = ResumeMaterial(
        checkpoint=note,
        range_size=start,
        range_hashes=store.compact_range(start),
        entries=[],
        key_entry=key_entry,
        key_entry_index=key_index,
        key_entry_proof=store.inclusion_proof(key_index, size),
        boundary_entry=boundary_entry,
        boundary_proof=boundary_proof,
    )
    return ResumePlan(material, size)


def resume_chunks(store: LogStore, start: int, end: int) -> Iterator[tuple[int, list[bytes]]]:
    """The entries [start, end) as (first index, entries), each chunk within CHUNK_ENTRIES and
    about CHUNK_BYTES, read as they are asked for."""
    index = start
    while index < end:
        read = store.read_entries(index, min(end, index + CHUNK_ENTRIES))
        taken, size = 0, 0
        while taken < len(read) and (taken == 0 or size + len(read[taken]) <= CHUNK_BYTES):
            size += len(read[taken])
            taken += 1
        yield index, read[:taken]
        index += taken


def resume_material(store: LogStore, max_history_entries: int, window_start_ms: int | None) -> ResumeMaterial | None:
    """The whole ResumeFrom (entries included) for the latest durable checkpoint, or None for an
    empty log: for a log small enough to send in one message (StartLog)."""
    plan = resume_plan(store, max_history_entries, window_start_ms)
    if plan is None:
        return None
    m = plan.material
    return replace(m, entries=store.read_entries(m.range_size, plan.end))
