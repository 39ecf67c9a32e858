"""The materialized tlog-tiles layout against an independently computed tree."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cloister.relay.storage import LocalBackend, LogStore, LogWriter, WriterOptions
from cloister.verify.checkpoint import verify_checkpoint
from cloister.verify.merkle import (
    compact_range_hashes,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from cloister.verify.tiles import (
    TILE_WIDTH,
    TileNodeSource,
    encode_entry_bundle,
    entry_bundle_path,
    entry_bundles,
    hash_tile_path,
    hash_tiles,
    parse_entry_bundle,
)
from tests.relay.storage.conftest import FakeLog, entry, tiles_of


def build(log: FakeLog, path: Path, sizes: list[int], **opts: object) -> None:
    """Persist entries in appends that end at each of `sizes`, then close (materializing)."""

    async def main() -> None:
        w = await LogWriter.open(LocalBackend(path, fsync=False), WriterOptions(**opts))  # type: ignore[arg-type]
        for size in sizes:
            a = log.append([entry(i, 40) for i in range(log.size, size)])
            await w.persist(a.first_index, a.entries, a.checkpoint)
        await w.close()

    asyncio.run(main())


def check_layout(log: FakeLog, store: LogStore) -> None:
    """Every tile and bundle of the published tree, byte for byte, and proofs through them."""
    size = store.published_size
    leaves = log.leaves[:size]
    want = tiles_of(leaves)
    for tid in hash_tiles(size):
        assert store.read_path(tid.path()) == b"".join(want[(tid.level, tid.index)][: tid.width]), tid.path()
    for bid in entry_bundles(size):
        start = bid.index * TILE_WIDTH
        assert store.read_path(bid.path()) == encode_entry_bundle(log.entries[start : start + bid.width])
    # An auditor's view: verify the signed checkpoint, then use only the served tiles.
    note = store.read_path("checkpoint")
    assert note is not None
    cp = verify_checkpoint(note, [log.signer.verifier], origin=log.origin).checkpoint
    assert cp.size == size and cp.root_hash == root_from_leaf_hashes(leaves)

    def fetch(path: str) -> bytes:
        data = store.read_path(path)
        assert data is not None, path
        return data

    source = TileNodeSource(size, fetch)
    hashes = compact_range_hashes(size, source.get_node)
    assert hashes == store.compact_range(size)
    for i in sorted({0, 1, 255, 256, size // 2, size - 257, size - 1} & set(range(size))):
        proof = store.inclusion_proof(i, size)
        verify_inclusion(leaves[i], i, size, proof, cp.root_hash)
    for m in sorted({1, 256, 65536, size - 1} & set(range(1, size + 1))):
        verify_consistency(m, size, store.consistency_proof(m, size), log.root(m), cp.root_hash)


def test_a_log_beyond_65536_entries(log: FakeLog, log_dir: Path) -> None:
    """Three tile levels, partial tiles at every level, tiles grown over several materializations."""
    sizes = [*range(997, 70_001, 6_997), 70_001]
    build(log, log_dir, sizes, materialize_every=8_192)
    store = LogStore.open(LocalBackend(log_dir), verify="full")
    assert store.published_size == 70_001
    check_layout(log, store)
    # Full tiles exist once; their partial versions were removed when they filled.
    assert (log_dir / "tile/2/000.p/1").exists()
    assert (log_dir / "tile/1/000").exists() and not (log_dir / "tile/1/000.p").exists()
    assert (log_dir / hash_tile_path(0, 272)).exists() and not (log_dir / "tile/0/272.p").exists()
    assert (log_dir / "tile/0/273.p/113").exists()
    store.close()


@pytest.mark.parametrize("size", [1, 2, 255, 256, 257, 511, 512, 513, 65_535])
def test_sizes_at_tile_boundaries(size: int, tmp_path: Path) -> None:
    log = FakeLog()
    build(log, tmp_path, [size // 2, size] if size > 1 else [1])
    store = LogStore.open(LocalBackend(tmp_path), verify="full")
    check_layout(log, store)
    store.close()


def test_read_path_serves_only_the_published_tree(log: FakeLog, log_dir: Path) -> None:
    build(log, log_dir, [300])
    store = LogStore.open(LocalBackend(log_dir))
    tile0 = tiles_of(log.leaves)[(0, 1)]
    # A narrower partial tile is a prefix of the stored one; a wider one is not published.
    assert store.read_path("tile/0/001.p/10") == b"".join(tile0[:10])
    assert store.read_path("tile/0/001.p/44") == b"".join(tile0)
    assert store.read_path("tile/0/001.p/45") is None
    assert store.read_path("tile/0/001") is None
    assert store.read_path("tile/0/002.p/1") is None
    assert store.read_path("tile/1/000.p/1") == root_from_leaf_hashes(log.leaves[:256])
    assert store.read_path("tile/entries/001.p/3") == encode_entry_bundle(log.entries[256:259])
    assert parse_entry_bundle(store.read_path(entry_bundle_path(0)) or b"", 256) == log.entries[:256]
    for bad in (
        "tile/0/1",
        "tile/entries/../../etc",
        "wal/00000000000000000000.wal",
        "bodies/000.args",
        "meta/key-entries",
        "tile/0/000.p/256",
        "LOCK",
        "",
    ):
        assert store.read_path(bad) is None, bad
    store.close()
