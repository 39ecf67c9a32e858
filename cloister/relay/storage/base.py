"""The interface every storage backend implements: objects plus a write-ahead log.

A backend is two things under one prefix:

- an **object store**: `read`, `write` (atomic replace, durable when it returns), `delete`,
  `list_objects`. The log's public objects live here in the C2SP tlog-tiles layout
  (https://c2sp.org/tlog-tiles): `checkpoint`, `tile/<L>/<N>[.p/<W>]`, `tile/entries/<N>[.p/<W>]`;
  beside them, outside the tlog-tiles namespace, `bodies/...` and `meta/...`.
- a **write-ahead log** (`wal/...`): an ordered sequence of *frames* (see `cloister.relay.storage.wal`),
  each numbered by a consecutive sequence number. `wal_append` returns only once the frame is
  durable (fsync'd, or PUT). The store, not the backend, parses frames.

Backends are synchronous and are called from worker threads; `write`/`read`/`list` may run
concurrently with the WAL methods, while the WAL methods themselves are called by one thread.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Backend",
    "BackendStats",
    "WalChunk",
    "check_object_path",
]

# Object paths are produced by this package (tile paths, body paths, meta paths); this pattern
# is a second line of defence against a path that would escape the prefix.
_PATH = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
MAX_PATH_LENGTH = 256


def check_object_path(path: str) -> str:
    """Return `path` if it is a relative object path without '..', '.' or empty segments."""
    if len(path) > MAX_PATH_LENGTH or not _PATH.fullmatch(path) or ".." in path.split("/"):
        raise ValueError(f"{path[:80]!r} is not a valid storage object path")
    return path


@dataclass(frozen=True)
class WalChunk:
    """One unit of stored WAL: a local segment file (many frames) or an S3 object (one frame).

    `name` is for messages and for `wal_truncate_tail`; `first_seq` is the sequence number the
    chunk's first frame must have (from its name).
    """

    name: str
    first_seq: int
    data: bytes


class BackendStats:
    """Counters a test or an operator can read: how many syncs and writes the storage made."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.wal_appends = 0  # frames made durable (one fsync or one PUT each): the group commits
        self.wal_bytes = 0
        self.object_writes = 0
        self.object_reads = 0
        self.fsyncs = 0  # every fsync/fdatasync (local) or PUT (S3)
        self.deletes = 0

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class Backend(Protocol):
    """Object store + WAL under one prefix. See the module docstring for the contract."""

    @property
    def description(self) -> str:
        """Where the data lives, for messages: `local:/var/lib/cloister/log`, `s3://bucket/prefix`."""
        ...

    @property
    def stats(self) -> BackendStats: ...

    @property
    def wal_tail_may_tear(self) -> bool:
        """True if a crash can leave a partly written frame at the end of the last chunk."""
        ...

    def read(self, path: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""
        ...

    def write(self, path: str, data: bytes) -> None:
        """Create or atomically replace an object; durable when this returns."""
        ...

    def write_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """`write` for many objects (in parallel or with shared syncs); all durable on return."""
        ...

    def delete(self, paths: Sequence[str]) -> None:
        """Delete objects; missing ones are ignored."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object whose path starts with `prefix` (which ends with '/')."""
        ...

    def list_objects(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(path, modification time in seconds since the epoch) of objects under `prefix`."""
        ...

    def wal_load(self) -> list[WalChunk]:
        """Every stored WAL chunk, in sequence order."""
        ...

    def wal_truncate_tail(self, chunk: WalChunk, valid_length: int) -> None:
        """Cut a torn frame off the end of the last chunk (only if wal_tail_may_tear)."""
        ...

    def wal_append(self, seq: int, frame: bytes) -> None:
        """Durably append frame number `seq` (one fsync or one PUT)."""
        ...

    def wal_drop_before(self, seq: int, next_seq: int) -> None:
        """Delete WAL chunks holding only frames numbered below `seq`.

        `next_seq` is the number the next appended frame will have; a backend may start a new
        chunk for it. Dropping is best effort: a chunk that is kept is replayed again on open.
        """
        ...

    def close(self) -> None: ...
