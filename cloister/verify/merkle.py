"""RFC 9162 Merkle trees: hashing, proof verification, proof generation, compact ranges.

References (RFC 9162, "Certificate Transparency Version 2.0"):

- §2.1.1 Merkle Tree Hash: SHA-256, leaf = H(0x00 || d), node = H(0x01 || left || right),
  MTH of the empty tree = H(""), and the split point k = the largest power of two < n.
- §2.1.3.1 / §2.1.3.2 inclusion proofs: generation (PATH) and verification.
- §2.1.4.1 / §2.1.4.2 consistency proofs: generation (PROOF/SUBPROOF) and verification.

Vocabulary used throughout: a *perfect* subtree at `level` and `index` holds the 2**level leaves
starting at leaf `index * 2**level` (level 0 = leaf hashes). Every node of an RFC 9162 tree is
either perfect or sits on the right edge of the tree; a right-edge node is rebuilt from the
perfect subtrees that cover its range, so a node store only ever needs perfect subtrees.

Sizes and indexes are uint64 on the wire (checkpoints, tlog-proofs), so they are checked to be
in [0, 2**64) here as well.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from cloister.verify.errors import DecodeError, VerificationError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_TREE_SIZE",
    "CompactRange",
    "GetNode",
    "compact_range_hashes",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
# Exclusive bound: tree sizes and leaf indexes are uint64 in every format we speak.
MAX_TREE_SIZE = 1 << 64

# get_node(level, index) -> hash of the perfect subtree of 2**level leaves at leaf index*2**level.
GetNode = Callable[[int, int], bytes]

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 §2.1.1: MTH({d}) = SHA-256(0x00 || d)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1: SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """RFC 9162 §2.1.1: the largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of RFC 9162 §2.1.1, written as the recursive definition.

    A reference for tests and small trees: O(n) hashing but O(n log n) slicing. Production
    code keeps a CompactRange instead.
    """
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return bytes(hashes[0])
    k = _split(n)
    return node_hash(root_from_leaf_hashes(hashes[:k]), root_from_leaf_hashes(hashes[k:]))


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise VerificationError(f"{what} is {len(value)} bytes, want {HASH_SIZE}")


def _check_size(value: int, what: str) -> None:
    if not 0 <= value < MAX_TREE_SIZE:
        raise VerificationError(f"{what} {value} is outside [0, 2**64)")


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `size` leaves whose root is `root`.

    RFC 9162 §2.1.3.2. Returns nothing; raises VerificationError naming the failed check.
    """
    # Inputs: every hash is a SHA-256 output and sizes are uint64 (not RFC steps: type checks).
    _check_hash(leaf_hash, "leaf hash")
    _check_hash(root, "root")
    for i, p in enumerate(proof):
        _check_hash(p, f"inclusion proof[{i}]")
    _check_size(index, "leaf index")
    _check_size(size, "tree size")

    # Step 1: the leaf must be inside the tree.
    if index >= size:
        raise VerificationError(f"leaf index {index} is not below tree size {size}")
    # Step 2: fn = leaf_index, sn = tree_size - 1.
    fn, sn = index, size - 1
    # Step 3: r = hash.
    r = leaf_hash
    # Step 4: fold in each proof hash.
    for i, p in enumerate(proof):
        # Step 4a: a proof longer than the path from leaf to root fails.
        if sn == 0:
            raise VerificationError(f"inclusion proof too long: hash {i} of {len(proof)} is above the root")
        # Step 4b: p is a left sibling (fn is a right child, or fn is the last node of its level).
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # Step 4b.ii: skip the levels where fn has no right sibling (right edge).
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        # Step 4c: move up one level.
        fn >>= 1
        sn >>= 1
    # Step 5: the proof must reach the root, and the computed root must match.
    if sn != 0:
        raise VerificationError(
            f"inclusion proof too short: {len(proof)} hashes do not reach the root for leaf {index} of {size}"
        )
    if r != root:
        raise VerificationError(f"inclusion proof for leaf {index} of {size} computes a root that does not match")


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:  # noqa: C901 (over the gate before it existed; split when next changed)
    """Check that the tree (size1, root1) is a prefix of the tree (size2, root2).

    RFC 9162 §2.1.4.2, plus two cases the RFC leaves to the caller (it assumes 0 < size1 < size2):

    - size1 == size2: the proof must be empty and root1 == root2 (§2.1.4.1, SUBPROOF(m, D[m],
      true) = {}).
    - size1 == 0: accepted iff the proof is empty and root1 is EMPTY_ROOT (and, if size2 is 0
      too, root2 is EMPTY_ROOT). The empty tree is a prefix of every tree, so this proves nothing
      about root2; it lets an auditor start from (0, EMPTY_ROOT) without a special case. This
      follows C2SP tlog-witness (`old 0` with an empty proof) and differs from
      transparency-dev/merkle, which rejects every size1 == 0 proof. See
      docs/decisions/0002-consistency-from-empty-tree.md.

    Returns nothing; raises VerificationError naming the failed check.
    """
    # Inputs: every hash is a SHA-256 output and sizes are uint64 (not RFC steps: type checks).
    _check_hash(root1, "root1")
    _check_hash(root2, "root2")
    for i, c in enumerate(proof):
        _check_hash(c, f"consistency proof[{i}]")
    _check_size(size1, "size1")
    _check_size(size2, "size2")

    # Precondition of §2.1.4.2: a tree can only be a prefix of a tree at least as large.
    if size1 > size2:
        raise VerificationError(f"size1 {size1} is greater than size2 {size2}")
    # Cloister rule (C2SP tlog-witness): from the empty tree, the only proof is the empty one.
    if size1 == 0:
        if proof:
            raise VerificationError(f"consistency proof from the empty tree must be empty, got {len(proof)} hashes")
        if root1 != EMPTY_ROOT:
            raise VerificationError("root1 of the empty tree is not SHA-256 of the empty string")
        if size2 == 0 and root2 != EMPTY_ROOT:
            raise VerificationError("root2 of the empty tree is not SHA-256 of the empty string")
        return
    # §2.1.4.1: SUBPROOF(m, D[m], true) is empty, so equal sizes need equal roots.
    if size1 == size2:
        if proof:
            raise VerificationError(f"consistency proof between equal sizes must be empty, got {len(proof)} hashes")
        if root1 != root2:
            raise VerificationError(f"roots differ for the same tree size {size1}")
        return

    # Step 1: a proof between different sizes is never empty.
    if not proof:
        raise VerificationError(f"consistency proof from {size1} to {size2} is empty")
    path = list(proof)
    # Step 2: if size1 is a power of two, its root is a node of the new tree: start from it.
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    # Step 3: fn = first - 1, sn = second - 1.
    fn, sn = size1 - 1, size2 - 1
    # Step 4: skip the levels where the old tree's last node is a right child.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5: both running hashes start from the first path value.
    fr = sr = path[0]
    # Step 6: fold in each subsequent value.
    for i, c in enumerate(path[1:], start=1):
        # Step 6a: a proof longer than the path to the new root fails.
        if sn == 0:
            raise VerificationError(f"consistency proof too long: value {i} of {len(path)} is above the root")
        # Step 6b: c is a left sibling: it belongs to both trees.
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            # Step 6b.ii: skip the levels where fn has no right sibling.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            # c is a right sibling: only in the new tree.
            sr = node_hash(sr, c)
        # Step 6c: move up one level.
        fn >>= 1
        sn >>= 1
    # Step 7: both roots must match and the path must reach the new root.
    if sn != 0:
        raise VerificationError(f"consistency proof too short: {len(proof)} hashes do not reach the root of {size2}")
    if fr != root1:
        raise VerificationError(f"consistency proof from {size1} to {size2} computes a root1 that does not match")
    if sr != root2:
        raise VerificationError(f"consistency proof from {size1} to {size2} computes a root2 that does not match")


