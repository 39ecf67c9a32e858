"""LogWriter: what the asyncio relay calls to make the enclave's log appends durable.

The enclave sequences; every response carries a `LogAppend(first_index, entries, checkpoint)`.
Responses to concurrent requests arrive in any order, so the writer keeps a bounded reorder
buffer and hands only *contiguous* entries to the store. `persist` returns once every entry up
to the last one it was given, and a checkpoint covering them, are durable: that is the rule
"nothing is acknowledged without a durable log entry".

Group commit: one flusher task hands everything accepted so far to the WAL thread as one batch
(one frame: one fsync or one PUT), and while that write runs, new requests accumulate for the
next one. A body (`put_body`) lingers up to `body_linger_ms` for the next persist, so a call's
arguments share the outcome's frame instead of costing a sync of their own. A materializer task
writes tiles and publishes the checkpoint every `materialize_every` entries or
`materialize_interval_ms`, whichever first, off the acknowledgment path.

Entries received twice (a late response, a SyncLog after a relay restart) must be byte-equal to
what the writer already has; checkpoints must agree with the entries' root. Anything else is a
`StorageInconsistency`: logged at CRITICAL, and the writer stops acknowledging.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cloister.relay.storage.base import Backend
from cloister.relay.storage.bodies import BodyRecord, check_body_kind
from cloister.relay.storage.check import CheckMode
from cloister.relay.storage.errors import ReorderBufferFull, StorageClosed, StorageError, StorageInconsistency
from cloister.relay.storage.resume import ResumeMaterial, ResumePlan, resume_chunks, resume_material, resume_plan
from cloister.relay.storage.store import Batch, CheckpointInfo, LogStore, now_ms, parse_checkpoint_note
from cloister.verify.errors import DecodeError
from cloister.verify.tiles import MAX_ENTRY_SIZE

__all__ = ["LogWriter", "WriterOptions"]

logger = logging.getLogger("cloister.storage")

_NOTE_CACHE = 64
_COMPARE_CHUNK = 1 << 16


@dataclass(frozen=True)
class WriterOptions:
    verify: CheckMode = "full"  # how open() checks stored tiles (parent.storage.check)
    materialize_every: int = 4096  # entries
    materialize_interval_ms: int = 1000
    max_batch_entries: int = 1 << 16  # per WAL frame
    max_batch_bytes: int = 32 << 20
    max_reorder_entries: int = 1 << 18  # entries held ahead of a gap
    max_reorder_bytes: int = 128 << 20
    max_unmaterialized: int = 1 << 20  # durable entries not yet in tiles before the WAL waits
    body_retention_days: float | None = None  # None: keep forever; 0: do not keep bodies
    # A body waits this long for the next persist to share its WAL frame (one sync, not two)
    # before it is written on its own; awaiting its future writes it at once.
    body_linger_ms: int = 50
    body_prune_interval_s: float = 3600.0


class _BodyDurable(asyncio.Future[None]):
    """put_body's future: awaiting it asks the flusher to write the body now rather than let it
    linger for the next persist."""

    def __init__(self, loop: asyncio.AbstractEventLoop, kick: asyncio.Event) -> None:
        super().__init__(loop=loop)
        self._kick = kick

    def __await__(self) -> Generator[Any, None, None]:
        if not self.done():
            self._kick.set()
        return (yield from super().__await__())


class LogWriter:
    """The asyncio face of the log store. Create with `await LogWriter.open(backend)`."""

    def __init__(self, store: LogStore, options: WriterOptions) -> None:
        self.store = store
        self._opts = options
        self._loop = asyncio.get_running_loop()
        self._wal_exec = ThreadPoolExecutor(1, thread_name_prefix="cloister-wal")
        self._mat_exec = ThreadPoolExecutor(1, thread_name_prefix="cloister-tiles")
        self._durable = store.durable_size
        self._handed = store.written_size  # end of what went to the WAL thread
        self._end = self._handed  # end of the contiguous entries accepted
        self._pending: list[bytes] = []  # accepted entries [_handed, _end)
        self._inflight_first = self._handed
        self._inflight: list[bytes] = []  # the batch being written
        self._reorder: dict[int, bytes] = {}
        self._reorder_bytes = 0
        self._checkpoints: dict[int, CheckpointInfo] = {}
        self._bodies: list[tuple[BodyRecord, asyncio.Future[None]]] = []
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()
        self._note_cache: OrderedDict[bytes, CheckpointInfo] = OrderedDict()
        self._origin = store.origin
        self._failed: BaseException | None = None
        self._closing = False
        self._closed = False
        self._wake = asyncio.Event()
        self._linger: asyncio.TimerHandle | None = None
        self._mat_kick = asyncio.Event()
        self._materialized = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush_loop(), name="cloister-log-flusher")
        self._materializer = asyncio.create_task(self._materialize_loop(), name="cloister-log-materializer")

    @classmethod
    async def open(cls, backend: Backend, options: WriterOptions | None = None) -> LogWriter:
        """Open the store (recovering from a crash, in a worker thread) and start the writer."""
        opts = options or WriterOptions()
        store = await asyncio.to_thread(LogStore.open, backend, verify=opts.verify)
        return cls(store, opts)

    # --- State ---------------------------------------------------------------------------------

    @property
    def persisted_size(self) -> int:
        """Durable contiguous size covered by a durable checkpoint: every index below is acknowledged."""
        return self._durable

    def latest_checkpoint(self) -> bytes | None:
        """The latest durable checkpoint note."""
        return self.store.latest_checkpoint()

    def published_checkpoint(self) -> bytes | None:
        """The checkpoint served at `<prefix>/checkpoint` (tiles are materialized up to it)."""
        return self.store.published_checkpoint()

    def missing(self) -> tuple[int, int] | None:
        """The first range of indexes the writer is waiting for, if any: [start, end).

        Non-empty when entries or a checkpoint arrived beyond a gap; if it persists, a response
        was lost and the relay should fetch the range from the enclave (SyncLog).
        """
        if self._reorder:
            return (self._end, min(self._reorder))
        beyond = [s for s in self._checkpoints if s > self._end]
        return (self._end, max(beyond)) if beyond else None

    # --- Writing ------------------------------------------------------------------------------

    def _usable(self) -> None:
        if self._failed is not None:
            raise StorageClosed(f"the log writer failed and acknowledges nothing more: {self._failed}")
        if self._closing:
            raise StorageClosed("the log writer is closed")

    def _fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
            logger.critical("log storage failed; no more acknowledgments: %s", exc, exc_info=exc)
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(StorageClosed(f"the log writer failed: {exc}"))
        self._waiters.clear()
        for _, fut in self._bodies:
            if not fut.done():
                fut.set_exception(StorageClosed(f"the log writer failed: {exc}"))
        self._bodies.clear()
        self._wake.set()

    def _inconsistent(self, message: str) -> StorageInconsistency:
        exc = StorageInconsistency(message)
        self._fail(exc)
        return exc

    def _parse(self, note: bytes) -> CheckpointInfo:
        cp = self._note_cache.get(note)
        if cp is None:
            cp = parse_checkpoint_note(note)
            self._note_cache[note] = cp
            while len(self._note_cache) > _NOTE_CACHE:
                self._note_cache.popitem(last=False)
        return cp

    def _compare(self, index: int, have: bytes, got: bytes) -> None:
        if have != got:
            raise self._inconsistent(
                f"entry {index} was received twice with different bytes ({len(have)} bytes stored, "
                f"{len(got)} bytes now): the enclave or the relay is inconsistent"
            )

    def _accept(self, first: int, entries: list[bytes]) -> tuple[int, list[bytes]] | None:
        """Take entries into the pending list or the reorder buffer (synchronously, atomic for
        the event loop). Returns the part that must be compared with the store's copy."""
        end = first + len(entries)
        dup_end = min(end, self._end)
        stored_part: tuple[int, list[bytes]] | None = None
        if first < dup_end:
            for i in range(max(first, self._handed), dup_end):
                self._compare(i, self._pending[i - self._handed], entries[i - first])
            inflight_end = self._inflight_first + len(self._inflight)
            for i in range(max(first, self._inflight_first), min(dup_end, inflight_end)):
                self._compare(i, self._inflight[i - self._inflight_first], entries[i - first])
            below = min(dup_end, self._inflight_first if self._inflight else self._handed)
            if first < below:
                stored_part = (first, entries[: below - first])
        if end <= self._end:
            return stored_part
        if first > self._end:
            new = [(first + k, e) for k, e in enumerate(entries) if first + k not in self._reorder]
            nbytes = sum(len(e) for _, e in new)
            if (
                len(self._reorder) + len(new) > self._opts.max_reorder_entries
                or self._reorder_bytes + nbytes > self._opts.max_reorder_bytes
            ):
                raise ReorderBufferFull(
                    f"{len(self._reorder)} entries wait beyond a gap at index {self._end}; entries [{first}, {end}) "
                    "do not fit. Fetch the missing range from the enclave (SyncLog)."
                )
            for k, e in enumerate(entries):
                held = self._reorder.get(first + k)
                if held is not None:
                    self._compare(first + k, held, e)
            for i, e in new:
                self._reorder[i] = e
            self._reorder_bytes += nbytes
            return stored_part
        for i in range(self._end, end):
            entry = entries[i - first]
            held = self._reorder.pop(i, None)
            if held is not None:
                self._reorder_bytes -= len(held)
                self._compare(i, held, entry)
            self._pending.append(entry)
        self._end = end
        while self._end in self._reorder:
            entry = self._reorder.pop(self._end)
            self._reorder_bytes -= len(entry)
            self._pending.append(entry)
            self._end += 1
        return stored_part

    def _add_checkpoint(self, cp: CheckpointInfo) -> None:
        if self._origin is not None and cp.origin != self._origin:
            raise self._inconsistent(f"checkpoint origin {cp.origin!r} is not the log's origin {self._origin!r}")
        self._origin = cp.origin
        held = self._checkpoints.get(cp.size)
        if held is None:
            self._checkpoints[cp.size] = cp
        elif held.root != cp.root:
            raise self._inconsistent(f"two checkpoints for size {cp.size} have different roots")

    def _waiter(self, needed: int) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        heapq.heappush(self._waiters, (needed, next(self._counter), fut))
        return fut

    async def persist(self, first_index: int, entries: Sequence[bytes], checkpoint_note: bytes) -> None:
        """Store a LogAppend; return once entries [0, first_index + len(entries)) and a checkpoint
        covering them are durable.

        ValueError/DecodeError for malformed input (the writer stays usable);
        StorageInconsistency if it contradicts what was received before (fatal);
        ReorderBufferFull if too much arrived beyond a gap; StorageClosed after close or failure.
        """
        self._usable()
        try:
            cp = self._parse(bytes(checkpoint_note))
        except DecodeError as exc:
            raise DecodeError(f"log append at {first_index}: checkpoint note: {exc}") from exc
        batch = [bytes(e) for e in entries]
        end = first_index + len(batch)
        if first_index < 0:
            raise ValueError(f"log append has negative first index {first_index}")
        if cp.size < end:
            raise ValueError(f"log append [{first_index}, {end}) comes with a checkpoint of size {cp.size}")
        for k, data in enumerate(batch):
            if len(data) > MAX_ENTRY_SIZE:
                raise ValueError(f"entry {first_index + k} is {len(data)} bytes, more than {MAX_ENTRY_SIZE}")
        if cp.size not in self._checkpoints and len(self._checkpoints) >= self._opts.max_reorder_entries + (1 << 16):
            # Checkpoints at or below the contiguous end leave with the next batch; only a lost
            # response can pile them up.
            raise ReorderBufferFull(f"{len(self._checkpoints)} checkpoints wait for their entries")
        stored_part = self._accept(first_index, batch)
        self._add_checkpoint(cp)
        fut = self._waiter(end) if end > self._durable else None
        self._wake.set()
        if stored_part is not None:
            await self._compare_stored(*stored_part)
        if fut is not None:
            await fut

    async def _compare_stored(self, first: int, entries: list[bytes]) -> None:
        for offset in range(0, len(entries), _COMPARE_CHUNK):
            start = first + offset
            chunk = entries[offset : offset + _COMPARE_CHUNK]
            try:
                stored = await asyncio.to_thread(self.store.written_entries, start, start + len(chunk))
            except StorageError as e:
                where = f"[{start}, {start + len(chunk)})"
                raise self._inconsistent(f"cannot compare entries {where} with the stored ones: {e}") from e
            for k, (have, got) in enumerate(zip(stored, chunk, strict=True)):
                self._compare(start + k, have, got)

    async def wait_durable(self, index: int) -> None:
        """Return once entry `index` is covered by a durable checkpoint."""
        self._usable()
        if index >= self._durable:
            self._wake.set()
            await self._waiter(index + 1)

    # --- The flusher (group commit) ----------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._pending or self._bodies or any(s <= self._end for s in self._checkpoints))

    def _take_batch(self) -> tuple[Batch, list[asyncio.Future[None]]]:
        n, nbytes = 0, 0
        for e in self._pending:
            if n >= self._opts.max_batch_entries or (n and nbytes + len(e) > self._opts.max_batch_bytes):
                break
            n += 1
            nbytes += len(e)
        batch = Batch(self._handed, self._pending[:n])
        del self._pending[:n]
        self._handed += n
        ready = [s for s in self._checkpoints if s <= self._handed]
        batch.checkpoints = [self._checkpoints.pop(s) for s in ready]
        batch.bodies = [b for b, _ in self._bodies]
        futures = [f for _, f in self._bodies]
        self._bodies = []
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        return batch, futures

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._failed is None and self._has_work():
                if not self._closing and self.store.unmaterialized() > self._opts.max_unmaterialized:
                    # Tiles lag too far behind: let the materializer catch up before more WAL.
                    self._materialized.clear()
                    self._mat_kick.set()
                    await self._materialized.wait()
                    continue
                batch, body_futures = self._take_batch()
                self._inflight_first, self._inflight = batch.first_index, batch.entries
                try:
                    durable = await self._loop.run_in_executor(self._wal_exec, self.store.append_batch, batch)
                except BaseException as e:
                    for f in body_futures:
                        if not f.done():
                            f.set_exception(StorageClosed(f"the log writer failed: {e}"))
                    self._fail(e)
                    return
                finally:
                    self._inflight = []
                self._durable = durable
                while self._waiters and self._waiters[0][0] <= durable:
                    _, _, fut = heapq.heappop(self._waiters)
                    if not fut.done():
                        fut.set_result(None)
                for f in body_futures:
                    if not f.done():
                        f.set_result(None)
                if durable - self.store.published_size >= self._opts.materialize_every:
                    self._mat_kick.set()
            if self._failed is not None or (self._closing and not self._has_work()):
                return

    # --- The materializer ------------------------------------------------------------------------

    async def _materialize_once(self) -> bool:
        try:
            if await self._loop.run_in_executor(self._mat_exec, self.store.needs_materialize):
                await self._loop.run_in_executor(self._mat_exec, self.store.materialize)
                await self._loop.run_in_executor(self._wal_exec, self.store.compact_wal)
            return True
        except Exception:
            # The WAL still holds everything: log, and retry on the next tick.
            logger.exception("%s: materializing tiles failed; will retry", self.store.backend.description)
            return False
        finally:
            self._materialized.set()

    async def _materialize_loop(self) -> None:
        interval = self._opts.materialize_interval_ms / 1000
        last_prune = 0.0
        while not self._closed and self._failed is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._mat_kick.wait(), interval)
            if self._closing:
                return
            self._mat_kick.clear()
            if not await self._materialize_once():
                await asyncio.sleep(interval)
            retention = self._opts.body_retention_days
            if retention and self._loop.time() - last_prune >= self._opts.body_prune_interval_s:
                last_prune = self._loop.time()
                try:
                    await self.prune_bodies()
                except Exception:
                    logger.exception("%s: pruning bodies failed", self.store.backend.description)

    async def publish(self) -> None:
        """Materialize tiles up to the durable size and publish its checkpoint now.

        For a caller about to hand out a checkpoint (e.g. an attested one) whose tiles must be
        readable first. Runs on the materializer thread, so it queues behind a background
        materialization instead of racing it. Errors propagate.
        """
        self._usable()
        await self._loop.run_in_executor(self._mat_exec, self.store.materialize)
        await self._loop.run_in_executor(self._wal_exec, self.store.compact_wal)

    # --- Closing ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Flush what can be made durable, materialize tiles, publish the checkpoint, close.

        Requests still waiting (entries beyond a gap, or not yet covered by a checkpoint) fail
        with StorageClosed: they were never acknowledged.
        """
        if self._closed:
            return
        self._closing = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._wake.set()
        self._mat_kick.set()
        await asyncio.gather(self._flusher, self._materializer, return_exceptions=True)
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(StorageClosed("the log writer closed before a checkpoint covered this entry"))
        self._waiters.clear()
        try:
            if self._failed is None:
                await self._loop.run_in_executor(self._mat_exec, self.store.materialize)
                await self._loop.run_in_executor(self._wal_exec, self.store.compact_wal)
        finally:
            self._closed = True
            await asyncio.to_thread(self.store.close)
            self._wal_exec.shutdown(wait=True)
            self._mat_exec.shutdown(wait=True)

    async def __aenter__(self) -> LogWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- Reading ---------------------------------------------------------------------------------

    async def read_entries(self, start: int, end: int) -> list[bytes]:
        """Entries [start, end) of the durable log."""
        return await asyncio.to_thread(self.store.read_entries, start, end)

    def get_node(self, level: int, index: int) -> bytes:
        """Perfect subtree hash (merkle.GetNode) within the durable log; may read a tile (blocking)."""
        return self.store.get_node(level, index)

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return await asyncio.to_thread(self.store.inclusion_proof, index, size)

    async def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        return await asyncio.to_thread(self.store.consistency_proof, size1, size2)

    async def compact_range(self, size: int) -> list[bytes]:
        return await asyncio.to_thread(self.store.compact_range, size)

    async def read_path(self, path: str) -> bytes | None:
        """A tlog-tiles object of the published log (`checkpoint`, `tile/...`), or None."""
        return await asyncio.to_thread(self.store.read_path, path)

    async def read_object(self, path: str) -> bytes | None:
        """An object of the log's own beside the log (e.g. `kms/sealed-seed`), or None."""
        return await asyncio.to_thread(self.store.backend.read, path)

    async def write_object(self, path: str, data: bytes) -> None:
        """Write such an object durably (the backend's write: synced, or an S3 PUT) before returning."""
        await asyncio.to_thread(self.store.backend.write, path, data)

    async def resume_material(self, max_history_entries: int, window_start_ms: int | None) -> ResumeMaterial | None:
        """The ResumeFrom for a restarted enclave (see parent.storage.resume), or None if empty."""
        return await asyncio.to_thread(resume_material, self.store, max_history_entries, window_start_ms)

    async def resume_plan(self, max_history_entries: int, window_start_ms: int | None) -> ResumePlan | None:
        """What a restarted enclave needs, but the entries (see parent.storage.resume), or None if empty."""
        return await asyncio.to_thread(resume_plan, self.store, max_history_entries, window_start_ms)

    async def resume_chunks(self, start: int, end: int) -> AsyncIterator[tuple[int, list[bytes]]]:
        """The entries [start, end) in chunks for a streamed resume, read one chunk at a time."""
        chunks = resume_chunks(self.store, start, end)
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return
            yield chunk

    # --- Bodies ----------------------------------------------------------------------------------

    def put_body(self, index: int, kind: str, data: bytes) -> asyncio.Future[None]:
        """Store the body that entry `index` commits to; the returned future resolves when durable.

        The body joins the next group commit (at most `body_linger_ms` later; at once if the
        future is awaited directly, not through wait_for or gather). Called before `persist` of
        an index >= `index`, that persist is acknowledged only after the body is durable too.
        With a retention of 0 days bodies are not kept and the future is already done.
        """
        self._usable()
        kind_ = check_body_kind(kind)
        fut = _BodyDurable(self._loop, self._wake)
        if self._opts.body_retention_days == 0:
            fut.set_result(None)
            return fut
        self._bodies.append((BodyRecord.of(index, kind_, bytes(data), now_ms()), fut))
        # Callers may drop the future (the entry's persist covers it): retrieve its exception.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        if self._opts.body_linger_ms <= 0:
            self._wake.set()
        elif self._linger is None:
            self._linger = self._loop.call_later(self._opts.body_linger_ms / 1000, self._linger_over)
        return fut

    def _linger_over(self) -> None:
        self._linger = None
        if self._bodies:
            self._wake.set()

    async def get_body_record(self, index: int, kind: str) -> BodyRecord | None:
        kind_ = check_body_kind(kind)
        for rec, _ in reversed(self._bodies):
            if (rec.index, rec.kind) == (index, kind_):
                return rec
        return await asyncio.to_thread(self.store.get_body_record, index, kind_)

    async def get_body(self, index: int, kind: str) -> bytes | None:
        """The body's bytes; None if there is none or it was redacted (see get_body_record)."""
        rec = await self.get_body_record(index, kind)
        return None if rec is None else rec.data

    async def redact_body(self, index: int, kind: str) -> None:
        """Replace a body by a tombstone that keeps its SHA-256; returns once durable."""
        rec = await self.get_body_record(index, kind)
        if rec is None:
            raise KeyError(f"no {kind} body stored for entry {index}")
        if rec.redacted:
            return
        self._usable()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._bodies.append((rec.tombstone(now_ms()), fut))
        self._wake.set()
        await fut

    async def prune_bodies(self, now: int | None = None) -> int:
        """Delete bodies older than the retention; return how many (0 without a retention)."""
        days = self._opts.body_retention_days
        if not days:
            return 0
        cutoff = (now if now is not None else now_ms()) - int(days * 86_400_000)
        return await asyncio.to_thread(self.store.prune_bodies, cutoff)
