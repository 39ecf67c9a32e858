"""Helpers for the storage tests: a stand-in sequencer that signs real C2SP checkpoints.

`FakeLog` plays the enclave's part with the same primitives (RFC 9162 compact range, C2SP
signed notes), so what the storage receives is byte-for-byte what a real enclave sends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloister.relay.storage import LocalBackend
from cloister.verify.checkpoint import Checkpoint
from cloister.verify.entries import KeyEntry, OutcomeEntry, encode_entry
from cloister.verify.merkle import CompactRange, leaf_hash, node_hash
from cloister.verify.note import Ed25519NoteSigner, sign_note
from cloister.verify.tiles import TILE_WIDTH

ORIGIN = "cloister.test/log"


@dataclass(frozen=True)
class Append:
    """A LogAppend as the enclave returns it."""

    first_index: int
    entries: tuple[bytes, ...]
    checkpoint: bytes


class FakeLog:
    def __init__(self, origin: str = ORIGIN, seed: int = 1) -> None:
        self.origin = origin
        key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"key {seed}".encode()).digest())
        self.signer = Ed25519NoteSigner(origin, key)
        self.entries: list[bytes] = []
        self.leaves: list[bytes] = []
        self._range = CompactRange()

    @property
    def size(self) -> int:
        return len(self.entries)

    def add(self, entries: list[bytes]) -> int:
        first = len(self.entries)
        for e in entries:
            self.entries.append(e)
            h = leaf_hash(e)
            self.leaves.append(h)
            self._range.append(h)
        return first

    def root(self, size: int | None = None) -> bytes:
        if size is None or size == self.size:
            return self._range.root()
        cr = CompactRange()
        for h in self.leaves[:size]:
            cr.append(h)
        return cr.root()

    def checkpoint(self, size: int | None = None, extensions: tuple[str, ...] = ()) -> bytes:
        size = self.size if size is None else size
        text = Checkpoint(self.origin, size, self.root(size), extensions).to_text()
        return sign_note(text, [self.signer])

    def append(self, entries: list[bytes]) -> Append:
        """Sequence entries and return the LogAppend, with a checkpoint at the current size."""
        first = self.add(entries)
        return Append(first, tuple(entries), self.checkpoint())

    def append_many(self, count: int, per_append: int = 1, make: object = None) -> list[Append]:
        """Sequence `count` appends, each checkpointed right after it (like concurrent requests)."""
        out = []
        for _ in range(count):
            first = self.size
            out.append(self.append([entry(first + k) for k in range(per_append)]))
        return out


def entry(i: int, size: int = 0) -> bytes:
    """A cheap opaque entry; storage does not parse entries (except to spot key entries)."""
    body = f"entry {i}".encode()
    return body + b"." * max(0, size - len(body))


def outcome(i: int, time_ms: int) -> bytes:
    return encode_entry(OutcomeEntry(time_ms=time_ms, decision_index=i, result_sha256=None, error="", duration_us=i))


def key_entry(time_ms: int, n: int = 0) -> bytes:
    return encode_entry(
        KeyEntry(
            time_ms=time_ms,
            attestation=b"doc %d" % n,
            log_key=bytes([n]) * 32,
            grant_key=b"g" * 32,
            log_vkey=f"cloister.test/log+0000000{n}+AAAA",
        )
    )


def tiles_of(leaves: list[bytes]) -> dict[tuple[int, int], list[bytes]]:
    """Every tile (level, index) -> hashes of a tree, computed independently of parent.storage."""
    out: dict[tuple[int, int], list[bytes]] = {}
    level_hashes = list(leaves)
    level = 0
    while level_hashes:
        for t in range(0, len(level_hashes), TILE_WIDTH):
            out[(level, t // TILE_WIDTH)] = level_hashes[t : t + TILE_WIDTH]
        above = []
        for t in range(0, len(level_hashes) - TILE_WIDTH + 1, TILE_WIDTH):
            chunk = level_hashes[t : t + TILE_WIDTH]
            while len(chunk) > 1:
                chunk = [node_hash(chunk[i], chunk[i + 1]) for i in range(0, len(chunk), 2)]
            above.append(chunk[0])
        level_hashes = above
        level += 1
    return out


@pytest.fixture
def log() -> FakeLog:
    return FakeLog()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "log"


@pytest.fixture
def backend(log_dir: Path) -> Iterator[LocalBackend]:
    b = LocalBackend(log_dir)
    yield b
    b.close()


def wal_segments(root: Path) -> list[Path]:
    return sorted((root / "wal").glob("*.wal"))
