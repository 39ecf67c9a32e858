"""What a restarted enclave needs to continue the stored log: the proto's `ResumeFrom`.

The enclave (enclave/resume.py) trusts none of it: it verifies the key entry's attestation,
the checkpoint's signature by that key, the key entry's inclusion (RFC 9162 §2.1.3), that the
compact range at S plus the entries [S, N) hash to the checkpoint's root (RFC 9162 §2.1.1), and
the boundary entry at S - 1 with its inclusion proof. This module only gathers the material.

S is chosen so that the entries [S, N) cover the enclave's longest limit window: the first
index whose entry time is at or after `window_start_ms`, so that entry S - 1 is older than the
window; but never more than `max_history_entries` entries back.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloister.relay.storage.errors import StorageCorruption, StorageError
from cloister.relay.storage.store import MAX_READ_ENTRIES, LogStore
from cloister.verify.entries import parse_entry
from cloister.verify.errors import DecodeError
from cloister.verify.tiles import TILE_WIDTH

__all__ = ["ResumeMaterial", "resume_material"]


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


def resume_material(store: LogStore, max_history_entries: int, window_start_ms: int | None) -> ResumeMaterial | None:
    """The ResumeFrom for the latest durable checkpoint (size N), or None for an empty log."""
    if not 0 <= max_history_entries <= MAX_READ_ENTRIES:
        raise ValueError(f"max_history_entries {max_history_entries} is outside [0, {MAX_READ_ENTRIES}]")
    note = store.latest_checkpoint()
    size = store.durable_size
    if note is None or size == 0:
        return None
    key_index = store.latest_key_entry(size)
    if key_index is None:
        raise StorageError(f"{store.backend.description}: the log of size {size} has no key entry to resume from")
    start = _history_start(store, size, max_history_entries, window_start_ms)
    (key_entry,) = store.read_entries(key_index, key_index + 1)
    boundary_entry, boundary_proof = b"", []
    if start > 0:
        (boundary_entry,) = store.read_entries(start - 1, start)
        boundary_proof = store.inclusion_proof(start - 1, size)
    return ResumeMaterial(
        checkpoint=note,
        range_size=start,
        range_hashes=store.compact_range(start),
        entries=store.read_entries(start, size),
        key_entry=key_entry,
        key_entry_index=key_index,
        key_entry_proof=store.inclusion_proof(key_index, size),
        boundary_entry=boundary_entry,
        boundary_proof=boundary_proof,
    )
