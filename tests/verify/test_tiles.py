"""C2SP tlog-tiles: paths, tree shapes, tile and bundle parsing, and proofs served from tiles."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.verify.checkpoint import verify_checkpoint
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import (
    CompactRange,
    compact_range_hashes,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from cloister.verify.note import Ed25519NoteVerifier
from cloister.verify.tiles import (
    TILE_WIDTH,
    EntryBundleId,
    HashTileId,
    TileLevel,
    TileNodeSource,
    decode_tile_index,
    encode_entry_bundle,
    encode_tile_index,
    entry_bundle_path,
    entry_bundles,
    hash_tile_path,
    hash_tile_width,
    hash_tiles,
    parse_entry_bundle,
    parse_hash_tile,
    parse_tile_path,
    tile_levels,
)

TLOG = Path(__file__).resolve().parent.parent / "fixtures" / "tlog"
EXAMPLES = json.loads((TLOG / "tiles" / "tile_path_examples.json").read_text())
LOG_DIR = TLOG / "tessera_testdata_log"
LOG = json.loads((LOG_DIR / "log.json").read_text())
LOG_KEY = Ed25519NoteVerifier.from_vkey(LOG["vkey"])
ENTRIES = [e.encode() for e in LOG["entries_ascii_in_order"]]
TILES = {path: bytes.fromhex(h) for path, h in json.loads((LOG_DIR / "tiles_hex.json").read_text())["tiles"].items()}


# --- Paths -------------------------------------------------------------------------------------


def test_index_encoding_examples() -> None:
    for ex in EXAMPLES["index_encoding"]:
        assert encode_tile_index(ex["n"]) == ex["path_element"]
        assert decode_tile_index(ex["path_element"]) == ex["n"]


def test_tree_shape_examples() -> None:
    for size in (70000, 256):
        want = EXAMPLES[f"tree_size_{size}"]
        got = tile_levels(size)
        assert got == [
            TileLevel(int(k.removeprefix("level")), v["full_tiles"], v["partial_width"]) for k, v in want.items()
        ]
    assert tile_levels(0) == []
    assert tile_levels(1) == [TileLevel(0, 0, 1)]


def test_sumdb_example_is_the_c2sp_path_without_the_height_element() -> None:
    # golang/mod sumdb puts the tile height in the path (tile/<H>/<L>/...); C2SP fixes H = 8.
    ex = EXAMPLES["sumdb_example"]
    t = ex["tile"]
    c2sp_path = hash_tile_path(t["L"], t["N"], t["W"])
    assert ex["path"] == f"tile/{t['H']}/" + c2sp_path.removeprefix("tile/")
    assert parse_tile_path(c2sp_path) == HashTileId(t["L"], t["N"], t["W"])
    with pytest.raises(DecodeError, match="not a tile path"):
        parse_tile_path(ex["path"])


def test_paths() -> None:
    assert hash_tile_path(0, 0) == "tile/0/000"
    assert hash_tile_path(1, 1234067, 17) == "tile/1/x001/x234/067.p/17"
    assert entry_bundle_path(1000) == "tile/entries/x001/000"
    assert entry_bundle_path(5, 255) == "tile/entries/005.p/255"
    assert parse_tile_path("tile/entries/x001/000") == EntryBundleId(1000)
    assert parse_tile_path("tile/63/999.p/1") == HashTileId(63, 999, 1)
    assert HashTileId(0, 0, 5).is_partial and not HashTileId(0, 0).is_partial
    assert EntryBundleId(0, 5).is_partial and not EntryBundleId(3).is_partial
    assert encode_tile_index(2**64 - 1) == "x018/x446/x744/x073/x709/x551/615"
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            encode_tile_index(bad)
    for level, width in ((-1, 1), (64, 1), (0, 0), (0, 257)):
        with pytest.raises(ValueError):
            hash_tile_path(level, 0, width)


@pytest.mark.parametrize(
    "path",
    [
        "tile/0/67",
        "tile/0/0067",
        "tile/0/x000/067",
        "tile/0/x1/234",
        "tile/0/001/234",
        "tile/00/000",
        "tile/64/000",
        "tile/0/000.p/0",
        "tile/0/000.p/256",
        "tile/0/000.p/007",
        "tile/0/000.p/",
        "tile/0/000.p/1/",
        "tile/entries/000.p/",
        "/tile/0/000",
        "tile/0/000/",
        "tile/-1/000",
        "tile/entries",
        "tile/data/000",
        "tile/0/x001/x002/x003/x004/x005/x006/x007/000",
        "tile/0/x018/x446/x744/x073/x709/x551/616",
        "tile/0/\u0660\u0660\u0660",
        "tile/0/000" + "/" * 200,
    ],
)
def test_non_canonical_paths_are_rejected(path: str) -> None:
    with pytest.raises(DecodeError):
        parse_tile_path(path)


@given(
    st.integers(min_value=0, max_value=63),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=1, max_value=256),
)
def test_path_round_trip(level: int, index: int, width: int) -> None:
    assert decode_tile_index(encode_tile_index(index)) == index
    assert parse_tile_path(hash_tile_path(level, index, width)) == HashTileId(level, index, width)
    assert parse_tile_path(entry_bundle_path(index, width)) == EntryBundleId(index, width)


# --- Which tiles a tree consists of ------------------------------------------------------------


def test_hash_tiles_and_bundles_of_a_tree() -> None:
    tiles = list(hash_tiles(70000))
    assert len(tiles) == 273 + 1 + 1 + 1 + 1
    assert tiles[272] == HashTileId(0, 272) and tiles[273] == HashTileId(0, 273, 112)
    assert tiles[-3:] == [HashTileId(1, 0), HashTileId(1, 1, 17), HashTileId(2, 0, 1)]
    bundles = list(entry_bundles(70000))
    assert len(bundles) == 274 and bundles[-1] == EntryBundleId(273, 112)
    assert list(entry_bundles(512)) == [EntryBundleId(0), EntryBundleId(1)]
    assert list(hash_tiles(256)) == [HashTileId(0, 0), HashTileId(1, 0, 1)]
    assert list(hash_tiles(0)) == [] and list(entry_bundles(0)) == []
    assert hash_tile_width(0, 273, 70000) == 112 and hash_tile_width(1, 0, 70000) == 256
    for level, index in ((0, 274), (3, 0), (0, -1), (70, 0)):
        with pytest.raises(ValueError, match="has no tile"):
            hash_tile_width(level, index, 70000)


# --- Tile and bundle contents ------------------------------------------------------------------


def test_parse_hash_tile() -> None:
    data = bytes(range(64))
    assert parse_hash_tile(data, 2) == [data[:32], data[32:]]
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(DecodeError, match="want 2 hashes of 32 = 64"):
            parse_hash_tile(bad, 2)
    with pytest.raises(ValueError):
        parse_hash_tile(b"", 0)


def test_entry_bundle_round_trip_and_errors() -> None:
    entries = [b"", b"a", b"x" * 65535]
    data = encode_entry_bundle(entries)
    assert parse_entry_bundle(data) == entries
    assert parse_entry_bundle(data, 3) == entries
    with pytest.raises(DecodeError, match="3 entries, want 4"):
        parse_entry_bundle(data, 4)
    with pytest.raises(DecodeError, match="length prefix of entry 1 at offset 2 needs 2 bytes, 1 left"):
        parse_entry_bundle(b"\x00\x00\x00")
    with pytest.raises(DecodeError, match="entry 1 at offset 2 has length 5, 3 bytes left"):
        parse_entry_bundle(b"\x00\x00\x00\x05abc")
    with pytest.raises(DecodeError, match="empty"):
        parse_entry_bundle(b"")
    full = encode_entry_bundle([b"e"] * TILE_WIDTH)
    assert len(parse_entry_bundle(full, TILE_WIDTH)) == TILE_WIDTH
    with pytest.raises(DecodeError, match=f"data after 256 entries, at offset {len(full)}"):
        parse_entry_bundle(full + b"\x00\x00")
    with pytest.raises(ValueError, match="65536 bytes"):
        encode_entry_bundle([b"x" * 65536])
    with pytest.raises(ValueError, match="1 to 256"):
        encode_entry_bundle([])
    with pytest.raises(ValueError, match="1 to 256"):
        encode_entry_bundle([b""] * 257)
    with pytest.raises(ValueError):
        parse_entry_bundle(full, 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=TILE_WIDTH))
def test_entry_bundle_round_trip_property(entries: list[bytes]) -> None:
    assert parse_entry_bundle(encode_entry_bundle(entries), len(entries)) == entries


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_bundles_only_raise_decode_error(data: bytes) -> None:
    try:
        entries = parse_entry_bundle(data)
    except DecodeError:
        return
    assert encode_entry_bundle(entries) == data


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_bundles_and_tiles_only_raise_decode_error(data: st.DataObject) -> None:
    bundle = bytearray(TILES["tile/entries/000.p/15"])
    op = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    pos = data.draw(st.integers(min_value=0, max_value=len(bundle) - 1))
    if op == "flip":
        bundle[pos] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    elif op == "truncate":
        del bundle[pos:]
    else:
        bundle[pos:pos] = data.draw(st.binary(min_size=1, max_size=20))
    with contextlib.suppress(DecodeError):
        parse_entry_bundle(bytes(bundle), 15)
    tile = bytes(bundle)  # also garbage as a hash tile
    with contextlib.suppress(DecodeError):
        parse_hash_tile(tile, 15)


# --- The Tessera test log ----------------------------------------------------------------------


def _fetch(path: str) -> bytes:
    # KeyError (a test failure) if we ask for a tile the log does not serve at that size.
    return TILES[path]


def _checkpoint(size: int) -> tuple[int, bytes]:
    cp = verify_checkpoint((LOG_DIR / f"checkpoint.{size}").read_bytes(), [LOG_KEY], origin=LOG["origin"]).checkpoint
    return cp.size, cp.root_hash


CHECKPOINTS = [_checkpoint(n) for n in range(len(ENTRIES) + 1)]


def test_tessera_fixture_has_the_expected_tiles() -> None:
    want = {p for n in range(1, 16) for p in (hash_tile_path(0, 0, n), entry_bundle_path(0, n))}
    assert set(TILES) == want
    for n in range(1, 16):
        assert [t.path() for t in hash_tiles(n)] == [f"tile/0/000.p/{n}"]
        assert [b.path() for b in entry_bundles(n)] == [f"tile/entries/000.p/{n}"]


@pytest.mark.parametrize("size", range(1, len(ENTRIES) + 1))
def test_tessera_tiles_rebuild_every_checkpoint(size: int) -> None:
    cp_size, root = CHECKPOINTS[size]
    assert cp_size == size
    source = TileNodeSource(size, _fetch)
    assert CompactRange.from_hashes(size, compact_range_hashes(size, source.get_node)).root() == root
    # The entry bundle holds the log's entries, and hashes to the level-0 tile.
    bundle = parse_entry_bundle(TILES[entry_bundle_path(0, size)], size)
    assert bundle == ENTRIES[:size]
    assert parse_hash_tile(TILES[hash_tile_path(0, 0, size)], size) == [leaf_hash(e) for e in bundle]
    # Every entry has an inclusion proof at this checkpoint, served from the tiles.
    for index, entry in enumerate(bundle):
        verify_inclusion(leaf_hash(entry), index, size, inclusion_proof(index, size, source), root)
    # And every earlier checkpoint is consistent with this one.
    for size1 in range(size + 1):
        _, root1 = CHECKPOINTS[size1]
        verify_consistency(size1, size, consistency_proof(size1, size, source), root1, root)


def test_tampered_tile_is_caught_against_the_checkpoint() -> None:
    _size, root = CHECKPOINTS[15]
    path = hash_tile_path(0, 0, 15)
    bad = bytearray(TILES[path])
    bad[5 * 32] ^= 1
    source = TileNodeSource(15, lambda p: bytes(bad) if p == path else TILES[p])
    assert CompactRange.from_hashes(15, compact_range_hashes(15, source)).root() != root
    with pytest.raises(VerificationError):
        verify_inclusion(leaf_hash(ENTRIES[1]), 1, 15, inclusion_proof(1, 15, source), root)
    short = TileNodeSource(15, lambda p: TILES[p][:-1])
    with pytest.raises(DecodeError, match=r"tile/0/000\.p/15: hash tile is 479 bytes"):
        short.get_node(0, 0)


# --- A larger tiled tree: nodes above level 8 come from higher tiles ---------------------------


def _perfect_root(hashes: list[bytes]) -> bytes:
    level = hashes
    while len(level) > 1:
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def _build_tiles(leaves: list[bytes]) -> dict[str, bytes]:
    """The tiles of the tree of len(leaves) leaves, built independently of TileNodeSource."""
    size = len(leaves)
    tiles: dict[str, bytes] = {}
    level_hashes = leaves
    level = 0
    while level_hashes:
        for n in range(0, len(level_hashes), TILE_WIDTH):
            chunk = level_hashes[n : n + TILE_WIDTH]
            tiles[hash_tile_path(level, n // TILE_WIDTH, len(chunk))] = b"".join(chunk)
        level_hashes = [
            _perfect_root(level_hashes[n : n + TILE_WIDTH])
            for n in range(0, len(level_hashes) - TILE_WIDTH + 1, TILE_WIDTH)
        ]
        level += 1
    assert set(tiles) == {t.path() for t in hash_tiles(size)}
    return tiles


BIG_SIZE = 70000
BIG_LEAVES = [hashlib.sha256(b"\x00" + i.to_bytes(4, "big")).digest() for i in range(BIG_SIZE)]
BIG_TILES = _build_tiles(BIG_LEAVES)
BIG_ROOT = root_from_leaf_hashes(BIG_LEAVES)


def test_tile_node_source_on_a_three_level_tree() -> None:
    fetched: list[str] = []

    def fetch(path: str) -> bytes:
        fetched.append(path)
        return BIG_TILES[path]

    source = TileNodeSource(BIG_SIZE, fetch)
    root = CompactRange.from_hashes(BIG_SIZE, compact_range_hashes(BIG_SIZE, source)).root()
    assert root == BIG_ROOT
    # Perfect subtrees at every Merkle level, including those recomputed inside a tile.
    rng = random.Random(5)
    for level in range(17):
        for _ in range(3):
            index = rng.randrange(BIG_SIZE >> level)
            want = _perfect_root(BIG_LEAVES[index << level : (index + 1) << level])
            assert source.get_node(level, index) == want
    for _ in range(30):
        index = rng.randrange(BIG_SIZE)
        verify_inclusion(BIG_LEAVES[index], index, BIG_SIZE, inclusion_proof(index, BIG_SIZE, source), root)
    # Old roots from one pass of a compact range over the leaves.
    old_sizes = sorted(rng.sample(range(BIG_SIZE), 30))
    cr = CompactRange.empty()
    for size1 in old_sizes:
        for h in BIG_LEAVES[cr.size : size1]:
            cr.append(h)
        proof = consistency_proof(size1, BIG_SIZE, source)
        verify_consistency(size1, BIG_SIZE, proof, cr.root(), root)
    assert len(fetched) == len(set(fetched)), "a cached tile was fetched twice"
    for level, index in ((0, BIG_SIZE), (17, 0), (-1, 0), (0, -1)):
        with pytest.raises(ValueError, match="no perfect subtree"):
            source.get_node(level, index)


def test_tile_cache_is_bounded() -> None:
    fetched: list[str] = []

    def fetch(path: str) -> bytes:
        fetched.append(path)
        return BIG_TILES[path]

    source = TileNodeSource(BIG_SIZE, fetch, max_cached_tiles=2)
    for index in range(0, BIG_SIZE, TILE_WIDTH):
        source.get_node(0, index)
    source.get_node(0, 0)
    assert len(fetched) == 274 + 1  # tile 0 was evicted and fetched again
    source.get_node(0, 1)
    assert len(fetched) == 275
    with pytest.raises(ValueError):
        TileNodeSource(5, fetch, max_cached_tiles=0)
    with pytest.raises(ValueError):
        TileNodeSource(-1, fetch)
