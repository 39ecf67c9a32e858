"""The relay's end of the `Channel` stream (decision 0022) against a compromised host in the middle.

A scripted gRPC server stands in for whatever the host puts between the relay and the enclave:
it answers with unknown ids, duplicates, reorders, the wrong kind of answer, stalls, or cuts the
stream. The relay's client must give each caller its own answer or an EnclaveUnavailable (fail
closed), never another call's answer, and recover on a new stream. Then the real service over a
test world's core: an outcome cut off mid-call is recorded once or reported missing, never twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from cloister.enclave.service import serve
from cloister.relay.enclave_client import EnclaveClient, EnclaveRefused, EnclaveUnavailable
from cloister.verify.entries import OutcomeEntry, parse_entry
from cloister.wire import enclave_pb2 as pb
from cloister.wire import enclave_pb2_grpc as pb_grpc
from cloister.wire.contract import MAX_CHANNEL_BATCH, MAX_MESSAGE_BYTES
from tests.world import World, make_world

pytestmark = pytest.mark.timeout(60)


class Wire:
    """One Channel stream seen from the host's side: calls one at a time (however the relay
    batched them), answers sent in messages of the host's choosing."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self._queued: list[pb.ChannelRequest] = []

    async def read(self) -> pb.ChannelRequest:
        while not self._queued:
            batch = await self.context.read()
            if batch is grpc.aio.EOF:
                raise EOFError
            self._queued.extend(batch.requests)
        return self._queued.pop(0)

    async def write(self, *answers: pb.ChannelResponse) -> None:
        await self.context.write(pb.ChannelResponses(responses=answers))

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        await self.context.abort(code, details)


Script = Callable[[Wire, int], Awaitable[None]]  # (the stream, its number)