# --- Proof generation (served by the untrusted parent; verified by anyone) -------------------


def _perfect_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """The (level, index) of the perfect subtrees covering [start, end), left to right.

    Largest first, as in the binary representation of end - start. For the ranges used here
    (a node of an RFC 9162 tree), start is a multiple of the first, largest subtree.
    """
    out: list[tuple[int, int]] = []
    pos = start
    width = end - start
    for level in range(width.bit_length() - 1, -1, -1):
        if width >> level & 1:
            out.append((level, pos >> level))
            pos += 1 << level
    return out


def _range_hash(start: int, end: int, get_node: GetNode) -> bytes:
    """MTH(D[start:end]) for a node of the tree: fold its perfect subtrees right to left."""
    parts = _perfect_ranges(start, end)
    level, index = parts[-1]
    h = get_node(level, index)
    for level, index in reversed(parts[:-1]):
        h = node_hash(get_node(level, index), h)
    return h


def inclusion_proof(index: int, size: int, get_node: GetNode) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 §2.1.3.1, leaf's sibling first.

    Walks from the root down: at each split k the sibling is either the perfect left half or the
    right half, which is perfect unless it is on the tree's right edge. Only one right-edge
    subtree is ever needed, so this makes O(log size) get_node calls.
    """
    if not 0 <= index < size < MAX_TREE_SIZE:
        raise ValueError(f"no leaf {index} in a tree of size {size}")
    top_down: list[bytes] = []
    lo, n, m = 0, size, index
    while n > 1:
        k = _split(n)
        if m < k:
            top_down.append(_range_hash(lo + k, lo + n, get_node))
            n = k
        else:
            top_down.append(get_node(k.bit_length() - 1, lo >> (k.bit_length() - 1)))
            lo, m, n = lo + k, m - k, n - k
    top_down.reverse()
    return top_down


def consistency_proof(size1: int, size2: int, get_node: GetNode) -> list[bytes]:
    """PROOF(size1, D[0:size2]) of RFC 9162 §2.1.4.1, innermost value first.

    Empty when size1 == size2 and, by this library's rule (see verify_consistency), when
    size1 == 0.
    """
    if not 0 <= size1 <= size2 < MAX_TREE_SIZE:
        raise ValueError(f"no consistency proof from size {size1} to size {size2}")
    if size1 == 0 or size1 == size2:
        return []
    top_down: list[bytes] = []
    lo, n, m = 0, size2, size1
    # b of SUBPROOF: true while D[lo:lo+m] is still known to be the whole old tree.
    whole_old_tree = True
    while m != n:
        k = _split(n)
        if m <= k:
            top_down.append(_range_hash(lo + k, lo + n, get_node))
            n = k
        else:
            top_down.append(get_node(k.bit_length() - 1, lo >> (k.bit_length() - 1)))
            lo, m, n = lo + k, m - k, n - k
            whole_old_tree = False
    # SUBPROOF(m, D[m], false) = {MTH(D[m])}: the verifier does not know this node yet.
    if not whole_old_tree:
        top_down.append(_range_hash(lo, lo + n, get_node))
    top_down.reverse()
    return top_down


def compact_range_hashes(size: int, get_node: GetNode) -> list[bytes]:
    """The roots of the perfect subtrees covering [0, size), left to right (popcount(size) hashes)."""
    if not 0 <= size < MAX_TREE_SIZE:
        raise ValueError(f"tree size {size} is outside [0, 2**64)")
    return [get_node(level, index) for level, index in _perfect_ranges(0, size)]


# --- Compact range: the sequencer's O(log n) state --------------------------------------------


class CompactRange:
    """The roots of the perfect subtrees covering leaves [0, size), left to right.

    This is all a sequencer needs to append leaves and compute the root: at most 64 hashes,
    whatever the size of the log. The subtree sizes are the set bits of `size`, largest first.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        """The empty range; use from_hashes() to restore a stored one."""
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def empty(cls) -> CompactRange:
        return cls()

    @classmethod
    def _unchecked(cls, size: int, hashes: Sequence[bytes]) -> CompactRange:
        cr = cls()
        cr._size = size
        cr._hashes = list(hashes)
        return cr

    @classmethod
    def from_hashes(cls, size: int, hashes: Sequence[bytes]) -> CompactRange:
        """Rebuild a range from stored state; DecodeError if the state cannot be a compact range."""
        if not 0 <= size < MAX_TREE_SIZE:
            raise DecodeError(f"compact range size {size} is outside [0, 2**64)")
        want = size.bit_count()
        if len(hashes) != want:
            raise DecodeError(f"compact range of size {size} needs popcount(size) = {want} hashes, got {len(hashes)}")
        for i, h in enumerate(hashes):
            if len(h) != HASH_SIZE:
                raise DecodeError(f"compact range hash {i} is {len(h)} bytes, want {HASH_SIZE}")
        return cls._unchecked(size, [bytes(h) for h in hashes])

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def copy(self) -> CompactRange:
        return CompactRange._unchecked(self._size, self._hashes)

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf. Merges one subtree per trailing one bit of size: amortised 1 hash."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"leaf hash is {len(leaf_hash)} bytes, want {HASH_SIZE}")
        if self._size + 1 >= MAX_TREE_SIZE:
            raise ValueError("compact range is full (2**64 - 1 leaves)")
        hashes = self._hashes
        h = bytes(leaf_hash)
        carry = self._size
        # Like binary increment: each trailing 1 bit is a perfect subtree of the new leaf's size.
        while carry & 1:
            h = node_hash(hashes.pop(), h)
            carry >>= 1
        hashes.append(h)
        self._size += 1

    def root(self) -> bytes:
        """MTH of leaves [0, size): fold the subtrees right to left (RFC 9162 §2.1.1)."""
        hashes = self._hashes
        if not hashes:
            return EMPTY_ROOT
        h = hashes[-1]
        for left in reversed(hashes[:-1]):
            h = node_hash(left, h)
        return h

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, hashes={len(self._hashes)})"
