"""The relay's witnessing task against real witness servers (cloister.witness on 127.0.0.1, in
threads) and the log's real storage on tmp_path: checkpoints get cosigned as the log grows, a
witness that is down blocks nothing and is retried, a 409 is recovered, and what the relay
serves verifies with a quorum policy."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from cloister.relay.config import WitnessConfig
from cloister.relay.storage import LocalBackend, LogWriter
from cloister.relay.witnessing import COSIGNED_PATH, HttpReply, KeepAlivePost, Witnessing, WitnessPacing
from cloister.verify.checkpoint import verify_checkpoint
from cloister.verify.cosignature import CosignaturePolicy, verify_cosignatures
from cloister.verify.errors import VerificationError
from cloister.witness.protocol import Witness
from cloister.witness.server import WitnessHTTPServer, make_server
from cloister.witness.state import WitnessState, init_state
from tests.relay.storage.conftest import FakeLog, entry
from tests.witness.harness import Clock, key

T0 = 1_700_000_000


class Served:
    """A witness following FakeLog's origin, served on 127.0.0.1 in a thread."""

    def __init__(self, root: Path, name: str, seed: int, log: FakeLog, port: int = 0) -> None:
        state_dir = root / name.replace("/", "_")
        if not state_dir.exists():
            init_state(state_dir, name, key(seed))
        keys = {log.origin: (log.signer.verifier,)}
        self.state = WitnessState.open(state_dir, keys)
        self.witness = Witness(self.state, keys, Clock(T0))
        self.server: WitnessHTTPServer = make_server(self.witness, "127.0.0.1", port, timeout=5.0)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.config = WitnessConfig(name=name, url=self.server.url, vkey=self.witness.vkey)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        self.state.close()


