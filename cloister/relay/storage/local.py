"""Local directory backend: objects as files, the WAL as append-only segment files.

Durability (POSIX): an object is written to a temporary file in its directory, fsync'd, renamed
over the target, and the directory is fsync'd, so a crash leaves the old or the new object,
never a mix. Many objects at once (`write_many` of a materialization) use Linux's syncfs(2) for
the same order: all temporary files durable, then the renames, then durable again. New
directories are fsync'd into their parent. The WAL writes each frame into the current segment
`wal/<first seq, 20 digits>.wal` and calls fdatasync once per frame; a segment is rolled after
`segment_bytes`. An exclusive flock on `<root>/LOCK` keeps a second process from writing the
same log.

Preallocation (decision 0025): the active segment is extended with written zeros `prealloc_bytes`
at a time (one fsync, amortized over many frames), and frames overwrite those zeros. Neither the
file's size nor its block map changes when a frame is written, so fdatasync flushes the data
alone, without a journal commit. A crash leaves zeros after the last frame: recovery
(parent.storage.wal.decode_chunk) reads an all-zero tail as unused space and cuts it, and a torn
last frame followed by zeros as a torn write. A segment is truncated to its frames (and synced)
before the next one is created, so only the last segment ever has a zero tail.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

from cloister.relay.storage.base import BackendStats, WalChunk, check_object_path
from cloister.relay.storage.errors import StorageError

__all__ = ["LocalBackend"]

_SEGMENT = re.compile(r"([0-9]{20})\.wal")
# From this many objects, write_many syncs with two syncfs(2) calls instead of one fsync per file.
_SYNCFS_FROM = 8


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # not Linux/glibc: fsync every file
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)


_SYNCFS = _load_syncfs()
_TMP_PREFIX = ".tmp-"


class LocalBackend:
    """A log stored under one directory (created if missing)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        segment_bytes: int = 64 << 20,
        prealloc_bytes: int = 1 << 20,
        syncfs_from: int = _SYNCFS_FROM,
        fsync: bool = True,
    ) -> None:
        """`fsync=False` is for tests and benchmarks only: it gives up durability.
        `prealloc_bytes=0` appends to the segment instead (each fdatasync then also commits its size).
        `write_many` of at least `syncfs_from` objects uses syncfs(2) (0: never)."""
        self.root = Path(root).resolve()
        self._segment_bytes = segment_bytes
        self._prealloc_bytes = prealloc_bytes
        self._syncfs_from = syncfs_from if _SYNCFS is not None else 0
        self._fsync_enabled = fsync
        self._stats = BackendStats()
        self._known_dirs: set[Path] = set()
        self._dir_lock = threading.Lock()
        self._tmp_counter = itertools.count()
        self._wal_dir = self.root / "wal"
        self._make_dirs(self._wal_dir)
        self._lock_fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._lock_fd)
            raise StorageError(f"{self.description} is in use by another process (flock on LOCK)") from e
        self._segments: list[int] = []  # first seq of each segment, ascending
        self._active_fd: int | None = None
        self._active_size = 0  # end of the active segment's frames: the next frame goes here
        self._prealloc_end = 0  # the active segment's file size (zeros beyond _active_size)

    @property
    def description(self) -> str:
        return f"local:{self.root}"

    @property
    def stats(self) -> BackendStats:
        return self._stats

    @property
    def wal_tail_may_tear(self) -> bool:
        return True

    # --- Durability helpers ---------------------------------------------------------------------

    def _sync_fd(self, fd: int, *, data_only: bool = False) -> None:
        if self._fsync_enabled:
            (os.fdatasync if data_only else os.fsync)(fd)
        self._stats.add(fsyncs=1)

    def _sync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._sync_fd(fd)
        finally:
            os.close(fd)

    def _make_dirs(self, path: Path) -> None:
        """mkdir -p, fsyncing each parent that gained an entry (so the new path survives a crash)."""
        with self._dir_lock:
            if path in self._known_dirs:
                return
            missing = []
            p = path
            while not p.is_dir():
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    d.mkdir()
                self._sync_dir(d.parent)
            self._known_dirs.add(path)

    def _path(self, path: str) -> Path:
        return self.root / check_object_path(path)

    # --- Objects ---------------------------------------------------------------------------------

    def read(self, path: str) -> bytes | None:
        self._stats.add(object_reads=1)
        try:
            return self._path(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _write_tmp(self, target: Path, data: bytes, *, sync: bool = True) -> Path:
        self._make_dirs(target.parent)
        tmp = target.parent / f"{_TMP_PREFIX}{os.getpid()}-{next(self._tmp_counter)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                self._sync_fd(fd)
        finally:
            os.close(fd)
        return tmp

    def _syncfs(self) -> None:
        """Flush the whole filesystem holding the log (Linux syncfs(2))."""
        assert _SYNCFS is not None
        if self._fsync_enabled:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _SYNCFS(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"syncfs: {os.strerror(err)}")
            finally:
                os.close(fd)
        self._stats.add(fsyncs=1)

    def write(self, path: str, data: bytes) -> None:
        self.write_many([(path, data)])

    def write_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        # Every file is durable before any rename, and the renames before this returns. Many
        # files (a materialization: a body per call) share one syncfs before the renames and one
        # after, instead of an fsync per file and per directory.
        batch = 0 < self._syncfs_from <= len(items)
        staged = [
            (self._write_tmp(target, data, sync=not batch), target)
            for target, data in ((self._path(p), d) for p, d in items)
        ]
        if batch:
            self._syncfs()
        dirs: set[Path] = set()
        for tmp, target in staged:
            tmp.replace(target)
            dirs.add(target.parent)
        if batch:
            self._syncfs()
        else:
            for d in dirs:
                self._sync_dir(d)
        self._stats.add(object_writes=len(items))

    def delete(self, paths: Sequence[str]) -> None:
        dirs: set[Path] = set()
        for p in paths:
            target = self._path(p)
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
                dirs.add(target.parent)
        for d in dirs:
            self._sync_dir(d)
        self._stats.add(deletes=len(paths))

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must end with '/'")
        target = self._path(prefix.rstrip("/"))
        if target.is_dir():
            shutil.rmtree(target)
            self._sync_dir(target.parent)
            self._stats.add(deletes=1)

    def list_objects(self, prefix: str) -> Iterator[tuple[str, float]]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                full = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    yield full.relative_to(self.root).as_posix(), full.stat().st_mtime

    # --- WAL -------------------------------------------------------------------------------------

    def _segment_path(self, first_seq: int) -> Path:
        return self._wal_dir / f"{first_seq:020d}.wal"

    def wal_load(self) -> list[WalChunk]:
        self._close_active()
        segments = []
        for p in self._wal_dir.iterdir():
            m = _SEGMENT.fullmatch(p.name)
            if m:
                segments.append(int(m.group(1)))
            elif not p.name.startswith(_TMP_PREFIX):
                raise StorageError(f"{self.description}: unexpected file wal/{p.name} in the WAL directory")
        segments.sort()
        self._segments = segments
        return [WalChunk(f"wal/{s:020d}.wal", s, self._segment_path(s).read_bytes()) for s in segments]

    def wal_truncate_tail(self, chunk: WalChunk, valid_length: int) -> None:
        path = self.root / check_object_path(chunk.name)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, valid_length)
            self._sync_fd(fd)
        finally:
            os.close(fd)

    def _close_active(self, *, trim: bool = True) -> None:
        if self._active_fd is not None:
            if trim and self._prealloc_end > self._active_size:
                # Leave the segment holding its frames only (a later segment must not follow zeros).
                os.ftruncate(self._active_fd, self._active_size)
                self._sync_fd(self._active_fd)
            os.close(self._active_fd)
            self._active_fd = None
            self._prealloc_end = 0

    def _open_segment(self, seq: int) -> None:
        """Make the active segment: the last one (after open), or a new one named `seq`.

        The last segment was cut to its valid frames by recovery (wal_load, wal_truncate_tail),
        so its size is where the next frame goes.
        """
        self._close_active()
        if self._segments and self._active_size < self._segment_bytes:
            path = self._segment_path(self._segments[-1])
        else:
            self._segments.append(seq)
            path = self._segment_path(seq)
        new = not path.exists()
        self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self._active_size = self._prealloc_end = os.fstat(self._active_fd).st_size
        if new:
            self._sync_dir(self._wal_dir)

    def _preallocate(self, need: int) -> None:
        """Extend the active segment with written zeros to at least `need` bytes, durably."""
        assert self._active_fd is not None
        step = self._prealloc_bytes
        end = max(need, self._prealloc_end + step)
        zeros = bytes(min(step, 1 << 20))
        pos = self._prealloc_end
        while pos < end:
            pos += os.pwrite(self._active_fd, zeros[: end - pos], pos)
        self._sync_fd(self._active_fd)  # a full fsync: the size changed
        self._prealloc_end = end

    def wal_append(self, seq: int, frame: bytes) -> None:
        if self._active_fd is None:
            self._open_segment(seq)
        elif self._active_size >= self._segment_bytes:
            self._close_active()
            self._segments.append(seq)
            self._active_size = 0
            self._open_segment(seq)
        assert self._active_fd is not None
        end = self._active_size + len(frame)
        if end > self._prealloc_end and self._prealloc_bytes > 0:
            self._preallocate(end)
        view = memoryview(frame)
        pos = self._active_size
        while view:
            n = os.pwrite(self._active_fd, view, pos)
            view, pos = view[n:], pos + n
        # Data only: within the preallocated zeros neither the size nor the block map changed.
        self._sync_fd(self._active_fd, data_only=True)
        self._active_size = end
        self._prealloc_end = max(self._prealloc_end, end)
        self._stats.add(wal_appends=1, wal_bytes=len(frame))

    def wal_drop_before(self, seq: int, next_seq: int) -> None:
        # Segment i holds frames [segments[i], segments[i+1]); the last one up to next_seq.
        bounds = [*self._segments[1:], next_seq]
        keep = [first for first, end in zip(self._segments, bounds, strict=True) if end > seq]
        drop = [first for first, end in zip(self._segments, bounds, strict=True) if end <= seq]
        if not drop:
            return
        if not keep:
            # The active segment goes too; the next frame starts a new one.
            self._close_active(trim=False)
            self._active_size = 0
        for first in drop:
            self._segment_path(first).unlink(missing_ok=True)
        self._segments = keep
        self._sync_dir(self._wal_dir)
        self._stats.add(deletes=len(drop))

    def close(self) -> None:
        self._close_active()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
