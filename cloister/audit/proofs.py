"""Proofs computed by the auditor from raw tiles, checked against a verified checkpoint.

The relay also serves proofs (`/log/proof/...`), but an auditor never needs them: every hash a
proof needs is in the hash tiles (C2SP tlog-tiles), and a proof built from tampered tiles simply
fails to verify against the signed root. When a check fails, these functions work out which
stored object is to blame (the entry bundle, or the hash tiles) so that the message says where.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass

from cloister.audit.source import MAX_ENTRY_BUNDLE, MAX_HASH_TILE, LogSource, read_tile
from cloister.verify.checkpoint import Checkpoint
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import (
    CompactRange,
    compact_range_hashes,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from cloister.verify.tiles import TILE_WIDTH, TileNodeSource, entry_bundle_path, parse_entry_bundle

__all__ = [
    "ConsistencyProof",
    "InclusionProof",
    "StoredEntry",
    "TileNodes",
    "prove_consistency",
    "prove_inclusion",
    "read_entry",
]


def b64(h: bytes) -> str:
    return base64.b64encode(h).decode("ascii")


class TileNodes:
    """A TileNodeSource over a LogSource that remembers which tile paths it read (for messages)."""

    def __init__(self, source: LogSource, tree_size: int) -> None:
        self.source = source
        self.tree_size = tree_size
        self.paths: list[str] = []
        self._nodes = TileNodeSource(tree_size, self._fetch)

    def _fetch(self, path: str) -> bytes:
        self.paths.append(path)
        return read_tile(self.source, path, MAX_HASH_TILE)

    @property
    def get_node(self) -> Callable[[int, int], bytes]:
        return self._nodes.get_node

    def root_at(self, size: int) -> bytes:
        """The root of the first `size` leaves according to the tiles (unauthenticated by itself)."""
        return CompactRange.from_hashes(size, compact_range_hashes(size, self._nodes.get_node)).root()


@dataclass(frozen=True)
class StoredEntry:
    index: int
    data: bytes
    bundle_path: str
    offset: int  # byte offset of the entry's length prefix in the bundle


def read_entry(source: LogSource, tree_size: int, index: int) -> StoredEntry:
    """Entry `index` from its bundle, read at the width it has in the tree of `tree_size` leaves."""
    if not 0 <= index < tree_size:
        raise VerificationError(f"entry {index} is not in the log: the verified checkpoint has {tree_size} entries")
    bundle, position = divmod(index, TILE_WIDTH)
    width = min(TILE_WIDTH, tree_size - bundle * TILE_WIDTH)
    path = entry_bundle_path(bundle, width)
    data = read_tile(source, path, MAX_ENTRY_BUNDLE)
    try:
        entries = parse_entry_bundle(data, width)
    except DecodeError as exc:
        raise DecodeError(f"{path}: {exc}") from exc
    offset = sum(2 + len(e) for e in entries[:position])
    return StoredEntry(index=index, data=entries[position], bundle_path=path, offset=offset)


@dataclass(frozen=True)
class InclusionProof:
    entry: StoredEntry
    leaf_hash: bytes
    tree_size: int
    root: bytes
    proof: tuple[bytes, ...]


def prove_inclusion(source: LogSource, checkpoint: Checkpoint, index: int) -> InclusionProof:
    """Read entry `index`, build its inclusion proof from tiles and verify it (RFC 9162 §2.1.3.2)."""
    entry = read_entry(source, checkpoint.size, index)
    leaf = leaf_hash(entry.data)
    nodes = TileNodes(source, checkpoint.size)
    proof = inclusion_proof(index, checkpoint.size, nodes.get_node)
    try:
        verify_inclusion(leaf, index, checkpoint.size, proof, checkpoint.root_hash)
    except VerificationError as exc:
        raise _blame_inclusion(entry, leaf, nodes, proof, checkpoint) from exc
    return InclusionProof(
        entry=entry, leaf_hash=leaf, tree_size=checkpoint.size, root=checkpoint.root_hash, proof=tuple(proof)
    )


def _blame_inclusion(
    entry: StoredEntry, leaf: bytes, nodes: TileNodes, proof: list[bytes], checkpoint: Checkpoint
) -> VerificationError:
    """The inclusion proof failed: is the entry altered, or the hash tiles on its path?"""
    index, size = entry.index, checkpoint.size
    where = f"entry {index} ({entry.bundle_path}, byte offset {entry.offset})"
    tiles = ", ".join(dict.fromkeys(nodes.paths)) or "none"
    stored_leaf = nodes.get_node(0, index)
    if stored_leaf != leaf:
        try:
            verify_inclusion(stored_leaf, index, size, proof, checkpoint.root_hash)
        except VerificationError:
            return VerificationError(
                f"{where} is not in the checkpointed tree of size {size}, and neither is the leaf hash the hash "
                f"tiles hold for it: both the entry bundle and the hash tiles ({tiles}) disagree with the checkpoint"
            )
        return VerificationError(
            f"{where} was altered: its leaf hash {b64(leaf)} is not the one the signed tree holds at index {index} "
            f"({b64(stored_leaf)}, which the hash tiles prove against the checkpoint)"
        )
    return VerificationError(
        f"{where} is not proven by the hash tiles: the tiles on its path ({tiles}) do not hash to the checkpoint's "
        f"root for size {size} (a hash tile was altered)"
    )


@dataclass(frozen=True)
class ConsistencyProof:
    size1: int
    size2: int
    root1: bytes
    root2: bytes
    proof: tuple[bytes, ...]


def prove_consistency(source: LogSource, checkpoint: Checkpoint, size1: int, size2: int) -> ConsistencyProof:
    """Prove that the tree of `size1` leaves is a prefix of the tree of `size2`, both inside `checkpoint`.

    Both roots are computed from tiles and authenticated against the checkpoint: root2 by a
    consistency proof to the checkpoint (unless size2 is the checkpoint's size), root1 by the
    proof from size1 to size2 (RFC 9162 §2.1.4.2): a proof that verifies against an authenticated
    root2 fixes root1.
    """
    if not 0 <= size1 <= size2 <= checkpoint.size:
        raise VerificationError(
            f"sizes must satisfy 0 <= from ({size1}) <= to ({size2}) <= the verified checkpoint's size "
            f"({checkpoint.size})"
        )
    nodes = TileNodes(source, checkpoint.size)
    root2 = checkpoint.root_hash
    if size2 < checkpoint.size:
        root2 = nodes.root_at(size2) if size2 else _empty_root()
        to_cp = consistency_proof(size2, checkpoint.size, nodes.get_node)
        _verify_from_tiles(nodes, size2, checkpoint.size, to_cp, root2, checkpoint.root_hash)
    root1 = nodes.root_at(size1) if size1 else _empty_root()
    proof = consistency_proof(size1, size2, nodes.get_node)
    _verify_from_tiles(nodes, size1, size2, proof, root1, root2)
    return ConsistencyProof(size1=size1, size2=size2, root1=root1, root2=root2, proof=tuple(proof))


def _verify_from_tiles(
    nodes: TileNodes, size1: int, size2: int, proof: list[bytes], root1: bytes, root2: bytes
) -> None:
    try:
        verify_consistency(size1, size2, proof, root1, root2)
    except VerificationError as exc:
        tiles = ", ".join(dict.fromkeys(nodes.paths)) or "none"
        raise VerificationError(
            f"the hash tiles ({tiles}) do not agree with the checkpoint of size {nodes.tree_size}: "
            f"consistency from {size1} to {size2} fails ({exc}); a hash tile was altered"
        ) from exc


def _empty_root() -> bytes:
    from cloister.verify.merkle import EMPTY_ROOT

    return EMPTY_ROOT