def run(fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(fn(), 90)

    asyncio.run(main())


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


async def grow(writer: LogWriter, log: FakeLog, n: int) -> None:
    for _ in range(n):
        a = log.append([entry(log.size)])
        await writer.persist(a.first_index, list(a.entries), a.checkpoint)


def witnessing(writer: LogWriter, witnesses: list[WitnessConfig], quorum: int, **options: Any) -> Witnessing:
    """The relay's witnessing task on `writer`, polling fast; `options` add to or replace the defaults."""
    defaults: dict[str, Any] = {"poll_s": 0.02, "timeout_s": 2, "backoff_s": (0.05, 0.2)}
    return Witnessing(witnesses, quorum, lambda: writer, **(defaults | options))


def cosigned_at(w: Witnessing, size: int) -> bool:
    return all(s.witnessed_size == size for s in w.status.values())


def served_size(w: Witnessing) -> int:
    note = w.cosigned()
    return -1 if note is None else int(note.split(b"\n")[1])


@pytest.fixture
def log() -> FakeLog:
    return FakeLog()


def test_checkpoints_get_cosigned_as_the_log_grows(tmp_path: Path, log: FakeLog) -> None:
    w1, w2 = Served(tmp_path, "witness.test/w1", 11, log), Served(tmp_path, "witness.test/w2", 12, log)

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        wit = witnessing(writer, [w1.config, w2.config], 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            await grow(writer, log, 3)
            await wait_until(lambda: cosigned_at(wit, 3) and served_size(wit) == 3, "size 3 cosigned")
            await grow(writer, log, 20)
            await wait_until(lambda: cosigned_at(wit, 23) and served_size(wit) == 23, "size 23 cosigned")
            # Served from memory first; the stored copy follows in a thread.
            await wait_until(lambda: (tmp_path / "log" / COSIGNED_PATH).read_bytes() == wit.cosigned(), "stored")
            tg.cancel_scope.cancel()
        note = wit.cosigned()
        assert note is not None
        verify_checkpoint(note, [log.signer.verifier], origin=log.origin)
        policy = CosignaturePolicy.from_vkeys([w1.config.vkey, w2.config.vkey], 2)
        assert verify_cosignatures(note, policy) == {"witness.test/w1": T0, "witness.test/w2": T0}
        # Stored beside the log, and reported per witness in health.
        assert (tmp_path / "log" / COSIGNED_PATH).read_bytes() == note
        health = wit.health()
        assert health["quorum"] == 2
        assert {n: s["witnessed_size"] for n, s in health["witnesses"].items()} == {
            "witness.test/w1": 23,
            "witness.test/w2": 23,
        }
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()
        w2.stop()


class SlowFirstCosignedWrite(LocalBackend):
    """Storage whose first write of the cosigned checkpoint stalls until another one has landed."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.landed: list[tuple[int, int]] = []  # (tree size, cosignature lines) of each note, as written
        self._stalled = False
        self._other_landed = threading.Event()

    def write(self, path: str, data: bytes) -> None:
        if path != COSIGNED_PATH:
            return super().write(path, data)
        first, self._stalled = not self._stalled, True
        if first:  # with one writer at a time, no other can land: give up after 2 s
            # Polled, not Event.wait(timeout): a timed wait never ends under libfaketime (CI's 2nd pass).
            deadline = time.monotonic() + 2.0
            while not self._other_landed.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        super().write(path, data)
        self.landed.append((int(data.split(b"\n")[1]), data.count("\u2014".encode())))
        if not first:
            self._other_landed.set()


def test_the_stored_cosigned_checkpoint_ends_with_the_newest_note(tmp_path: Path, log: FakeLog) -> None:
    # Regression (CI, 2026-12-06): each witness's task stored the note it published in its own
    # thread; a slow write of an older note (here the first witness's lone cosignature) could land
    # after a newer one (both witnesses'), leaving the stored copy behind what was served. Writes
    # now go one at a time, each of the note served by then.
    w1, w2 = Served(tmp_path, "witness.test/w1", 11, log), Served(tmp_path, "witness.test/w2", 12, log)
    backend = SlowFirstCosignedWrite(tmp_path / "log")

    async def main() -> None:
        writer = await LogWriter.open(backend)
        wit = witnessing(writer, [w1.config, w2.config], 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            await grow(writer, log, 3)
            await wait_until(lambda: cosigned_at(wit, 3) and served_size(wit) == 3, "size 3 cosigned")
            # The log's own signature and both witnesses' lines: 3 lines, at size 3. (If both
            # lines were in before the first write began, that one write is all there is.)
            await wait_until(lambda: (3, 3) in backend.landed, "the full note stored", timeout=10)
            await anyio.sleep(0.1)  # time for an older write to land over it, if one can
            tg.cancel_scope.cancel()
        assert backend.landed[-1] == (3, 3)
        assert backend.landed == sorted(backend.landed)
        assert (tmp_path / "log" / COSIGNED_PATH).read_bytes() == wit.cosigned()
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()
        w2.stop()


def test_a_witness_that_is_down_blocks_nothing_and_is_retried(tmp_path: Path, log: FakeLog) -> None:
    w1 = Served(tmp_path, "witness.test/w1", 11, log)
    w2 = Served(tmp_path, "witness.test/w2", 12, log)
    port = w2.server.server_address[1]
    w2.stop()  # down: nothing listens on its port

    async def main() -> None:
        nonlocal w2
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        wit = witnessing(writer, [w1.config, w2.config], 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            started = time.monotonic()
            await grow(writer, log, 5)  # persisting (what calls wait for) does not wait for witnesses
            assert time.monotonic() - started < 2
            await wait_until(lambda: wit.status["witness.test/w1"].witnessed_size == 5, "w1 cosigned")
            await wait_until(lambda: wit.status["witness.test/w2"].failures >= 2, "w2 retried")
            assert "witness.test/w2" not in (wit.cosigned() or b"").decode()
            w2 = Served(tmp_path, "witness.test/w2", 12, log, port=int(port))
            await wait_until(lambda: cosigned_at(wit, 5), "w2 cosigned once up")
            await wait_until(lambda: b"witness.test/w2" in (wit.cosigned() or b""), "both served")
            assert wit.status["witness.test/w2"].failures == 0
            tg.cancel_scope.cancel()
        note = wit.cosigned()
        assert note is not None
        policy = CosignaturePolicy.from_vkeys([w1.config.vkey, w2.config.vkey], 2)
        assert set(verify_cosignatures(note, policy)) == {"witness.test/w1", "witness.test/w2"}
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()
        w2.stop()


def test_a_409_is_recovered_with_the_witness_size(tmp_path: Path, log: FakeLog) -> None:
    w1 = Served(tmp_path, "witness.test/w1", 11, log)

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        await grow(writer, log, 7)
        # The witness already cosigned size 7 (e.g. before the relay restarted): the relay's
        # first request says "old 0" and gets a 409 naming 7.
        reply = w1.witness.add_checkpoint(b"old 0\n\n" + log.checkpoint(7))
        assert reply.status == 200
        await grow(writer, log, 6)
        wit = witnessing(writer, [w1.config], 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            await wait_until(lambda: cosigned_at(wit, 13), "size 13 cosigned after the 409")
            tg.cancel_scope.cancel()
        assert wit.status["witness.test/w1"].failures == 0  # recovered within one attempt
        note = wit.cosigned()
        assert note is not None
        assert verify_cosignatures(note, CosignaturePolicy.from_vkeys([w1.config.vkey], 1)) == {"witness.test/w1": T0}
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()


def test_the_quorum_fails_with_a_wrong_pinned_key_or_too_few_witnesses(tmp_path: Path, log: FakeLog) -> None:
    w1, w2 = Served(tmp_path, "witness.test/w1", 11, log), Served(tmp_path, "witness.test/w2", 12, log)
    other = Served(tmp_path / "other", "witness.test/w2", 13, log)  # same name, another key
    other.stop()

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        wit = witnessing(writer, [w1.config], 1)  # the relay sends to w1 only
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            await grow(writer, log, 4)
            await wait_until(lambda: cosigned_at(wit, 4), "size 4 cosigned")
            tg.cancel_scope.cancel()
        note = wit.cosigned()
        assert note is not None
        with pytest.raises(VerificationError, match="cosigned by 1 of the 2"):
            verify_cosignatures(note, CosignaturePolicy.from_vkeys([w1.config.vkey, w2.config.vkey], 2))
        with pytest.raises(VerificationError, match="cosigned by 0 of the 1"):
            verify_cosignatures(note, CosignaturePolicy.from_vkeys([other.config.vkey], 1))
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()
        w2.stop()


def test_a_reply_that_does_not_verify_with_the_configured_vkey_is_not_kept(tmp_path: Path, log: FakeLog) -> None:
    w1 = Served(tmp_path, "witness.test/w1", 11, log)
    liar = Served(tmp_path / "liar", "witness.test/w1", 14, log)  # answers with another key
    cfg = WitnessConfig(name="witness.test/w1", url=liar.config.url, vkey=w1.config.vkey)

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        wit = witnessing(writer, [cfg], 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            await grow(writer, log, 2)
            await wait_until(lambda: wit.status["witness.test/w1"].failures >= 1, "a refused reply")
            tg.cancel_scope.cancel()
        assert wit.cosigned() is None
        assert "no cosignature that verifies" in (wit.status["witness.test/w1"].last_error or "")
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()
        liar.stop()


def test_quorum_checkpoints_reach_the_enclave_and_a_failed_handover_is_retried(tmp_path: Path, log: FakeLog) -> None:
    """The newest quorum-cosigned checkpoint goes to `deliver` (the enclave's AddCosignatures); a
    failed hand-over is retried even when the log stays idle, so the enclave is not left paused."""
    w1, w2 = Served(tmp_path, "witness.test/w1", 11, log), Served(tmp_path, "witness.test/w2", 12, log)
    delivered: list[bytes] = []
    failures = [2]  # the first two hand-overs fail, as when the enclave is restarting

    async def deliver(note: bytes) -> None:
        if failures[0]:
            failures[0] -= 1
            raise ConnectionError("enclave unavailable")
        delivered.append(note)

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        wit = witnessing(writer, [w1.config, w2.config], 2, deliver=deliver)
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            await grow(writer, log, 3)  # then idle: no new checkpoint will come
            # Paced: size 1 may be cosigned (and handed over) before size 3 is sent.
            await wait_until(
                lambda: bool(delivered) and int(delivered[-1].split(b"\n")[1]) == 3,
                "the hand-over to succeed after two failures",
            )
            tg.cancel_scope.cancel()
        assert failures == [0] and wit.delivery_error is None
        note = delivered[-1]
        assert int(note.split(b"\n")[1]) == 3
        policy = CosignaturePolicy.from_vkeys([w1.config.vkey, w2.config.vkey], 2)
        verify_cosignatures(note, policy)
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()
        w2.stop()


def test_a_witness_ahead_of_storage_is_reported_as_a_rollback(tmp_path: Path, log: FakeLog) -> None:
    """Storage restored from an older copy: the witness answers 409 with a larger size than the log
    holds; the relay reports `ahead_of_log` and sends nothing older."""
    w1 = Served(tmp_path, "witness.test/w1", 11, log)

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        await grow(writer, log, 5)
        wit = witnessing(writer, [w1.config], 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            await wait_until(lambda: cosigned_at(wit, 5), "size 5 cosigned")
            tg.cancel_scope.cancel()
        await writer.close()
        # A second relay on an older copy of the storage (the first 3 entries).
        old = FakeLog()
        old_writer = await LogWriter.open(LocalBackend(tmp_path / "old-log"))
        await grow(old_writer, old, 3)
        stale = witnessing(old_writer, [w1.config], 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(stale.run)
            await wait_until(lambda: stale.status[w1.config.name].ahead_of_log == 5, "the rollback to be seen")
            tg.cancel_scope.cancel()
        assert stale.cosigned() is None and stale.health()["witnesses"][w1.config.name]["ahead_of_log"] == 5
        await old_writer.close()

    try:
        run(main)
    finally:
        w1.stop()


# --- Pacing (decision 0025) ---------------------------------------------------------------------


def test_pacing_delay_is_the_interval_or_the_entries_whichever_first() -> None:
    p = WitnessPacing(interval_s=0.5, max_entries=100)
    assert p.delay(now=10.0, last_sent_at=None, last_sent_size=0, size=1) == 0  # never sent: now
    assert p.delay(now=10.0, last_sent_at=10.0, last_sent_size=5, size=6) == 0.5
    assert p.delay(now=10.4, last_sent_at=10.0, last_sent_size=5, size=104) == pytest.approx(0.1)
    assert p.delay(now=10.4, last_sent_at=10.0, last_sent_size=5, size=105) == 0  # 100 entries
    assert p.delay(now=10.5, last_sent_at=10.0, last_sent_size=5, size=6) == 0  # the interval passed
    assert p.delay(now=99.0, last_sent_at=10.0, last_sent_size=5, size=6) == 0  # after a quiet spell
    for bad in ({"interval_s": -1}, {"interval_s": 6}, {"max_entries": 0}, {"max_entries": 501}):
        with pytest.raises(ValueError):
            WitnessPacing(**bad)


def test_default_pacing_stays_far_below_the_enclaves_witness_gate() -> None:
    from cloister.enclave.config import DEFAULT_MAX_UNWITNESSED_ENTRIES, DEFAULT_MAX_UNWITNESSED_S

    p = WitnessPacing()
    assert p.interval_s * 10 <= DEFAULT_MAX_UNWITNESSED_S
    assert p.max_entries * 2 <= DEFAULT_MAX_UNWITNESSED_ENTRIES


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def stays(predicate: Callable[[], bool], seconds: float = 0.3) -> None:
    """The predicate holds for a while (the witnessing loop polls every 20 ms meanwhile)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate()
        await anyio.sleep(0.02)


def test_checkpoints_are_paced_and_a_nudge_bypasses_the_pacing(tmp_path: Path, log: FakeLog) -> None:
    w1 = Served(tmp_path, "witness.test/w1", 11, log)
    clock = FakeMonotonic()

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        wit = witnessing(writer, [w1.config], 1, monotonic=clock, pacing=WitnessPacing(interval_s=5, max_entries=10))
        status = wit.status["witness.test/w1"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            await grow(writer, log, 1)
            await wait_until(lambda: status.witnessed_size == 1, "the first checkpoint sent at once")
            # Within the interval and below the entries bound: held back, however long (clock frozen).
            await grow(writer, log, 3)
            await stays(lambda: status.witnessed_size == 1)
            # A call waiting for its decision to be witnessed: sent now.
            wit.nudge()
            await wait_until(lambda: status.witnessed_size == 4, "the nudged checkpoint")
            # Ten entries since the last one sent: sent without waiting for the interval.
            await grow(writer, log, 9)
            await stays(lambda: status.witnessed_size == 4, 0.1)
            await grow(writer, log, 1)
            await wait_until(lambda: status.witnessed_size == 14, "the entries bound")
            # The interval passes: what accumulated goes.
            await grow(writer, log, 2)
            await stays(lambda: status.witnessed_size == 14, 0.1)
            clock.now += 5
            await wait_until(lambda: status.witnessed_size == 16, "the interval bound")
            tg.cancel_scope.cancel()
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()


def test_a_new_runs_key_entry_is_witnessed_without_waiting_for_the_pacing(tmp_path: Path, log: FakeLog) -> None:
    """The enclave grants nothing until its start (key entry) is witnessed: that checkpoint goes at once."""
    from tests.relay.storage.conftest import key_entry

    w1 = Served(tmp_path, "witness.test/w1", 11, log)
    clock = FakeMonotonic()

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        wit = witnessing(writer, [w1.config], 1, monotonic=clock, pacing=WitnessPacing(interval_s=5, max_entries=100))
        status = wit.status["witness.test/w1"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            # Both entries in one persist: grown one by one, the loop could send size 1 at once
            # and then hold size 2 for the (frozen) interval (seen under load).
            a = log.append([entry(0), entry(1)])
            await writer.persist(a.first_index, list(a.entries), a.checkpoint)
            await wait_until(lambda: status.witnessed_size == 2, "the first checkpoint")
            await grow(writer, log, 1)
            await stays(lambda: status.witnessed_size == 2, 0.1)
            # An enclave restart appends its key entry: no waiting for the interval.
            a = log.append([key_entry(1, 2)])
            await writer.persist(a.first_index, list(a.entries), a.checkpoint)
            await wait_until(lambda: status.witnessed_size == 4, "the key entry's checkpoint")
            tg.cancel_scope.cancel()
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()


def test_one_kept_alive_connection_per_witness_and_a_stale_one_is_replaced(tmp_path: Path, log: FakeLog) -> None:
    w1 = Served(tmp_path, "witness.test/w1", 11, log)
    w1.server.request_timeout = 0.3  # the witness drops a connection idle this long
    accepted: list[object] = []
    process = w1.server.process_request

    def counting(request: object, client_address: object) -> None:
        accepted.append(client_address)
        process(request, client_address)

    w1.server.process_request = counting  # type: ignore[method-assign]
    post = KeepAlivePost()
    url = w1.config.url + "/add-checkpoint"

    async def main() -> None:
        for _ in range(3):
            reply = await post(url, b"old 0\n\n" + log.append([entry(log.size)]).checkpoint, 2)
            assert reply.status in (200, 409)
        assert len(accepted) == 1
        await anyio.sleep(0.6)  # the witness closed it meanwhile: sent again on a new connection
        reply = await post(url, b"garbage", 2)
        assert reply.status == 400 and len(accepted) == 2
        post.close()

    try:
        run(main)
    finally:
        w1.stop()


def test_pacing_settings_in_the_relay_config(tmp_path: Path) -> None:
    from cloister.relay.config import ConfigError, load_relay_config

    path = tmp_path / "relay.toml"
    path.write_text('[relay]\nenclave = "unix:/x"\n')
    c = load_relay_config(path)
    assert (c.witness_interval_ms, c.witness_every, c.publish_interval_ms, c.publish_every) == (250, 256, 1000, 4096)
    assert WitnessPacing(c.witness_interval_ms / 1000, c.witness_every) == WitnessPacing()
    path.write_text(
        '[relay]\nenclave = "unix:/x"\nwitness_interval_ms = 100\nwitness_every = 32\n'
        "publish_interval_ms = 200\npublish_every = 64\n"
    )
    c = load_relay_config(path)
    assert (c.witness_interval_ms, c.witness_every, c.publish_interval_ms, c.publish_every) == (100, 32, 200, 64)
    # Pacing that could starve the enclave's witness gate (1000 entries, 10 s) is refused.
    for bad in ("witness_every = 1000", "witness_interval_ms = 10000", "publish_every = 0", "witness_every = 1.5"):
        path.write_text(f'[relay]\nenclave = "unix:/x"\n{bad}\n')
        with pytest.raises(ConfigError, match=bad.split(" ")[0]):
            load_relay_config(path)


def test_the_relay_applies_its_pacing_settings(tmp_path: Path, log: FakeLog) -> None:
    """The settings reach what they pace: the relay's Witnessing and its log writer."""
    import dataclasses

    from cloister.relay.config import load_relay_config
    from cloister.relay.lifecycle import open_storage
    from cloister.relay.relay import Relay

    path = tmp_path / "relay.toml"
    path.write_text(
        f'[relay]\nenclave = "unix:/x"\nrun_dir = "{tmp_path / "run"}"\nwitness_interval_ms = 100\n'
        "witness_every = 32\npublish_interval_ms = 200\npublish_every = 64\n"
    )
    w1 = Served(tmp_path, "witness.test/w1", 11, log)
    try:
        config = dataclasses.replace(load_relay_config(path), witnesses=(w1.config,), witness_quorum=1)
        relay = Relay(config)
        assert relay.witnessing is not None and relay.witnessing.pacing == WitnessPacing(0.1, 32)
    finally:
        w1.stop()

    async def main() -> None:
        writer = await open_storage(
            str(tmp_path / "log"),
            s3_endpoint_url=None,
            body_retention_days=None,
            publish_every=config.publish_every,
            publish_interval_ms=config.publish_interval_ms,
        )
        try:
            assert (writer._opts.materialize_every, writer._opts.materialize_interval_ms) == (64, 200)
        finally:
            await writer.close()

    run(main)


def test_default_pacing_sends_on_entries_even_if_the_clock_stands_still(tmp_path: Path, log: FakeLog) -> None:
    """A busy log is witnessed every 256 entries at the latest, well before the gate's 1,000."""
    w1 = Served(tmp_path, "witness.test/w1", 11, log)
    clock = FakeMonotonic()

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        wit = witnessing(writer, [w1.config], 1, monotonic=clock)
        status = wit.status["witness.test/w1"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            await grow(writer, log, 1)
            await wait_until(lambda: status.witnessed_size == 1, "the first checkpoint")
            await grow(writer, log, 254)
            await stays(lambda: status.witnessed_size == 1, 0.1)
            await grow(writer, log, 300)
            await wait_until(lambda: (status.witnessed_size or 0) >= 257, "a checkpoint after 256 entries")
            tg.cancel_scope.cancel()
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()


def test_witnesses_get_the_same_checkpoint_so_a_growing_log_reaches_a_quorum(tmp_path: Path, log: FakeLog) -> None:
    """Witnesses answering at different speeds while calls keep coming: each round sends all of
    them one checkpoint, so a quorum forms on it (paced each on its own, they were sent different
    checkpoints of the growing log, no note ever had a quorum, and the enclave paused at 1,000)."""
    w1, w2 = Served(tmp_path, "witness.test/w1", 11, log), Served(tmp_path, "witness.test/w2", 12, log)
    clock = FakeMonotonic()
    default = KeepAlivePost()

    async def post(url: str, body: bytes, timeout: float) -> HttpReply:
        if url.startswith(w2.config.url):
            await anyio.sleep(0.03)  # the slower witness
        return await default(url, body, timeout)

    delivered: list[int] = []

    async def deliver(note: bytes) -> None:
        delivered.append(int(note.split(b"\n")[1]))

    async def main() -> None:
        writer = await LogWriter.open(LocalBackend(tmp_path / "log"))
        wit = witnessing(
            writer,
            [w1.config, w2.config],
            2,
            post=post,
            monotonic=clock,
            pacing=WitnessPacing(interval_s=5, max_entries=10),
            deliver=deliver,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(wit.run)
            for _ in range(40):  # calls keep coming, never a pause for the witnesses to catch up
                await grow(writer, log, 3)
                await anyio.sleep(0.005)
            await wait_until(lambda: bool(delivered) and delivered[-1] >= 100, "a quorum beyond 100 entries")
            tg.cancel_scope.cancel()
        default.close()
        await writer.close()

    try:
        run(main)
    finally:
        w1.stop()
        w2.stop()
