"""The relay brings a restarted enclave back from the newest snapshot, streaming only the tail
(docs/decisions/0016), through its own Lifecycle and storage and the enclave's own servicer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from cloister.relay.storage import LogWriter
from cloister.verify.entries import KeyEntry, SnapshotEntry, parse_entry
from cloister.wire import enclave_pb2 as pb
from tests.e2e.chaos import InProcess

INTERVAL = 40


async def call(world: InProcess, relay: Any, n: int) -> None:
    """A call and its outcome, both persisted, as the call path does."""
    v = await world.authorize(relay, f"call-{n}")
    await relay.state.persist(v.log)
    out = await relay.state.enclave.record_outcome(
        pb.OutcomeRequest(
            decision_index=v.log_index,
            result_sha256=b"r" * 32,
            duration_us=1,
            persisted_size=relay.state.writer.persisted_size,
        )
    )
    await relay.state.persist(out.log)


def test_a_restarted_enclave_resumes_from_the_newest_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = InProcess(tmp_path)
    streamed: list[tuple[int, int]] = []

    async def scenario() -> None:
        relay, enclave = await world.start_relay()
        enclave.core.snapshot_interval = INTERVAL
        for n in range(150):
            await call(world, relay, n)
        writer = relay.state.writer
        size = writer.persisted_size
        stored = [parse_entry(e) for e in await writer.read_entries(0, size)]
        snaps = [i for i, e in enumerate(stored) if isinstance(e, SnapshotEntry) and e.part == 0]
        assert len(snaps) >= 3
        # Record what the relay streams when it resumes (from the storage it reopens).
        chunks = LogWriter.resume_chunks

        async def recording(self: LogWriter, start: int, end: int) -> Any:
            async for first, entries in chunks(self, start, end):
                streamed.append((first, len(entries)))
                yield first, entries

        monkeypatch.setattr(LogWriter, "resume_chunks", recording)
        enclave.restart(world.new_core())
        with anyio.fail_after(30):
            await relay.lifecycle.ensure_enclave_ready()
        assert streamed[0][0] == snaps[-1] and sum(n for _, n in streamed) == size - snaps[-1]
        intro = parse_entry((await relay.state.writer.read_entries(size, size + 1))[0])
        assert isinstance(intro, KeyEntry) and intro.previous_size == size
        await call(world, relay, 1000)  # and calls go on
        await relay.state.writer.close()

    anyio.run(scenario)