class FakeEnclave(pb_grpc.EnclaveServicer):
    """Serves Channel streams with `script`, numbering them; the host in the middle."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.streams = 0

    async def Channel(self, request_iterator: Any, context: Any) -> None:
        self.streams += 1
        await self.script(Wire(context), self.streams)


def answer(req: pb.ChannelRequest, reason: str | None = None, rid: int | None = None) -> pb.ChannelResponse:
    """An allow for an authorize request, its reason naming the request (or `reason`)."""
    return pb.ChannelResponse(
        id=req.id if rid is None else rid,
        authorize=pb.AuthorizeResponse(decision=pb.ALLOW, reason=reason or req.authorize.request_id),
    )


def ask(rid: str, args: bytes = b"{}") -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(token="t", server="s", tool="x", arguments_json=args, request_id=rid)


@contextlib.asynccontextmanager
async def fake(
    tmp_path: Path, script: Script, *, timeout_s: float = 5.0
) -> AsyncIterator[tuple[EnclaveClient, FakeEnclave]]:
    path = tmp_path / "fake.sock"
    server = grpc.aio.server()
    servicer = FakeEnclave(script)
    pb_grpc.add_EnclaveServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    try:
        async with EnclaveClient(f"unix:{path}", tmp_path / "run", timeout_s=timeout_s) as client:
            yield client, servicer
    finally:
        await server.stop(0)


async def serve_forever(wire: Wire, _n: int) -> None:
    """An honest enclave: every request answered in order."""
    with contextlib.suppress(EOFError):
        while True:
            await wire.write(answer(await wire.read()))


def test_unknown_and_duplicated_answers_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def script(wire: Wire, n: int) -> None:
        req = await wire.read()
        await wire.write(answer(req, "unknown", rid=999))
        await wire.write(answer(req, "first"))
        await wire.write(answer(req, "forged duplicate"))
        await serve_forever(wire, n)

    async def scenario() -> None:
        async with fake(tmp_path, script) as (client, servicer):
            assert (await client.authorize(ask("a"))).reason == "first"
            assert (await client.authorize(ask("b"))).reason == "b"  # the duplicate did not answer b
            assert client._stream is not None and client._stream.stray == 2
            assert servicer.streams == 1

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert "an answer for id 999, which is not in flight" in caplog.text


def test_reordered_answers_reach_their_own_callers(tmp_path: Path) -> None:
    async def script(wire: Wire, n: int) -> None:
        reqs = [await wire.read() for _ in range(5)]
        for req in reversed(reqs):
            await wire.write(answer(req))

    async def scenario() -> None:
        async with fake(tmp_path, script) as (client, _):
            got = await asyncio.gather(*(client.authorize(ask(f"r{i}")) for i in range(5)))
            assert [v.reason for v in got] == [f"r{i}" for i in range(5)]

    asyncio.run(scenario())


def test_an_answer_of_the_wrong_kind_is_no_answer(tmp_path: Path) -> None:
    async def script(wire: Wire, n: int) -> None:
        req = await wire.read()
        await wire.write(pb.ChannelResponse(id=req.id, outcome=pb.OutcomeResponse(log_index=5)))
        await serve_forever(wire, n)

    async def scenario() -> None:
        async with fake(tmp_path, script) as (client, _):
            with pytest.raises(EnclaveUnavailable, match="answered as outcome"):
                await client.authorize(ask("a"))
            assert (await client.authorize(ask("b"))).reason == "b"

    asyncio.run(scenario())


def test_a_stalled_stream_fails_closed_within_the_deadline_then_is_replaced(tmp_path: Path) -> None:
    async def script(wire: Wire, n: int) -> None:
        if n == 1:
            await wire.read()
            await asyncio.sleep(30)  # the host holds every answer
        await serve_forever(wire, n)

    async def scenario() -> None:
        async with fake(tmp_path, script, timeout_s=0.5) as (client, servicer):
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(EnclaveUnavailable, match=r"no answer within 0.5s"):
                await client.authorize(ask("held"))
            assert loop.time() - began < 3
            assert (await client.authorize(ask("next"))).reason == "next"
            assert servicer.streams == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["abort", "end", "error"])
def test_a_stream_cut_mid_call_fails_every_call_in_flight_then_reconnects(tmp_path: Path, how: str) -> None:
    async def script(wire: Wire, n: int) -> None:
        if n == 1:
            await wire.read()
            await wire.read()
            if how == "abort":
                await wire.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            if how == "error":
                raise RuntimeError("the host broke it")
            return  # "end": a clean end of stream with two calls unanswered
        await serve_forever(wire, n)

    async def scenario() -> None:
        async with fake(tmp_path, script) as (client, servicer):
            got = await asyncio.gather(client.authorize(ask("a")), client.authorize(ask("b")), return_exceptions=True)
            assert all(isinstance(g, EnclaveUnavailable) for g in got), got
            assert all("the channel broke" in str(g) for g in got)
            assert (await client.authorize(ask("c"))).reason == "c"
            assert servicer.streams == 2

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("status", "raised", "code"),
    [
        (grpc.StatusCode.UNAVAILABLE, EnclaveUnavailable, None),
        (grpc.StatusCode.DEADLINE_EXCEEDED, EnclaveUnavailable, None),
        (grpc.StatusCode.FAILED_PRECONDITION, EnclaveRefused, grpc.StatusCode.FAILED_PRECONDITION),
        (grpc.StatusCode.UNAUTHENTICATED, EnclaveRefused, grpc.StatusCode.UNAUTHENTICATED),
        (999, EnclaveRefused, grpc.StatusCode.UNKNOWN),  # no such status: still a refusal, typed UNKNOWN
    ],
)
def test_an_error_answer_is_typed_by_its_status_code(
    tmp_path: Path, status: grpc.StatusCode | int, raised: type[Exception], code: grpc.StatusCode | None
) -> None:
    number = status if isinstance(status, int) else status.value[0]

    async def script(wire: Wire, n: int) -> None:
        req = await wire.read()
        # The message says something else entirely: only the code counts.
        await wire.write(pb.ChannelResponse(id=req.id, error=pb.ChannelError(status=number, message="OK allow")))
        await serve_forever(wire, n)

    async def scenario() -> None:
        async with fake(tmp_path, script) as (client, servicer):
            with pytest.raises(raised) as exc:
                await client.authorize(ask("a"))
            if code is not None:
                assert isinstance(exc.value, EnclaveRefused) and exc.value.code == code
            assert (await client.authorize(ask("b"))).reason == "b"
            assert servicer.streams == 1  # an error answer is not a broken stream

    asyncio.run(scenario())


def test_an_oversized_request_is_refused_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with fake(tmp_path, serve_forever) as (client, servicer):
            other = asyncio.ensure_future(client.authorize(ask("small")))
            with pytest.raises(EnclaveRefused) as refused:
                await client.authorize(ask("huge", b"[" + b"1," * (MAX_MESSAGE_BYTES // 2) + b"1]"))
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await other).reason == "small"
            assert servicer.streams == 1

    asyncio.run(scenario())


def test_a_cancelled_caller_leaves_the_stream_and_the_others_alone(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def script(wire: Wire, n: int) -> None:
        first = await wire.read()
        await release.wait()
        await wire.write(answer(first))  # late: its caller is gone
        await serve_forever(wire, n)

    async def scenario() -> None:
        async with fake(tmp_path, script) as (client, servicer):
            gone = asyncio.ensure_future(client.authorize(ask("gone")))
            await asyncio.sleep(0.2)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            release.set()
            assert (await client.authorize(ask("next"))).reason == "next"
            assert client._stream is not None and client._stream.stray == 0
            assert servicer.streams == 1

    asyncio.run(scenario())


# --- The real service over a test world's core, through a proxy the host controls -------------


class HoldingProxy:
    """An AF_UNIX proxy in front of the enclave's socket. `hold_answers` keeps the enclave's bytes
    from the relay (the host delays them); `cut()` closes every connection (the host drops it)."""

    def __init__(self, listen: Path, target: Path) -> None:
        self.target = target
        self.hold_answers = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(listen))
        self._sock.listen(16)
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(str(self.target))
            self._conns += [client, upstream]
            for src, dst, held in ((client, upstream, None), (upstream, client, self.hold_answers)):
                t = threading.Thread(target=self._pump, args=(src, dst, held), daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, held: threading.Event | None) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if held is None or not held.is_set():
                    dst.sendall(data)
                # held: swallowed; the connection is useless from here and will be cut

    def cut(self) -> None:
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self._conns.clear()

    def close(self) -> None:
        self.cut()
        # close() alone does not wake a thread blocked in accept(); shutdown() does (EINVAL), so
        # the joins below end at once. They used to wait out their 5 s timeouts, which under
        # libfaketime (CI's second pass) never ended: the timed wait is measured on the faked clock.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for t in self._threads:
            t.join(5)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


@pytest.fixture
def enclave_sock(world: World, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "e.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    server, _ = serve(world.core, f"unix:{path}", workers=8)
    yield path
    server.stop(0).wait(5)


def outcomes(w: World, decision: int) -> int:
    return sum(
        1
        for e in w.core.sync(2).entries
        if isinstance(o := parse_entry(e), OutcomeEntry) and o.decision_index == decision
    )


@pytest.mark.parametrize("reached", [True, False])
def test_an_outcome_cut_mid_call_is_recorded_once_or_reported_missing(
    world: World, enclave_sock: Path, tmp_path: Path, reached: bool
) -> None:
    """The host cuts the stream while an outcome is in flight, after (`reached`) or before it got
    to the enclave. The relay hears EnclaveUnavailable either way; asking again on a new stream
    records it if it was missing and is refused if it was recorded: one outcome, never two."""
    proxy = HoldingProxy(tmp_path / "p.sock", enclave_sock)
    token = world.token("refund-bot", ["refund-agent"])
    args = json.dumps({"customer_id": "cus_1001"}).encode()

    async def scenario() -> None:
        async with EnclaveClient(f"unix:{tmp_path / 'p.sock'}", tmp_path / "run") as client:
            v = await client.authorize(
                pb.AuthorizeRequest(token=token, server="refunds", tool="customer_lookup", arguments_json=args)
            )
            assert v.decision == pb.ALLOW
            outcome = pb.OutcomeRequest(decision_index=v.log_index, result_sha256=b"\x02" * 32)
            if reached:
                proxy.hold_answers.set()
                pending = asyncio.ensure_future(client.record_outcome(outcome))
                for _ in range(200):  # until the enclave has recorded it (its answer is held)
                    if outcomes(world, v.log_index):
                        break
                    await asyncio.sleep(0.02)
                assert outcomes(world, v.log_index) == 1
                proxy.cut()
                with pytest.raises(EnclaveUnavailable, match="the channel broke"):
                    await pending
            else:
                proxy.cut()
                proxy.hold_answers.clear()
                with contextlib.suppress(EnclaveUnavailable):  # the cut may be seen here, or on redial
                    await client.record_outcome(outcome)
                assert outcomes(world, v.log_index) <= 1
            proxy.hold_answers.clear()
            for _ in range(100):  # a new stream, once gRPC has redialled
                try:
                    await client.record_outcome(outcome)
                except EnclaveUnavailable:
                    await asyncio.sleep(0.1)
                    continue
                except EnclaveRefused as exc:  # it was recorded: a second one is refused
                    assert exc.code == grpc.StatusCode.PERMISSION_DENIED
                break
            assert outcomes(world, v.log_index) == 1

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()


@pytest.mark.parametrize("mode", ["direct", "splice", "copy"])
def test_every_bridge_mode_carries_the_stream(
    world: World, enclave_sock: Path, tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with EnclaveClient(f"unix:{enclave_sock}", tmp_path / "run", bridge=mode) as client:
            assert (client.bridge is None) == (mode == "direct")
            token = world.token("refund-bot", ["refund-agent"])
            got = await asyncio.gather(
                *(
                    client.authorize(
                        pb.AuthorizeRequest(
                            token=token, server="refunds", tool="customer_lookup", arguments_json=b'{"customer_id":"c"}'
                        )
                    )
                    for _ in range(20)
                )
            )
            assert all(v.decision == pb.ALLOW for v in got)
            assert len({v.log_index for v in got}) == 20
            assert (await client.health()).ready

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert f"bridge: {mode} (" in caplog.text


# --- The enclave process, both ends bridged as in production (AF_UNIX standing in for vsock) ---


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_the_vsock_path_carries_the_stream_and_it_reconnects_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The enclave process with its bridge (`--bridge` via CLOISTER_BRIDGE) and the relay's client
    with its own, as on Nitro; kill the enclave mid-stream, start a new one on the same endpoint."""
    import signal

    from cloister.dev.state import ensure_state
    from tests.e2e.procs import start_enclave, stop, unseal
    from tests.world import decision_bundle

    state = ensure_state(tmp_path / "state", bundle_source=decision_bundle(tmp_path / "bundle"), witnessed=False)
    sock = tmp_path / "enclave.vsock"
    monkeypatch.setenv("CLOISTER_BRIDGE", mode)
    proc, ready = start_enclave(state.root, f"unix:{sock}", log=tmp_path / "enclave.log")
    assert ready["bridge"] == mode

    async def scenario() -> None:
        nonlocal proc
        async with EnclaveClient(f"unix:{sock}", tmp_path / "run") as client:
            assert client.bridge is not None and client.bridge.mode == mode
            health = await client.health()
            await unseal(client, state.root, health.origin, first_start=True)
            await client.start_log(None)
            await client.load_policy(state.signed_bundle.read_bytes(), 1)
            token = state.mint_token("refund-bot", ["refund-agent"])
            req = pb.AuthorizeRequest(
                token=token, server="refunds", tool="customer_lookup", arguments_json=b'{"customer_id":"c"}'
            )
            got = await asyncio.gather(*(client.authorize(req) for _ in range(10)))
            assert all(v.decision == pb.ALLOW for v in got)
            o = await client.record_outcome(pb.OutcomeRequest(decision_index=got[0].log_index))
            assert o.log_index > max(v.log_index for v in got)
            stream = client._stream
            stop(proc, signal.SIGKILL)
            with pytest.raises(EnclaveUnavailable):
                await asyncio.wait_for(client.authorize(req), 10)
            proc, _ = start_enclave(state.root, f"unix:{sock}", log=tmp_path / "enclave.log")
            # The new enclave has no log yet: its typed UNAVAILABLE, on a new stream, once redialled.
            for _ in range(100):
                with pytest.raises(EnclaveUnavailable) as exc:
                    await client.authorize(req)
                if "not been started" in str(exc.value):
                    break
                await asyncio.sleep(0.1)
            assert "not been started" in str(exc.value)
            assert client._stream is not stream

    try:
        asyncio.run(scenario())
    finally:
        stop(proc)


def test_calls_waiting_together_go_out_in_one_batch(tmp_path: Path) -> None:
    seen: list[int] = []

    async def script(wire: Wire, n: int) -> None:
        with contextlib.suppress(EOFError):
            while True:
                batch = await wire.context.read()
                if batch is grpc.aio.EOF:
                    return
                seen.append(len(batch.requests))
                await wire.write(*(answer(r) for r in batch.requests))

    async def scenario() -> None:
        async with fake(tmp_path, script) as (client, _):
            got = await asyncio.gather(*(client.authorize(ask(f"r{i}")) for i in range(100)))
            assert [v.reason for v in got] == [f"r{i}" for i in range(100)]

    asyncio.run(scenario())
    assert sum(seen) == 100 and max(seen) <= MAX_CHANNEL_BATCH and len(seen) < 100
