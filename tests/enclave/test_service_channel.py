"""The enclave's `Channel` stream (decision 0022), served by the real gRPC server over a test world's
core, driven by raw gRPC stubs (as a hostile host would) and by the relay's client.

What the host controls on the stream is capped: ids must rise (a reused id ends the stream before
anything is decided for it), the number of streams, the message size; a request the enclave
cannot read is answered with a typed error, and a stream and its unary RPC answer alike.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cloister.enclave import service
from cloister.enclave.service import serve
from cloister.relay.enclave_client import EnclaveClient, EnclaveRefused
from cloister.verify.entries import DecisionEntry, OutcomeEntry, parse_entry
from cloister.wire import enclave_pb2 as pb
from cloister.wire import enclave_pb2_grpc as pb_grpc
from cloister.wire.contract import MAX_CHANNEL_BATCH, MAX_MESSAGE_BYTES
from tests.world import World, make_world

pytestmark = pytest.mark.timeout(60)

ARGS = json.dumps({"customer_id": "cus_1001"}).encode()


@pytest.fixture
def w(tmp_path: Path) -> World:
    return make_world(tmp_path)


@pytest.fixture
def sock(w: World, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "e.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    server, _ = serve(w.core, f"unix:{path}", workers=8)
    yield path
    server.stop(0).wait(5)


def entries(w: World) -> list[object]:
    """Everything the enclave sequenced after the world's key and policy entries, parsed."""
    return [parse_entry(e) for e in w.core.sync(2).entries]


def authorize(w: World, request_id: str = "t", tool: str = "customer_lookup") -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(
        token=w.token("refund-bot", ["refund-agent"]),
        server="refunds",
        tool=tool,
        arguments_json=ARGS,
        request_id=request_id,
    )


Message = pb.ChannelRequest | list[pb.ChannelRequest]


def batches(messages: list[Message]) -> Iterator[pb.ChannelRequests]:
    for m in messages:
        yield pb.ChannelRequests(requests=m if isinstance(m, list) else [m])


def raw_stream(path: Path, messages: list[Message]) -> tuple[list[pb.ChannelResponse], grpc.RpcError | None]:
    """Send `messages` (each one call, or a batch) on one Channel stream; the answers that came
    back, one by one, and how the stream ended."""
    with grpc.insecure_channel(f"unix:{path}") as channel:
        stub = pb_grpc.EnclaveStub(channel)  # type: ignore[no-untyped-call]
        got: list[pb.ChannelResponse] = []
        try:
            for resp in stub.Channel(batches(messages), timeout=20):
                got.extend(resp.responses)
        except grpc.RpcError as exc:
            return got, exc
        return got, None


def test_the_stream_and_the_unary_rpc_answer_alike(w: World, sock: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        for stream in (False, True):
            async with EnclaveClient(f"unix:{sock}", tmp_path / "run", stream=stream) as client:
                allowed = await client.authorize(authorize(w, f"allow-{stream}"))
                denied = await client.authorize(authorize(w, f"deny-{stream}", tool="issue_refund"))
                outcome = await client.record_outcome(
                    pb.OutcomeRequest(decision_index=allowed.log_index, result_sha256=b"\x01" * 32)
                )
                visible = await client.filter_tools(
                    w.token("refund-bot", ["refund-agent"]), [("refunds", "customer_lookup"), ("refunds", "nope")]
                )
                assert allowed.decision == pb.ALLOW and allowed.grant and allowed.agent == "refund-bot"
                assert denied.decision == pb.DENY and not denied.grant and denied.denial != pb.DENY_CODE_UNSPECIFIED
                assert outcome.log_index == allowed.log_index + 2 and outcome.log.entries
                assert [(t.server, t.tool) for t in visible.visible] == [("refunds", "customer_lookup")]
                # A refusal crosses the stream as the unary RPC's status code, typed.
                with pytest.raises(EnclaveRefused) as refused:
                    await client.record_outcome(pb.OutcomeRequest(decision_index=allowed.log_index))
                assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
                bad = authorize(w)
                bad.token = "not a token"
                with pytest.raises(EnclaveRefused) as unauthenticated:
                    await client.filter_tools(bad.token, [("refunds", "customer_lookup")])
                assert unauthenticated.value.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT)
                assert (client._stream is not None) == stream  # the hot calls did take the stream

    asyncio.run(scenario())
    got = entries(w)
    decisions = [e for e in got if isinstance(e, DecisionEntry)]
    assert [d.decision for d in decisions] == ["allow", "deny"] * 2
    assert sum(isinstance(e, OutcomeEntry) for e in got) == 2


