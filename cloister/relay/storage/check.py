"""Checking stored tiles and entry bundles against the published checkpoint, on open.

The storage is untrusted in Cloister's model (auditors verify every proof against checkpoints
the enclave signed), but the parent still refuses to serve or extend a log whose stored form
does not reproduce its own checkpoint: better to stop and say where than to hand out proofs
that fail.

- `full`: read every entry bundle and hash tile of the published tree; check each bundle
  against its level-0 tile (RFC 9162 leaf hashes), each tile at level L+1 against the roots of
  the full tiles at level L (C2SP tlog-tiles), and the leaves against the checkpoint's root
  (RFC 9162 §2.1.1). O(size): about 3.5 s per million entries on a local disk.
- `tail`: recompute the root from the hash tiles on the tree's right edge (the compact range,
  O(log size) tiles) and check the last bundle against its level-0 tile. O(log size).

Both return what the store needs to continue: the partial tile of every level, the entries of
the partial bundle, and (full mode) the indexes of the log's key entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cloister.relay.storage.base import Backend
from cloister.relay.storage.edge import subtree_root
from cloister.relay.storage.errors import StorageCorruption
from cloister.verify.entries import KeyEntry, parse_entry
from cloister.verify.errors import DecodeError
from cloister.verify.merkle import CompactRange, compact_range_hashes, leaf_hash, node_hash
from cloister.verify.tiles import (
    TILE_WIDTH,
    TileNodeSource,
    entry_bundle_path,
    hash_tile_path,
    parse_entry_bundle,
    parse_hash_tile,
    tile_levels,
)

__all__ = ["CheckMode", "Published", "check_published", "is_key_entry"]

CheckMode = Literal["full", "tail"]


@dataclass(frozen=True)
class Published:
    partial_tiles: list[list[bytes]]
    partial_bundle: list[bytes]
    key_indexes: list[int] | None  # None when not scanned (tail mode)


# Deterministic CBOR (RFC 8949 §4.2.1) sorts map keys length-first, so every entry starts with
# its map header and then "t" and its value: a key entry is a1..b7 61 74 63 6b 65 79. This only
# pre-filters; cloister.verify.entries.parse_entry confirms.
_KEY_PREFIX = b"\x61t\x63key"


def is_key_entry(data: bytes) -> bool:
    """True if `data` is a log entry of type `key` (KeyEntry)."""
    if data[1:7] != _KEY_PREFIX:
        return False
    try:
        return isinstance(parse_entry(data), KeyEntry)
    except DecodeError:
        return False


def _fetcher(backend: Backend, size: int) -> Callable[[str], bytes]:
    def fetch(path: str) -> bytes:
        data = backend.read(path)
        if data is None:
            raise StorageCorruption(
                f"{backend.description}: {path} is missing; the published checkpoint (size {size}) needs it"
            )
        return data

    return fetch


def _hashes(fetch: Callable[[str], bytes], where: str, level: int, tile: int, width: int) -> list[bytes]:
    path = hash_tile_path(level, tile, width)
    try:
        return parse_hash_tile(fetch(path), width)
    except DecodeError as e:
        raise StorageCorruption(f"{where}: {path}: {e}") from e


def _bundle(fetch: Callable[[str], bytes], where: str, index: int, width: int) -> list[bytes]:
    path = entry_bundle_path(index, width)
    try:
        return parse_entry_bundle(fetch(path), width)
    except DecodeError as e:
        raise StorageCorruption(f"{where}: {path}: {e}") from e


def _compare(where: str, path: str, stored: list[bytes], computed: list[bytes], what: str) -> None:
    for i, (a, b) in enumerate(zip(stored, computed, strict=True)):
        if a != b:
            raise StorageCorruption(f"{where}: {path}: hash {i} does not match {what}")


def check_published(backend: Backend, size: int, root: bytes, mode: CheckMode) -> Published:
    """Check the stored tree of `size` leaves against `root`; StorageCorruption on disagreement."""
    where = backend.description
    if size == 0:
        return Published([], [], [])
    fetch = _fetcher(backend, size)
    shape = tile_levels(size)
    if mode == "full":
        return _check_full(fetch, where, size, root, len(shape))
    # Tail: the root from the right-edge tiles, then the last bundle against its tile.
    source = TileNodeSource(size, fetch)
    try:
        hashes = compact_range_hashes(size, source.get_node)
    except DecodeError as e:
        raise StorageCorruption(f"{where}: {e}") from e
    if hashes:
        computed = hashes[-1]
        for h in reversed(hashes[:-1]):
            computed = node_hash(h, computed)
        if computed != root:
            raise StorageCorruption(
                f"{where}: the hash tiles of the published tree (size {size}) give root {computed.hex()}, "
                f"the published checkpoint says {root.hex()}"
            )
    partial = [_hashes(fetch, where, s.level, s.full_tiles, s.partial_width) if s.partial_width else [] for s in shape]
    bundle: list[bytes] = []
    if size:
        last = (size - 1) // TILE_WIDTH
        width = size - last * TILE_WIDTH
        entries = _bundle(fetch, where, last, width)
        tile0 = _hashes(fetch, where, 0, last, width)
        _compare(
            where,
            hash_tile_path(0, last, width),
            tile0,
            [leaf_hash(e) for e in entries],
            f"the leaf hash of its entry in {entry_bundle_path(last, width)}",
        )
        if width < TILE_WIDTH:
            bundle = entries
    return Published(partial, bundle, None)


def _check_full(fetch: Callable[[str], bytes], where: str, size: int, root: bytes, levels: int) -> Published:
    cr = CompactRange()
    keys: list[int] = []
    partial: list[list[bytes]] = [[] for _ in range(levels)]
    bundle: list[bytes] = []
    # Level 0: bundles against tiles; `above` collects the roots of full tiles (tile level 1).
    above: list[bytes] = []
    for index in range((size + TILE_WIDTH - 1) // TILE_WIDTH):
        width = min(TILE_WIDTH, size - index * TILE_WIDTH)
        entries = _bundle(fetch, where, index, width)
        leaves = [leaf_hash(e) for e in entries]
        for i, (e, h) in enumerate(zip(entries, leaves, strict=True)):
            cr.append(h)
            if e[1:7] == _KEY_PREFIX and is_key_entry(e):
                keys.append(index * TILE_WIDTH + i)
        tile = _hashes(fetch, where, 0, index, width)
        _compare(
            where,
            hash_tile_path(0, index, width),
            tile,
            leaves,
            f"the leaf hash of its entry in {entry_bundle_path(index, width)}",
        )
        if width == TILE_WIDTH:
            above.append(subtree_root(leaves))
        else:
            partial[0], bundle = leaves, entries
    # Levels 1 and up: each stored tile against the roots computed from the level below.
    for level in range(1, levels):
        computed, above = above, []
        for index in range((len(computed) + TILE_WIDTH - 1) // TILE_WIDTH):
            want = computed[index * TILE_WIDTH : (index + 1) * TILE_WIDTH]
            tile = _hashes(fetch, where, level, index, len(want))
            _compare(
                where,
                hash_tile_path(level, index, len(want)),
                tile,
                want,
                f"the root of the tile it covers at level {level - 1}",
            )
            if len(want) == TILE_WIDTH:
                above.append(subtree_root(want))
            else:
                partial[level] = want
    if cr.root() != root:
        raise StorageCorruption(
            f"{where}: the stored entry bundles (size {size}) hash to root {cr.root().hex()}, "
            f"the published checkpoint says {root.hex()}"
        )
    return Published(partial, bundle, keys)
