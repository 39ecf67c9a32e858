"""C2SP tiled transparency logs (https://c2sp.org/tlog-tiles): paths, tile shapes, parsing.

- Hash tiles live at `tile/<L>/<N>[.p/<W>]`: at tile level L, hash i of tile N is the Merkle
  Tree Hash of the perfect subtree of 256**L leaves starting at leaf (N*256 + i) * 256**L,
  i.e. Merkle level 8*L. A full tile holds 256 hashes (8,192 bytes); the rightmost tile of a
  level may be partial, with W in 1..255 hashes. Merkle levels between multiples of 8 are not
  stored: they are recomputed inside a tile.
- Entry bundles live at `tile/entries/<N>[.p/<W>]`: up to 256 entries, each a big-endian uint16
  length followed by that many bytes. Entry i of bundle N is leaf N*256 + i.
- The index N is written in zero-padded 3-digit path elements, all but the last prefixed with
  `x`: 1234067 is `x001/x234/067`.

Paths here are relative to the log's URL prefix. Nothing here trusts a tile: a wrong tile only
makes a computed root or proof fail verification against a signed checkpoint.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from cloister.verify.errors import DecodeError
from cloister.verify.merkle import HASH_SIZE, MAX_TREE_SIZE, node_hash

__all__ = [
    "MAX_ENTRY_SIZE",
    "MAX_TILE_LEVEL",
    "TILE_HEIGHT",
    "TILE_WIDTH",
    "EntryBundleId",
    "HashTileId",
    "TileLevel",
    "TileNodeSource",
    "decode_tile_index",
    "encode_entry_bundle",
    "encode_tile_index",
    "entry_bundle_path",
    "entry_bundles",
    "hash_tile_path",
    "hash_tile_width",
    "hash_tiles",
    "parse_entry_bundle",
    "parse_hash_tile",
    "parse_tile_path",
    "tile_levels",
]

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_TILE_LEVEL = 63
MAX_ENTRY_SIZE = 0xFFFF
# 2**64 leaves need at most 20 decimal digits, i.e. 7 path elements.
_MAX_INDEX_ELEMENTS = 7

_INDEX = r"(?:x[0-9]{3}/){0,6}[0-9]{3}"
_TILE_PATH = re.compile(rf"tile/(entries|0|[1-9][0-9]?)/({_INDEX})(?:\.p/([1-9][0-9]{{0,2}}))?")


def encode_tile_index(n: int) -> str:
    """`1234067` -> `x001/x234/067`; `0` -> `000`."""
    if not 0 <= n < MAX_TREE_SIZE:
        raise ValueError(f"tile index {n} is outside [0, 2**64)")
    groups = []
    while True:
        groups.append(f"{n % 1000:03d}")
        n //= 1000
        if n == 0:
            break
    groups.reverse()
    return "/".join([*("x" + g for g in groups[:-1]), groups[-1]])


def decode_tile_index(text: str) -> int:
    """The inverse of encode_tile_index; only the canonical encoding is accepted."""
    elements = text.split("/")
    if len(elements) > _MAX_INDEX_ELEMENTS:
        raise DecodeError(f"tile index {text[:60]!r} has more than {_MAX_INDEX_ELEMENTS} elements")
    if not re.fullmatch(_INDEX, text):
        raise DecodeError(f"tile index {text[:60]!r} is not 'x<3 digits>/.../<3 digits>'")
    if len(elements) > 1 and elements[0] == "x000":
        raise DecodeError(f"tile index {text!r} has a leading zero element")
    n = int("".join(e.removeprefix("x") for e in elements))
    if n >= MAX_TREE_SIZE:
        raise DecodeError(f"tile index {text!r} does not fit in 64 bits")
    return n


def _width_suffix(width: int) -> str:
    if not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"tile width {width} is outside [1, {TILE_WIDTH}]")
    return "" if width == TILE_WIDTH else f".p/{width}"


def hash_tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """`tile/<L>/<N>[.p/<W>]`; width 256 is a full tile (no suffix)."""
    if not 0 <= level <= MAX_TILE_LEVEL:
        raise ValueError(f"tile level {level} is outside [0, {MAX_TILE_LEVEL}]")
    return f"tile/{level}/{encode_tile_index(index)}{_width_suffix(width)}"


def entry_bundle_path(index: int, width: int = TILE_WIDTH) -> str:
    """`tile/entries/<N>[.p/<W>]`; width 256 is a full bundle (no suffix)."""
    return f"tile/entries/{encode_tile_index(index)}{_width_suffix(width)}"


@dataclass(frozen=True)
class HashTileId:
    """Tile `index` at tile level `level` (Merkle level 8*level), holding `width` hashes."""

    level: int
    index: int
    width: int = TILE_WIDTH

    @property
    def is_partial(self) -> bool:
        return self.width < TILE_WIDTH

    def path(self) -> str:
        return hash_tile_path(self.level, self.index, self.width)


@dataclass(frozen=True)
class EntryBundleId:
    """Entry bundle `index` (leaves index*256 ...), holding `width` entries."""

    index: int
    width: int = TILE_WIDTH

    @property
    def is_partial(self) -> bool:
        return self.width < TILE_WIDTH

    def path(self) -> str:
        return entry_bundle_path(self.index, self.width)


def parse_tile_path(path: str) -> HashTileId | EntryBundleId:
    """Parse a path relative to the log prefix; DecodeError unless it is canonical."""
    if len(path) > 100:
        raise DecodeError(f"tile path {path[:60]!r}... is too long")
    m = _TILE_PATH.fullmatch(path)
    if not m:
        raise DecodeError(f"{path!r} is not a tile path 'tile/<L or entries>/<N>[.p/<W>]'")
    kind, index_text, width_text = m.groups()
    index = decode_tile_index(index_text)
    width = int(width_text) if width_text else TILE_WIDTH
    if width_text and width >= TILE_WIDTH:
        raise DecodeError(f"tile path {path!r}: partial width {width} is not below {TILE_WIDTH}")
    if kind == "entries":
        return EntryBundleId(index, width)
    level = int(kind)
    if level > MAX_TILE_LEVEL:
        raise DecodeError(f"tile path {path!r}: level {level} is above {MAX_TILE_LEVEL}")
    return HashTileId(level, index, width)


# --- Which tiles a tree consists of ----------------------------------------------------------


@dataclass(frozen=True)
class TileLevel:
    """At one tile level: how many full tiles, and the width of the partial tile (0 = none)."""

    level: int
    full_tiles: int
    partial_width: int


def _check_tree_size(size: int) -> None:
    if not 0 <= size < MAX_TREE_SIZE:
        raise ValueError(f"tree size {size} is outside [0, 2**64)")


def tile_levels(size: int) -> list[TileLevel]:
    """The shape of the tree of `size` leaves per tile level, lowest first.

    Level L has floor(size / 256**L) hashes: that many // 256 full tiles and a partial tile of the
    remainder. The levels end at the first with no hash (tlog-tiles §Partial Tiles).
    """
    _check_tree_size(size)
    levels = []
    level = 0
    while hashes := size >> (TILE_HEIGHT * level):
        levels.append(TileLevel(level, hashes >> TILE_HEIGHT, hashes & (TILE_WIDTH - 1)))
        level += 1
    return levels


def hash_tiles(size: int) -> Iterator[HashTileId]:
    """Every hash tile of the tree of `size` leaves, level by level, left to right."""
    for shape in tile_levels(size):
        for n in range(shape.full_tiles):
            yield HashTileId(shape.level, n)
        if shape.partial_width:
            yield HashTileId(shape.level, shape.full_tiles, shape.partial_width)


def entry_bundles(size: int) -> Iterator[EntryBundleId]:
    """Every entry bundle of the tree of `size` leaves, left to right."""
    _check_tree_size(size)
    for n in range(size >> TILE_HEIGHT):
        yield EntryBundleId(n)
    if size & (TILE_WIDTH - 1):
        yield EntryBundleId(size >> TILE_HEIGHT, size & (TILE_WIDTH - 1))


def hash_tile_width(level: int, index: int, size: int) -> int:
    """The width of tile `index` at tile level `level` in the tree of `size` leaves.

    ValueError if the tree has no such tile.
    """
    _check_tree_size(size)
    hashes = size >> (TILE_HEIGHT * level) if level <= MAX_TILE_LEVEL else 0
    width = min(hashes - index * TILE_WIDTH, TILE_WIDTH)
    if index < 0 or width <= 0:
        raise ValueError(f"a tree of size {size} has no tile {index} at level {level}")
    return width


# --- Tile contents ---------------------------------------------------------------------------


def parse_hash_tile(data: bytes, width: int) -> list[bytes]:
    """Split a hash tile of `width` hashes; DecodeError if it is not exactly width * 32 bytes."""
    if not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"tile width {width} is outside [1, {TILE_WIDTH}]")
    if len(data) != width * HASH_SIZE:
        raise DecodeError(f"hash tile is {len(data)} bytes, want {width} hashes of {HASH_SIZE} = {width * HASH_SIZE}")
    return [bytes(data[i : i + HASH_SIZE]) for i in range(0, len(data), HASH_SIZE)]


def parse_entry_bundle(data: bytes, width: int | None = None) -> list[bytes]:
    """Split an entry bundle into its entries (big-endian uint16 length-prefixed).

    DecodeError, naming the offset, on a truncated bundle, data after the 256th entry, an empty
    bundle, or (if `width` is given) a number of entries other than `width`.
    """
    if width is not None and not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"bundle width {width} is outside [1, {TILE_WIDTH}]")
    data = bytes(data)
    entries: list[bytes] = []
    append = entries.append
    end = len(data)
    off = start = 0
    # Hot path of log replay: split first, then check what the loop could not (once per bundle).
    try:
        while off < end:
            start = off + 2
            off = start + ((data[off] << 8) | data[start - 1])
            append(data[start:off])
    except IndexError:
        raise DecodeError(
            f"entry bundle truncated: length prefix of entry {len(entries)} at offset {start - 2} needs 2 bytes, 1 left"
        ) from None
    if off > end:
        raise DecodeError(
            f"entry bundle truncated: entry {len(entries) - 1} at offset {start - 2} has length {off - start}, "
            f"{end - start} bytes left"
        )
    if len(entries) > TILE_WIDTH:
        at = sum(2 + len(e) for e in entries[:TILE_WIDTH])
        raise DecodeError(f"entry bundle has data after {TILE_WIDTH} entries, at offset {at}")
    if not entries:
        raise DecodeError("entry bundle is empty (empty tiles are never served)")
    if width is not None and len(entries) != width:
        raise DecodeError(f"entry bundle has {len(entries)} entries, want {width}")
    return entries


def encode_entry_bundle(entries: Sequence[bytes]) -> bytes:
    """Serialise 1..256 entries of at most 65,535 bytes each."""
    if not 1 <= len(entries) <= TILE_WIDTH:
        raise ValueError(f"an entry bundle holds 1 to {TILE_WIDTH} entries, got {len(entries)}")
    out = bytearray()
    for i, entry in enumerate(entries):
        if len(entry) > MAX_ENTRY_SIZE:
            raise ValueError(f"entry {i} is {len(entry)} bytes, more than {MAX_ENTRY_SIZE}")
        out += len(entry).to_bytes(2, "big")
        out += entry
    return bytes(out)


# --- Perfect-subtree hashes from tiles -------------------------------------------------------


class _Tile:
    """A fetched hash tile and the Merkle levels recomputed above its hashes (lazily)."""

    __slots__ = ("levels", "width")

    def __init__(self, hashes: list[bytes]) -> None:
        self.width = len(hashes)
        self.levels = [hashes]

    def level(self, r: int) -> list[bytes]:
        """Hashes r Merkle levels above the tile's own; only complete pairs are combined."""
        while len(self.levels) <= r:
            below = self.levels[-1]
            self.levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])
        return self.levels[r]