def test_a_reused_id_ends_the_stream_before_anything_is_decided_for_it(w: World, sock: Path) -> None:
    first = pb.ChannelRequest(id=7, authorize=authorize(w, "first"))
    again = pb.ChannelRequest(id=7, authorize=authorize(w, "again"))
    got, ended = raw_stream(sock, [first, again, pb.ChannelRequest(id=8, authorize=authorize(w, "after"))])
    assert [r.id for r in got] == [7] and got[0].authorize.decision == pb.ALLOW
    assert ended is not None and ended.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "channel id 7 is not above 7" in (ended.details() or "")
    # One decision for id 7, none for the replay nor what followed it.
    assert [e.request_id for e in entries(w) if isinstance(e, DecisionEntry)] == ["first"]


@pytest.mark.parametrize("ids", [[0], [5, 4], [3, 3]])
def test_ids_must_rise_from_one(w: World, sock: Path, ids: list[int]) -> None:
    got, ended = raw_stream(sock, [pb.ChannelRequest(id=i, authorize=authorize(w, str(i))) for i in ids])
    assert ended is not None and ended.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(got) == len(ids) - 1
    assert len([e for e in entries(w) if isinstance(e, DecisionEntry)]) == len(ids) - 1


def test_answers_come_in_order_each_with_its_own_id(w: World, sock: Path) -> None:
    ids = [1, 2, 10, 11, 1000]
    got, ended = raw_stream(sock, [pb.ChannelRequest(id=i, authorize=authorize(w, f"r{i}")) for i in ids])
    assert ended is None
    assert [r.id for r in got] == ids
    decisions = [e for e in entries(w) if isinstance(e, DecisionEntry)]
    assert [d.request_id for d in decisions] == [f"r{i}" for i in ids]
    assert [r.authorize.log_index for r in got] == [2 + i for i in range(len(ids))]


def test_a_request_without_a_call_is_refused_by_id_and_the_stream_goes_on(w: World, sock: Path) -> None:
    got, ended = raw_stream(sock, [pb.ChannelRequest(id=1), pb.ChannelRequest(id=2, authorize=authorize(w))])
    assert ended is None
    assert got[0].id == 1 and got[0].WhichOneof("result") == "error"
    assert got[0].error.status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert got[1].id == 2 and got[1].authorize.decision == pb.ALLOW


def test_unreadable_input_is_answered_with_its_typed_code(w: World, sock: Path) -> None:
    bad_kind = authorize(w)
    bad_kind.kind = 77  # type: ignore[assignment]
    got, ended = raw_stream(
        sock,
        [
            pb.ChannelRequest(id=1, authorize=bad_kind),
            pb.ChannelRequest(id=2, outcome=pb.OutcomeRequest(decision_index=1, result_sha256=b"short")),
            pb.ChannelRequest(id=3, filter_tools=pb.FilterToolsRequest(token="x", candidates=[pb.ToolRef()] * 10_001)),
        ],
    )
    assert ended is None
    assert [(r.id, r.error.status) for r in got] == [(i, grpc.StatusCode.INVALID_ARGUMENT.value[0]) for i in (1, 2, 3)]
    assert not [e for e in entries(w) if isinstance(e, DecisionEntry)]


