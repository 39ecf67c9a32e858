"""Witnessing: the relay sends the log's newest durable checkpoint to each configured C2SP
tlog-witness (c2sp.org/tlog-witness, add-checkpoint) and keeps the cosignatures they return.

- Off the call path: one background task per witness polls the writer's latest durable
  checkpoint; calls never wait for a witness. At most one request per witness is in flight, and
  a witness that was busy or down gets the newest checkpoint next (older ones are skipped).
- Paced (decision 0025): the witnesses get a new checkpoint at most every `interval_s`, or sooner
  once `max_entries` entries accumulated since the last one sent, whichever comes first. All are
  sent the same checkpoint (a round), so that a quorum can cosign one note.
  Bypassing the pacing: the first checkpoint after a quiet spell (the interval has passed), a
  checkpoint covering this run's key entry (the enclave grants nothing until its start is
  witnessed), and a `nudge` (a call waits for its decision to be witnessed). The defaults stay far
  below the enclave's WitnessGate limits (1000 entries, 10 s), which must never be reached.
- add-checkpoint: `old <size>` is the size this witness last cosigned as far as the relay knows
  (0 after a start), the consistency proof comes from the log's storage. A 409 carries the
  witness's size (`text/x.tlog.size`): the relay adopts it and retries once with the matching
  proof. Any other failure (timeout, refused connection, 4xx/5xx) is retried after a backoff
  that doubles up to a cap. Each witness gets one kept-alive connection (KeepAlivePost).
- A returned cosignature must verify against the witness's configured vkey
  (cloister.verify.cosignature) before it is kept. The relay talks to witnesses over HTTP only.
- The cosignatures are signature lines appended to the checkpoint note: the newest checkpoint
  with a quorum of them (else the one with the most) is served at GET /log/checkpoint.cosigned
  and written to storage beside the log (`checkpoint.cosigned`). Nothing here is trusted by
  anyone: auditors verify the cosignatures against keys they pin.
- The newest checkpoint with a quorum goes to the enclave (`deliver`, AddCosignatures), which
  grants only while the witnesses keep up (cloister.enclave.freshness, decision 0015). A failed
  delivery is retried until it succeeds or a newer quorum supersedes it: an idle log must not
  stay paused because one delivery was lost.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import logging
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from cloister.relay.config import WitnessConfig
from cloister.relay.storage import LogWriter
from cloister.verify.checkpoint import parse_checkpoint
from cloister.verify.cosignature import Ed25519CosignatureVerifier, verify_cosignature_line
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.note import parse_note

__all__ = ["COSIGNED_PATH", "HttpReply", "KeepAlivePost", "WitnessPacing", "Witnessing", "http_post"]

log = logging.getLogger("cloister.relay.witnessing")

COSIGNED_PATH = "checkpoint.cosigned"
MAX_REPLY = 64 * 1024
_KEEP_NOTES = 16


@dataclass(frozen=True)
class WitnessPacing:
    """How often a witness gets a new checkpoint (see the module docstring)."""

    interval_s: float = 0.25
    max_entries: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.interval_s <= 5:
            raise ValueError(f"witness pacing interval {self.interval_s}s is outside [0, 5] s")
        if not 1 <= self.max_entries <= 500:
            raise ValueError(f"witness pacing of {self.max_entries} entries is outside [1, 500]")

    def delay(self, now: float, last_sent_at: float | None, last_sent_size: int, size: int) -> float:
        """Seconds until a checkpoint of `size` may go to a witness last sent one of
        `last_sent_size` at `last_sent_at` (None: never); 0 means now."""
        if last_sent_at is None or size - last_sent_size >= self.max_entries:
            return 0.0
        return max(0.0, last_sent_at + self.interval_s - now)


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes


Post = Callable[[str, bytes, float], Awaitable[HttpReply]]
Deliver = Callable[[bytes], Awaitable[None]]


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return conn_cls(parts.netloc, timeout=timeout)


def _exchange(conn: http.client.HTTPConnection, url: str, body: bytes) -> tuple[HttpReply, bool]:
    """One POST on `conn`: the reply, and whether the connection may carry another request."""
    path = urllib.parse.urlsplit(url).path or "/"
    conn.request("POST", path, body=body, headers={"Content-Type": "text/plain; charset=utf-8"})
    resp = conn.getresponse()
    reply = HttpReply(resp.status, resp.read(MAX_REPLY))
    return reply, resp.isclosed() and not resp.will_close  # read to its end, and kept alive


def _post_blocking(url: str, body: bytes, timeout: float) -> HttpReply:
    conn = _connection(url, timeout)
    try:
        return _exchange(conn, url, body)[0]
    finally:
        conn.close()


async def http_post(url: str, body: bytes, timeout: float) -> HttpReply:
    """POST with the standard library in a worker thread; the socket timeout bounds it."""
    return await anyio.to_thread.run_sync(_post_blocking, url, body, timeout, abandon_on_cancel=True)


class KeepAlivePost:
    """POST over one kept-alive connection per witness (tlog-witness: witnesses SHOULD support
    keep-alive), so a cosignature costs neither side a TCP handshake or a server thread.

    The relay has at most one request in flight per witness; a connection is taken out of the
    pool while it is used. A kept connection the witness closed meanwhile (its idle timeout)
    fails before any reply: the request is sent again once, on a new connection.
    """

    def __init__(self) -> None:
        self._idle: dict[str, http.client.HTTPConnection] = {}
        self._lock = threading.Lock()

    def _blocking(self, url: str, body: bytes, timeout: float) -> HttpReply:
        key = urllib.parse.urlsplit(url).netloc
        with self._lock:
            conn = self._idle.pop(key, None)
        if conn is not None:
            try:
                reply, keep = _exchange(conn, url, body)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                conn = None  # went stale while idle: one fresh attempt below
            except BaseException:
                conn.close()
                raise
            else:
                self._put_back(key, conn, keep)
                return reply
        conn = _connection(url, timeout)
        try:
            reply, keep = _exchange(conn, url, body)
        except BaseException:
            conn.close()
            raise
        self._put_back(key, conn, keep)
        return reply

    def _put_back(self, key: str, conn: http.client.HTTPConnection, keep: bool) -> None:
        if not keep:
            conn.close()
            return
        with self._lock:
            old = self._idle.pop(key, None)
            self._idle[key] = conn
        if old is not None:
            old.close()

    async def __call__(self, url: str, body: bytes, timeout: float) -> HttpReply:
        return await anyio.to_thread.run_sync(self._blocking, url, body, timeout, abandon_on_cancel=True)

    def close(self) -> None:
        with self._lock:
            conns, self._idle = list(self._idle.values()), {}
        for conn in conns:
            conn.close()


class WitnessFailed(Exception):
    pass


@dataclass
class WitnessStatus:
    name: str
    witnessed_size: int | None = None  # what the witness last cosigned, as far as the relay knows
    cosigned_note: bytes | None = None  # the checkpoint we hold its cosignature for
    failures: int = 0  # consecutive
    last_error: str | None = None
    last_cosigned_at: float | None = None  # the relay's clock (seconds)
    # The witness has cosigned a larger tree than the log storage holds: storage was rolled back
    # (or another enclave ran on a copy). The enclave will not grant on this log (decision 0015).
    ahead_of_log: int | None = None

    def json(self) -> dict[str, Any]:
        return {
            "witnessed_size": self.witnessed_size,
            "ahead_of_log": self.ahead_of_log,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_cosigned_at": self.last_cosigned_at,
        }


def _size(note: bytes) -> int:
    return parse_checkpoint(parse_note(note).text).size


@dataclass(frozen=True)
class _Round:
    """The checkpoint all witnesses are sent (the same note, so that a quorum cosigns one note):
    chosen at `at` (monotonic clock), when `nudges` nudges had been made."""

    note: bytes | None = None
    size: int = 0
    at: float | None = None
    nudges: int = 0


class Cosignatures:
    """Cosignature lines per checkpoint note (the last few checkpoints)."""

    def __init__(self) -> None:
        self._by_note: OrderedDict[bytes, dict[str, bytes]] = OrderedDict()
        self._size: dict[bytes, int] = {}  # each kept note's tree size, parsed once by the caller

    def add(self, note: bytes, size: int, witness: str, line: bytes) -> None:
        self._by_note.setdefault(note, {})[witness] = line
        self._by_note.move_to_end(note)
        self._size[note] = size
        while len(self._by_note) > _KEEP_NOTES:
            del self._size[self._by_note.popitem(last=False)[0]]

    def with_quorum(self, note: bytes, quorum: int) -> bytes | None:
        """`note` with its cosignature lines, if at least `quorum` witnesses cosigned it."""
        lines = self._by_note.get(note, {})
        return note + b"".join(lines[name] for name in sorted(lines)) if len(lines) >= quorum else None

    def best(self, quorum: int) -> bytes | None:
        """The newest checkpoint with `quorum` cosignatures, else the one with the most (then newest)."""
        if not self._by_note:
            return None
        ranked = max(self._by_note.items(), key=lambda kv: (len(kv[1]) >= quorum, len(kv[1]), self._size[kv[0]]))
        note, lines = ranked
        return note + b"".join(lines[name] for name in sorted(lines))


class Witnessing:
    """The background witnessing task (start it in the relay's task group with `run`)."""

    def __init__(
        self,
        witnesses: Sequence[WitnessConfig],
        quorum: int,
        writer: Callable[[], LogWriter],
        *,
        post: Post | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        pacing: WitnessPacing | None = None,
        timeout_s: float = 10.0,
        poll_s: float = 0.2,
        # Short: while a witness is unreachable the enclave may be paused (decision 0015).
        backoff_s: tuple[float, float] = (0.25, 5.0),
        deliver: Deliver | None = None,
    ) -> None:
        self.witnesses = tuple(witnesses)
        self.quorum = quorum
        self._writer = writer
        self._post = post or KeepAlivePost()
        self._clock = clock
        self._monotonic = monotonic
        self.pacing = pacing or WitnessPacing()
        self._timeout = timeout_s
        self._poll = poll_s
        self._backoff = backoff_s
        self._verifiers = {w.name: Ed25519CosignatureVerifier.from_vkey(w.vkey) for w in self.witnesses}
        self.status = {w.name: WitnessStatus(w.name) for w in self.witnesses}
        self._cosignatures = Cosignatures()
        self._served: bytes | None = None
        self._stored: bytes | None = None  # what COSIGNED_PATH holds, as far as this process wrote it
        self._store_lock = anyio.Lock()  # one write at a time, so an older note never lands last
        self._changed = anyio.Event()
        self._deliver = deliver
        self._quorum_note: tuple[int, bytes] | None = None  # (size, cosigned note) newest with a quorum
        self._delivered: bytes | None = None
        self._delivery_wanted = anyio.Event()
        self.delivery_error: str | None = None
        self._wake = anyio.Event()  # `nudge`: a call waits for its decision to be witnessed
        self._nudges = 0
        self._round = _Round()
        self._sizes: OrderedDict[bytes, int] = OrderedDict()

    # --- What the relay serves -------------------------------------------------------------------

    def cosigned(self) -> bytes | None:
        """The checkpoint note with the cosignature lines appended (GET /log/checkpoint.cosigned)."""
        return self._served

    def health(self) -> dict[str, Any]:
        return {
            "quorum": self.quorum,
            "witnesses": {name: s.json() for name, s in self.status.items()},
            "quorum_size": self._quorum_note[0] if self._quorum_note else None,
            "delivery_error": self.delivery_error,
        }

    def nudge(self) -> None:
        """Send the newest checkpoint now, bypassing the pacing (a call is waiting)."""
        self._nudges += 1
        self._wake.set()
        self._wake = anyio.Event()

    async def changed(self) -> None:
        """Wait until a new cosignature is kept (for tests and callers that need to wait)."""
        await self._changed.wait()

    # --- The tasks -----------------------------------------------------------------------------

    async def run(self) -> None:
        await self._load_stored()
        async with anyio.create_task_group() as tg:
            for w in self.witnesses:
                tg.start_soon(self._run_one, w)
            if self._deliver is not None:
                tg.start_soon(self._deliver_loop, self._deliver)

    async def _deliver_loop(self, deliver: Deliver) -> None:
        """Hand the newest quorum-cosigned checkpoint to the enclave, retrying until it is taken."""
        delay = self._backoff[0]
        while True:
            await self._delivery_wanted.wait()
            self._delivery_wanted = anyio.Event()
            while self._quorum_note is not None and self._quorum_note[1] != self._delivered:
                note = self._quorum_note[1]
                try:
                    await deliver(note)
                except Exception as exc:  # the enclave restarted, is busy, or refused: try again
                    self.delivery_error = str(exc)[:300]
                    log.warning("cannot hand cosignatures to the enclave: %s (retrying)", self.delivery_error)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, self._backoff[1])
                else:
                    self._delivered, self.delivery_error, delay = note, None, self._backoff[0]

    async def _load_stored(self) -> None:
        try:
            backend = self._writer().store.backend
            self._served = self._stored = await anyio.to_thread.run_sync(backend.read, COSIGNED_PATH)
        except Exception as exc:  # a missing or unreadable copy is rebuilt from the witnesses
            log.warning("cannot read the stored %s: %s", COSIGNED_PATH, exc)

    def _size_of(self, note: bytes) -> int:
        size = self._sizes.get(note)
        if size is None:
            size = self._sizes[note] = _size(note)
            while len(self._sizes) > _KEEP_NOTES:
                self._sizes.popitem(last=False)
        return size

    def round_delay(self, size: int, nudges: int) -> float:
        """Seconds until a checkpoint of `size` may start a new round (0: now)."""
        r = self._round
        if nudges != r.nudges:  # a call waits for its decision to be witnessed
            return 0.0
        # The round's checkpoint does not cover this run's key entry: nothing is granted until it does.
        key = self._writer().store.latest_key_entry(size)
        if key is not None and key >= r.size:
            return 0.0
        return self.pacing.delay(self._monotonic(), r.at, r.size, size)

    def target(self) -> tuple[bytes | None, float]:
        """The checkpoint every witness is to cosign now, and how long until a newer one may be chosen.

        One choice for all witnesses (a round): were each paced on its own, they would be sent
        different checkpoints of a growing log and no note would ever gather a quorum.
        """
        nudges = self._nudges  # read before the note: the note then covers what they wait for
        note = self._writer().latest_checkpoint()
        r = self._round
        if note is None or note == r.note:
            self._round = dataclasses.replace(r, nudges=nudges)
            return r.note, self._poll
        size = self._size_of(note)
        wait = self.round_delay(size, nudges)
        if wait > 0:
            return r.note, wait
        self._round = _Round(note, size, self._monotonic(), nudges)
        return note, self._poll

    async def _idle(self, seconds: float) -> None:
        wake = self._wake
        with anyio.move_on_after(seconds):
            await wake.wait()

    async def _run_one(self, witness: WitnessConfig) -> None:
        status = self.status[witness.name]
        delay = self._backoff[0]
        while True:
            note, wait = self.target()
            if note is None or note == status.cosigned_note:
                await self._idle(min(wait, self._poll))
                continue
            try:
                await self._submit(witness, note)
            except Exception as exc:  # keep trying: the relay's calls never depend on a witness
                status.failures += 1
                status.last_error = str(exc)[:300]
                log.warning("witness %s: %s (retrying in %.1fs)", witness.name, status.last_error, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
            else:
                delay = self._backoff[0]

    async def _submit(self, witness: WitnessConfig, note: bytes) -> None:
        status = self.status[witness.name]
        size = self._size_of(note)
        reply = await self._add_checkpoint(witness, status.witnessed_size or 0, size, note)
        if reply.status == 409:
            # The witness is at another size than we thought (a relay restart, another relay):
            # adopt it and retry once with the matching proof.
            status.witnessed_size = _parse_size(reply.body)
            status.ahead_of_log = status.witnessed_size if status.witnessed_size > size else None
            if status.ahead_of_log is not None:
                log.error(
                    "witness %s has cosigned size %d, beyond this log's size %d: storage was rolled back or "
                    "another enclave ran on a copy; the enclave will not grant on this log",
                    witness.name,
                    status.witnessed_size,
                    size,
                )
            reply = await self._add_checkpoint(witness, status.witnessed_size, size, note)
        if reply.status != 200:
            text = reply.body[:200].decode("utf-8", "replace").strip()
            raise WitnessFailed(f"add-checkpoint of size {size} answered {reply.status}: {text}")
        line = self._verified_line(witness, note, reply.body)
        status.witnessed_size = size
        status.ahead_of_log = None
        status.cosigned_note = note
        status.failures = 0
        status.last_error = None
        status.last_cosigned_at = self._clock()
        self._cosignatures.add(note, size, witness.name, line)
        quorate = self._cosignatures.with_quorum(note, self.quorum)
        if quorate is not None and (self._quorum_note is None or size > self._quorum_note[0]):
            self._quorum_note = (size, quorate)
            self._delivery_wanted.set()
        await self._publish()

    async def _add_checkpoint(self, witness: WitnessConfig, old: int, size: int, note: bytes) -> HttpReply:
        if old > size:
            raise WitnessFailed(f"the witness has cosigned size {old}, beyond the log's durable size {size}")
        proof = await self._writer().consistency_proof(old, size) if 0 < old < size else []
        body = b"old %d\n" % old + b"".join(base64.b64encode(h) + b"\n" for h in proof) + b"\n" + note
        with anyio.fail_after(self._timeout + 1):
            return await self._post(f"{witness.url}/add-checkpoint", body, self._timeout)

    def _verified_line(self, witness: WitnessConfig, note: bytes, body: bytes) -> bytes:
        """The cosignature line for this witness among the reply's lines, checked against its vkey."""
        text = parse_note(note).text
        verifier = self._verifiers[witness.name]
        for raw in body.decode("utf-8", "replace").splitlines():
            try:
                verify_cosignature_line(raw, text, verifier)
            except (DecodeError, VerificationError, ValueError):
                continue
            return raw.encode("utf-8") + b"\n"
        raise WitnessFailed("the reply holds no cosignature that verifies with the configured vkey")

    async def _publish(self) -> None:
        best = self._cosignatures.best(self.quorum)
        if best is None or best == self._served:
            return
        self._served = best
        self._changed.set()
        self._changed = anyio.Event()
        # Each witness's task publishes; their writes run in threads. Under one lock, each writes
        # whatever is served by then, so the file ends with the newest note, not the slowest write's.
        async with self._store_lock:
            best = self._served
            if best == self._stored:
                return
            try:
                backend = self._writer().store.backend
                await anyio.to_thread.run_sync(backend.write, COSIGNED_PATH, best)
            except Exception as exc:  # served from memory all the same
                log.warning("cannot store %s: %s", COSIGNED_PATH, exc)
                return
            self._stored = best


def _parse_size(body: bytes) -> int:
    text = body.strip()
    if not text.isdigit() or len(text) > 20:
        raise WitnessFailed(f"a 409 without a tree size in its body ({body[:40]!r})")
    return int(text)