class TileNodeSource:
    """Answers get_node(level, index) for the tree of `size` leaves from its hash tiles.

    `fetch(path)` returns the bytes at a tile path (e.g. from disk or HTTP). Tiles are fetched
    at the width they have in this tree and kept in a small LRU cache; a cached wider tile also
    answers for a narrower one, since a partial tile is a prefix of the later full tile.
    Use `get_node` as the node source of merkle.inclusion_proof, consistency_proof and
    compact_range_hashes.
    """

    def __init__(self, size: int, fetch: Callable[[str], bytes], *, max_cached_tiles: int = 64) -> None:
        _check_tree_size(size)
        if max_cached_tiles < 1:
            raise ValueError("max_cached_tiles must be at least 1")
        self._size = size
        self._fetch = fetch
        self._max = max_cached_tiles
        self._cache: OrderedDict[tuple[int, int], _Tile] = OrderedDict()

    @property
    def size(self) -> int:
        return self._size

    def _tile(self, tile_level: int, tile_index: int, need: int) -> _Tile:
        key = (tile_level, tile_index)
        tile = self._cache.get(key)
        if tile is not None and tile.width >= need:
            self._cache.move_to_end(key)
            return tile
        width = hash_tile_width(tile_level, tile_index, self._size)
        path = hash_tile_path(tile_level, tile_index, width)
        data = self._fetch(path)
        try:
            hashes = parse_hash_tile(data, width)
        except DecodeError as e:
            raise DecodeError(f"{path}: {e}") from e
        tile = _Tile(hashes)
        self._cache[key] = tile
        self._cache.move_to_end(key)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return tile

    def get_node(self, level: int, index: int) -> bytes:
        """Hash of the perfect subtree of 2**level leaves starting at leaf index * 2**level."""
        if level < 0 or index < 0 or (index + 1) << level > self._size:
            raise ValueError(f"no perfect subtree ({level}, {index}) in a tree of size {self._size}")
        tile_level, r = divmod(level, TILE_HEIGHT)
        # The node spans 2**r consecutive hashes of one tile at tile_level (2**r divides 256).
        first = index << r
        tile_index, offset = divmod(first, TILE_WIDTH)
        tile = self._tile(tile_level, tile_index, offset + (1 << r))
        return tile.level(r)[offset >> r]

    __call__ = get_node