def test_an_oversized_message_ends_only_its_stream(w: World, sock: Path) -> None:
    huge = authorize(w)
    huge.arguments_json = b'{"x": "' + b"a" * MAX_MESSAGE_BYTES + b'"}'
    with grpc.insecure_channel(
        f"unix:{sock}", options=[("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)]
    ) as channel:
        stub = pb_grpc.EnclaveStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as ended:
            list(stub.Channel(batches([pb.ChannelRequest(id=1, authorize=huge)]), timeout=20))
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    got, ok = raw_stream(sock, [pb.ChannelRequest(id=1, authorize=authorize(w))])
    assert ok is None and got[0].authorize.decision == pb.ALLOW
    assert len([e for e in entries(w) if isinstance(e, DecisionEntry)]) == 1


def test_the_number_of_streams_is_capped_and_unary_calls_go_on(w: World, sock: Path) -> None:
    # serve(workers=8) admits 2 streams (a quarter of the workers, at most MAX_CHANNEL_STREAMS).
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = pb_grpc.EnclaveStub(channel)  # type: ignore[no-untyped-call]
        calls = []
        gates: list[queue.Queue[pb.ChannelRequest | None]] = []

        def requests(q: queue.Queue[pb.ChannelRequest | None]) -> Iterator[pb.ChannelRequests]:
            while (item := q.get(timeout=20)) is not None:
                yield pb.ChannelRequests(requests=[item])

        for n in range(2):
            q: queue.Queue[pb.ChannelRequest | None] = queue.Queue()
            gates.append(q)
            call = stub.Channel(requests(q), timeout=20)
            q.put(pb.ChannelRequest(id=1, authorize=authorize(w, f"held{n}")))
            assert next(call).responses[0].authorize.decision == pb.ALLOW  # the stream is open and admitted
            calls.append(call)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Channel(batches([pb.ChannelRequest(id=1, authorize=authorize(w, "third"))]), timeout=20))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Authorize(authorize(w, "unary"), timeout=20).decision == pb.ALLOW
        for q in gates:
            q.put(None)
        for call in calls:
            assert list(call) == []
        # Closed streams free their places.
        got, ended = raw_stream(sock, [pb.ChannelRequest(id=1, authorize=authorize(w, "later"))])
        assert ended is None and got[0].authorize.decision == pb.ALLOW
    assert [e.request_id for e in entries(w) if isinstance(e, DecisionEntry)] == ["held0", "held1", "unary", "later"]


def test_a_batch_is_answered_in_order_and_checked_whole_before_anything_is_decided(w: World, sock: Path) -> None:
    ok = [pb.ChannelRequest(id=i, authorize=authorize(w, f"b{i}")) for i in (1, 2, 3)]
    reused = [pb.ChannelRequest(id=i, authorize=authorize(w, f"r{i}")) for i in (4, 5, 4)]
    got, ended = raw_stream(sock, [ok, reused])
    assert [r.id for r in got] == [1, 2, 3]
    assert ended is not None and ended.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Ids 4 and 5 came before the reused 4, in the same batch: none of the three was decided.
    assert [e.request_id for e in entries(w) if isinstance(e, DecisionEntry)] == ["b1", "b2", "b3"]


def test_a_batch_over_the_cap_ends_the_stream_undecided(w: World, sock: Path) -> None:
    too_many = [pb.ChannelRequest(id=i + 1, authorize=authorize(w)) for i in range(MAX_CHANNEL_BATCH + 1)]
    got, ended = raw_stream(sock, [too_many])
    assert got == [] and ended is not None and ended.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_CHANNEL_BATCH}" in (ended.details() or "")
    assert not [e for e in entries(w) if isinstance(e, DecisionEntry)]


def test_big_answers_to_a_batch_are_split_across_messages(
    w: World, sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "CHANNEL_ANSWER_BYTES", 1)  # every answer is "big"
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = pb_grpc.EnclaveStub(channel)  # type: ignore[no-untyped-call]
        batch = [pb.ChannelRequest(id=i, authorize=authorize(w, f"s{i}")) for i in (1, 2, 3)]
        messages = list(stub.Channel(batches([batch]), timeout=20))
    assert [[r.id for r in m.responses] for m in messages] == [[1], [2], [3]]


def test_streams_the_relay_abandons_free_their_places(w: World, sock: Path, tmp_path: Path) -> None:
    """The relay cancels its stream (close, a stall): the enclave's count of streams goes down,
    or a few reconnects would lock the relay out (serve(workers=8) admits 2)."""

    async def scenario() -> None:
        for n in range(6):
            for _ in range(100):
                async with EnclaveClient(f"unix:{sock}", tmp_path / "run") as client:
                    try:
                        v = await client.authorize(authorize(w, f"c{n}"))
                    except EnclaveRefused as exc:
                        assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                        await asyncio.sleep(0.05)  # the cancellation is still on its way
                        continue
                    assert v.decision == pb.ALLOW
                    break
            else:
                raise AssertionError(f"stream {n} was never admitted: closed streams kept their places")

    asyncio.run(scenario())
    assert [e.request_id for e in entries(w) if isinstance(e, DecisionEntry)] == [f"c{n}" for n in range(6)]


def test_the_enclave_says_where_it_cannot_listen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cloister.dev.mock_nsm import MockNsm
    from cloister.enclave.__main__ import run
    from cloister.enclave.config import EnclaveConfig
    from cloister.enclave.nsm import Nsm

    w = make_world(tmp_path / "w", start=False)

    def nsm(config: EnclaveConfig) -> tuple[Nsm, dict[int, bytes]]:
        return MockNsm(w.root / "mock-nsm", {}), {}

    before = sys.getswitchinterval()
    try:
        for mode in ("direct", "splice"):
            listen = f"unix:{tmp_path / 'missing' / 'e.sock'}"
            assert run(listen, w.config_path, workers=2, nsm_factory=nsm, mock=True, bridge=mode) == 2
            assert f"cloister enclave: cannot listen on {listen}" in capsys.readouterr().err
        assert run("vsock:5005", w.config_path, workers=2, nsm_factory=nsm, mock=True, bridge="direct") == 2
        assert "bridge mode 'direct' for vsock:5005" in capsys.readouterr().err
    finally:
        sys.setswitchinterval(before)  # run() sets it for the bridge
