"""The right edge of a tiled log, kept in memory until it is stored as full tiles.

C2SP tlog-tiles (https://c2sp.org/tlog-tiles): at tile level L, hash i is the Merkle Tree
Hash (RFC 9162 §2.1.1) of the perfect subtree of 256**L leaves starting at leaf i * 256**L;
tile N holds hashes N*256 ... N*256+255. Entry bundle N holds entries N*256 ... N*256+255.

`TileEdge` keeps, for every tile level, the hashes from the first tile that has not been
stored as a *full* tile yet. Appending a leaf appends to level 0, and each time 256 hashes of a
level complete a tile, that tile's root becomes the next hash of the level above. So the edge
always holds the hashes of at most a few tiles per level (more while tiles wait to be
written), whatever the size of the log. `EntryEdge` does the same for entry bundles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cloister.verify.merkle import node_hash
from cloister.verify.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    encode_entry_bundle,
    entry_bundle_path,
    hash_tile_path,
)

__all__ = ["EntryEdge", "TileEdge", "subtree_root"]


def subtree_root(hashes: Sequence[bytes]) -> bytes:
    """Root of a perfect subtree from its 2**k leaf-level hashes (RFC 9162 §2.1.1)."""
    level = list(hashes)
    if not level or len(level) & (len(level) - 1):
        raise ValueError(f"{len(level)} hashes do not form a perfect subtree")
    while len(level) > 1:
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def _width(count: int, tile: int) -> int:
    """Width of tile `tile` in a level of `count` hashes (0 if the level has no such tile)."""
    return max(0, min(TILE_WIDTH, count - tile * TILE_WIDTH))


class TileEdge:
    """Hashes of every tile level, from the first tile not yet stored as a full tile."""

    def __init__(self, size: int, partial_tiles: Sequence[Sequence[bytes]]) -> None:
        """Start at tree size `size`, given the hashes of the partial tile of each level in it
        (an empty sequence for a level whose hash count is a multiple of 256)."""
        self._size = size
        self._base: list[int] = []
        self._levels: list[list[bytes]] = []
        level = 0
        while (count := size >> (TILE_HEIGHT * level)) or level < len(partial_tiles):
            partial = list(partial_tiles[level]) if level < len(partial_tiles) else []
            if len(partial) != count % TILE_WIDTH:
                raise ValueError(f"level {level} of a tree of size {size} needs {count % TILE_WIDTH} partial hashes")
            self._base.append(count - len(partial))
            self._levels.append(partial)
            level += 1

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf_hashes: Iterable[bytes]) -> None:
        levels, base = self._levels, self._base
        if not levels:
            levels.append([])
            base.append(0)
        level0 = levels[0]
        for h in leaf_hashes:
            level0.append(h)
            self._size += 1
            level = 0
            # A tile of this level just completed: its root is the next hash one level up.
            while (base[level] + len(levels[level])) % TILE_WIDTH == 0:
                root = subtree_root(levels[level][-TILE_WIDTH:])
                if level + 1 == len(levels):
                    levels.append([])
                    base.append(0)
                levels[level + 1].append(root)
                level += 1

    def hashes(self, level: int, start: int, end: int) -> list[bytes] | None:
        """Hashes [start, end) of tile level `level`, or None if start is below the edge.

        IndexError if the level does not have `end` hashes yet.
        """
        if level >= len(self._levels) or start < self._base[level]:
            return None
        base, hashes = self._base[level], self._levels[level]
        if end - base > len(hashes):
            raise IndexError(f"tile level {level} has {base + len(hashes)} hashes, not {end}")
        return hashes[start - base : end - base]

    def in_memory(self, level: int, tile: int) -> bool:
        return level < len(self._levels) and tile * TILE_WIDTH >= self._base[level]

    def tiles_to_store(self, size: int, stored_size: int) -> list[tuple[str, bytes, bool]]:
        """(path, tile bytes, is full) of the tiles of tree `size` that tree `stored_size` did not
        have at the same width: new full tiles and the grown partial tiles."""
        out: list[tuple[str, bytes, bool]] = []
        for level, (base, hashes) in enumerate(zip(self._base, self._levels, strict=True)):
            count = size >> (TILE_HEIGHT * level)
            old_count = stored_size >> (TILE_HEIGHT * level)
            for tile in range(base // TILE_WIDTH, (count + TILE_WIDTH - 1) // TILE_WIDTH):
                width = _width(count, tile)
                if width == _width(old_count, tile):
                    continue
                start = tile * TILE_WIDTH - base
                out.append(
                    (hash_tile_path(level, tile, width), b"".join(hashes[start : start + width]), width == TILE_WIDTH)
                )
        return out

    def forget_stored(self, size: int) -> None:
        """Drop the full tiles of tree `size` (they are stored now), keeping each level's last
        partial tile and anything beyond `size`."""
        for level in range(len(self._levels)):
            keep_from = (size >> (TILE_HEIGHT * level)) // TILE_WIDTH * TILE_WIDTH
            drop = keep_from - self._base[level]
            if drop > 0:
                del self._levels[level][:drop]
                self._base[level] = keep_from


class EntryEdge:
    """Entries from the first bundle not yet stored as a full bundle."""

    def __init__(self, size: int, partial_bundle: Sequence[bytes]) -> None:
        if len(partial_bundle) != size % TILE_WIDTH:
            raise ValueError(f"a log of size {size} needs {size % TILE_WIDTH} entries in its partial bundle")
        self._base = size - len(partial_bundle)
        self._entries = list(partial_bundle)

    @property
    def base(self) -> int:
        return self._base

    @property
    def size(self) -> int:
        return self._base + len(self._entries)

    def extend(self, entries: Iterable[bytes]) -> None:
        self._entries.extend(entries)

    def get(self, start: int, end: int) -> list[bytes]:
        """Entries [start, end); start must be at or above `base`."""
        if start < self._base or end > self.size:
            raise IndexError(f"entries [{start}, {end}) are not all in memory [{self._base}, {self.size})")
        return self._entries[start - self._base : end - self._base]

    def bundles_to_store(self, size: int, stored_size: int) -> list[tuple[str, bytes, bool]]:
        out: list[tuple[str, bytes, bool]] = []
        for bundle in range(self._base // TILE_WIDTH, (size + TILE_WIDTH - 1) // TILE_WIDTH):
            width = _width(size, bundle)
            if width == _width(stored_size, bundle):
                continue
            start = bundle * TILE_WIDTH - self._base
            out.append(
                (
                    entry_bundle_path(bundle, width),
                    encode_entry_bundle(self._entries[start : start + width]),
                    width == TILE_WIDTH,
                )
            )
        return out

    def forget_stored(self, size: int) -> None:
        keep_from = size // TILE_WIDTH * TILE_WIDTH
        drop = keep_from - self._base
        if drop > 0:
            del self._entries[:drop]
            self._base = keep_from
