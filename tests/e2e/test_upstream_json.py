"""`Upstream.call_json` (decision 0024) against real upstream processes on real sockets.

The reference: the SDK's MCPServer (2026-07-28, JSON replies) and a hand-written server speaking
the 2025-11-25 handshake with a Mcp-Session-Id and SSE replies (tests/e2e/test_upstream_json_peers.py).
call_json must give what `call` + model_dump gives, except where pydantic rewrites the value the
upstream sent (there the wire value is right: it is what the upstream signed); and every hostile
reply must fail as one clear UpstreamError, in bounded time, without breaking the next call.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest

from cloister.dev.state import free_port
from cloister.relay.config import UpstreamConfig
from cloister.relay.upstream_http import HttpPool, Limits
from cloister.relay.upstreams import Upstream, UpstreamError
from tests.e2e.procs import stop

ROOT = Path(__file__).resolve().parents[2]


def _serve(args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.test_upstream_json_peers", *args],
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"{args[0]} upstream did not start: {log.read_text()[-2000:]}")


class Peer:
    def __init__(self, url: str, record: Path, proc: subprocess.Popen[bytes]) -> None:
        self.url, self.record, self.proc = url, record, proc

    def seen(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    tmp = tmp_path_factory.mktemp("hostile")
    port = free_port()
    proc = _serve(["hostile", str(port), str(tmp / "record.jsonl")], port, tmp / "hostile.log")
    yield Peer(f"http://127.0.0.1:{port}/mcp", tmp / "record.jsonl", proc)
    stop(proc)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    tmp = tmp_path_factory.mktemp("reference")
    port = free_port()
    proc = _serve(["sdk", str(port), str(tmp / "record.jsonl")], port, tmp / "sdk.log")
    yield Peer(f"http://127.0.0.1:{port}/mcp", tmp / "record.jsonl", proc)
    stop(proc)


def with_upstream(url: str, scenario: Callable[[Upstream], Awaitable[None]], *, timeout_s: float = 5) -> None:
    async def main() -> None:
        upstream = Upstream(UpstreamConfig(name="up", url=url, timeout_s=timeout_s))
        async with anyio.create_task_group() as tg:
            tg.start_soon(upstream.run)
            await upstream.wait_ready(20)
            assert upstream.state == "up", upstream.last_error
            try:
                await scenario(upstream)
            finally:
                upstream.stop()

    anyio.run(main)


def dumped(result: Any) -> dict[str, Any]:
    value: dict[str, Any] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    return value


# ---- what the reference servers answer ----------------------------------------------------------


def test_reference_server_results_equal_the_sdk_path(reference: Peer) -> None:
    """2026-07-28, JSON replies: the wire value and `call` + model_dump agree for text, structured
    (nulls inside structuredContent kept by both), error results and `_meta`."""

    async def scenario(up: Upstream) -> None:
        for tool, args in [
            ("echo", {"text": 'héllo \u2028 "q"'}),
            ("lookup", {"customer_id": "cus_1"}),
            ("fail", {"why": "no"}),
        ]:
            lean = await up.call_json(tool, args, {"k": "v"})
            sdk = dumped(await up.call(tool, args, {"k": "v"}))
            assert lean == sdk, (tool, lean, sdk)
        structured = await up.call_json("lookup", {"customer_id": "cus_2"}, {})
        assert structured["structuredContent"]["vip"] is None and structured["structuredContent"]["tags"] == ["a", None]
        failed = await up.call_json("fail", {"why": "because"}, {})
        assert failed["isError"] is True and failed["content"][0]["text"].startswith("Error executing tool fail")

    with_upstream(reference.url, scenario)


def test_the_example_refunds_server_gives_the_same_results(tmp_path: Path) -> None:
    """The example bundle's refunds upstream (without grants: only the client side is compared)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloister.dev.examples.refunds", "--port", str(port), "--unsafe-no-grants"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "refunds.log").open("ab"),
        start_new_session=True,
    )

    async def scenario(up: Upstream) -> None:
        calls: list[tuple[str, dict[str, Any]]] = [
            ("customer_lookup", {"customer_id": "cus_1001"}),
            ("customer_lookup", {"customer_id": "nobody"}),
            ("transaction_history", {"customer_id": "cus_1001", "limit": 1}),
        ]
        for tool, args in calls:
            assert await up.call_json(tool, args, {}) == dumped(await up.call(tool, args, {})), tool

    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        with_upstream(f"http://127.0.0.1:{port}/mcp", scenario)
    finally:
        stop(proc)


EVERYTHING = ROOT / "tests/node/node_modules/@modelcontextprotocol/server-everything/dist/index.js"


@pytest.mark.skipif(not EVERYTHING.exists(), reason="npm test peers not installed (scripts/test)")
def test_the_typescript_reference_server_over_a_handshake_session(tmp_path: Path) -> None:
    """server-everything (TypeScript SDK, 2025-11-25, a session id, SSE replies opening with a
    priming event): the same results as `call` but for the defaults pydantic adds (the wire value
    is what a TypeScript upstream would sign), including structured content and a sampling
    request the server sends in the middle of the call, which reaches the relay's sampling hook
    and is answered."""
    port = free_port()
    proc = subprocess.Popen(
        ["node", str(EVERYTHING), "streamableHttp"],
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "everything.log").open("ab"),
        start_new_session=True,
    )
    sampled: list[str] = []

    async def scenario(up: Upstream) -> None:
        class Hooks:
            async def sampling(self, server: str, params: Any) -> types.CreateMessageResult:
                sampled.append(params.messages[0].content.text)
                return types.CreateMessageResult(
                    role="assistant", content=types.TextContent(type="text", text="sampled!"), model="stand-in"
                )

            def changed(self, server: str) -> None:
                pass

        up.hooks = Hooks()  # type: ignore[assignment]
        assert up._client is not None and up._client.protocol_version == "2025-11-25"
        assert up._lean is not None and up._lean.session_id
        calls: list[tuple[str, dict[str, Any]]] = [
            ("echo", {"message": "hi"}),
            ("get-sum", {"a": 1, "b": 2}),
            ("get-structured-content", {"location": "New York"}),
            ("trigger-sampling-request", {"prompt": "say something", "maxTokens": 20}),
        ]
        for tool, args in calls:
            wire = await up.call_json(tool, args, {})
            # The server leaves out isError (and, being 2025-era, resultType); pydantic adds both.
            assert "isError" not in wire and "resultType" not in wire, wire
            sdk = dumped(await up.call(tool, args, {}))
            assert sdk == {**wire, "isError": False, "resultType": "complete"}, tool
        lean = await up.call_json("trigger-sampling-request", {"prompt": "once more", "maxTokens": 5}, {})
        assert "sampled!" in json.dumps(lean)

    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        with_upstream(f"http://127.0.0.1:{port}/mcp", scenario)
    finally:
        stop(proc)
    assert [text.rsplit(": ", 1)[-1] for text in sampled] == ["say something", "say something", "once more"]


def test_input_rounds_go_through_the_session_callbacks(reference: Peer) -> None:
    """2026-07-28: a tool that needs input answers `input_required`; the SDK's driver asks the
    relay's elicitation hook, and the retry (a lean POST again) gives the wire result."""
    asked: list[str] = []

    async def scenario(up: Upstream) -> None:
        class Hooks:
            async def elicitation(self, server: str, params: Any) -> types.ElicitResult:
                asked.append(params.message)
                return types.ElicitResult(action="accept", content={"word": "yes"})

            def changed(self, server: str) -> None:
                pass

        up.hooks = Hooks()  # type: ignore[assignment]
        lean = await up.call_json("confirm", {"thing": "refund"}, {})
        assert lean == dumped(await up.call("confirm", {"thing": "refund"}, {}))
        assert lean["content"][0]["text"] == "refund:yes"

    with_upstream(reference.url, scenario)
    assert asked == ["Say a word", "Say a word"]


def test_lean_requests_carry_what_the_sdk_sends(reference: Peer, hostile: Peer) -> None:
    """Same headers (protocol version, method, name, session id, user agent) and the same `_meta`
    envelope as the SDK's own tools/call on the same session, as the upstream receives them, for
    a 2026-07-28 and a handshake-era upstream. Only accept-encoding differs: the relay asks for
    no compression (and refuses it)."""
    for peer, tool in ((reference, "echo"), (hostile, "ok")):

        async def scenario(up: Upstream, tool: str = tool) -> None:
            await up.call(tool, {"text": "a"}, {"k": 1})
            await up.call_json(tool, {"text": "a"}, {"k": 1})

        before = len(peer.seen())
        with_upstream(peer.url, scenario)
        calls = [r for r in peer.seen()[before:] if r.get("message", {}).get("method") == "tools/call"]
        assert len(calls) == 2, calls
        (sdk, lean) = calls
        ignore = {"content-length", "accept-encoding"}
        assert "accept-encoding" not in lean["headers"]
        assert {k: v for k, v in sdk["headers"].items() if k not in ignore} == {
            k: v for k, v in lean["headers"].items() if k not in ignore
        }
        assert sdk["message"]["params"] == lean["message"]["params"]
        assert isinstance(sdk["message"]["id"], int) and isinstance(lean["message"]["id"], str)  # never the SDK's


def test_handshake_session_sse_results_and_wire_fields(hostile: Peer) -> None:
    """2025-11-25 with a session id, SSE replies with a comment, an event id and a progress
    notification before the response; and a result pydantic would rewrite: call_json keeps the
    wire value (the one an upstream signs), call + model_dump adds defaults and drops nulls."""

    async def scenario(up: Upstream) -> None:
        assert await up.call_json("ok", {}, {}) == {"content": [{"type": "text", "text": "ok"}], "isError": False}
        assert await up.call_json("ok_sse", {}, {}) == {
            "content": [{"type": "text", "text": "ok_sse"}],
            "isError": False,
        }
        wire = await up.call_json("raw_fields", {}, {})
        assert wire == {"content": [{"type": "text", "text": "x", "annotations": None}], "vendor": {"k": None}}
        sdk = dumped(await up.call("raw_fields", {}, {}))
        assert sdk != wire and sdk["isError"] is False and "annotations" not in sdk["content"][0]

    with_upstream(hostile.url, scenario)
    calls = [r for r in hostile.seen() if r["kind"] == "call"]
    assert calls and all(r["headers"].get("mcp-session-id") == "hostile-session-1" for r in calls)


def test_interleaved_messages_reach_the_session_handlers(hostile: Peer) -> None:
    """A log notification in the SSE reply reaches the relay's logging hook; a server request
    (ping) in it is answered on the session, and the call then completes."""
    logged: list[Any] = []

    async def scenario(up: Upstream) -> None:
        class Hooks:
            async def log_message(self, server: str, params: Any) -> None:
                logged.append((server, params.level, params.data))

            def changed(self, server: str) -> None:
                pass

        up.hooks = Hooks()  # type: ignore[assignment]
        assert (await up.call_json("logs", {}, {}))["content"][0]["text"] == "logs"
        answer = json.loads((await up.call_json("asks_ping", {}, {}))["content"][0]["text"])
        assert answer == {"jsonrpc": "2.0", "id": "ping-1", "result": {}}

    with_upstream(hostile.url, scenario)
    assert logged == [("up", "warning", "careful")]
    answers = [r for r in hostile.seen() if r["kind"] == "answer"]
    assert answers and answers[-1]["session"] == "hostile-session-1"


# ---- errors ------------------------------------------------------------------------------------


def test_errors_are_those_of_call(hostile: Peer) -> None:
    async def scenario(up: Upstream) -> None:
        for tool in ("http_error", "status_500", "status_404"):
            with pytest.raises(UpstreamError) as lean:
                await up.call_json(tool, {}, {})
            with pytest.raises(UpstreamError) as sdk:
                await up.call(tool, {}, {})
            assert (lean.value.kind, lean.value.code, lean.value.data, str(lean.value)) == (
                sdk.value.kind,
                sdk.value.code,
                sdk.value.data,
                str(sdk.value),
            ), tool
        assert up.state == "up" and not up._broken.is_set()

    with_upstream(hostile.url, scenario)


HOSTILE = [
    ("big", "error", "bytes"),
    ("endless", "error", "bytes"),
    ("endless_events", "error", "events"),
    ("malformed", "error", "not valid JSON"),
    ("wrong_id", "error", "answers request id 'somebody-else'"),
    ("deep", "error", "nests deeper"),
    ("not_object", "error", "not an object"),
    ("never_answers", "timeout", "did not answer within 2s"),
    ("ends_early", "unavailable", "closed the connection"),
]


@pytest.mark.parametrize(("tool", "kind", "says"), HOSTILE)
def test_hostile_replies_fail_cleanly_in_bounded_time(hostile: Peer, tool: str, kind: str, says: str) -> None:
    async def scenario(up: Upstream) -> None:
        up.limits = Limits(max_bytes=2 << 20, max_events=100)
        started = time.monotonic()
        with pytest.raises(UpstreamError) as failure:
            await up.call_json(tool, {}, {})
        assert time.monotonic() - started < 4
        assert failure.value.kind == kind and says in str(failure.value), str(failure.value)
        if kind != "unavailable":  # the session still works for the next call
            assert await up.call_json("ok", {}, {}) == {"content": [{"type": "text", "text": "ok"}], "isError": False}

    with_upstream(hostile.url, scenario, timeout_s=2)


def test_long_integers_keep_their_digits(hostile: Peer) -> None:
    """orjson reads integers past 64 bits as floats; the value (and so its hash) must not change."""

    async def scenario(up: Upstream) -> None:
        value = await up.call_json("long_int", {}, {})
        assert value["n"] == 2**70 and isinstance(value["n"], int) and value["f"] == 1.5

    with_upstream(hostile.url, scenario)


def test_a_dead_upstream_is_unavailable_and_reconnects(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "sdk.log"
    proc = _serve(["sdk", str(port)], port, log)

    async def scenario(up: Upstream) -> None:
        assert (await up.call_json("echo", {"text": "a"}, {}))["content"][0]["text"] == "a"
        stop(proc)
        with pytest.raises(UpstreamError) as failure:
            await up.call_json("echo", {"text": "a"}, {})
        assert failure.value.kind == "unavailable"
        assert up._broken.is_set()  # run() drops the session and reconnects with backoff

    try:
        with_upstream(f"http://127.0.0.1:{port}/mcp", scenario)
    finally:
        stop(proc)


# ---- cancellation --------------------------------------------------------------------------------


def test_cancelled_call_tells_a_handshake_era_upstream(hostile: Peer) -> None:
    """2025-11-25: the abandoned request is named in notifications/cancelled, on the session."""

    async def scenario(up: Upstream) -> None:
        with anyio.move_on_after(0.5):
            await up.call_json("slow", {}, {})
        await anyio.sleep(0.5)

    before = len(hostile.seen())
    with_upstream(hostile.url, scenario)
    seen = hostile.seen()[before:]
    call = next(r for r in seen if r["kind"] == "call" and r["message"]["params"]["name"] == "slow")
    cancels = [r for r in seen if r["kind"] == "notification" and r["message"]["method"] == "notifications/cancelled"]
    assert [c["message"]["params"]["requestId"] for c in cancels] == [call["message"]["id"]]
    assert cancels[0]["session"] == "hostile-session-1"


def test_cancelled_call_stops_a_2026_upstream(tmp_path: Path) -> None:
    """2026-07-28: closing the request's stream is the cancellation; the tool sees it."""
    port = free_port()
    record = tmp_path / "sleep.txt"
    proc = _serve(["sdk", str(port), str(record)], port, tmp_path / "sdk.log")

    async def scenario(up: Upstream) -> None:
        started = time.monotonic()
        with pytest.raises(UpstreamError) as failure:
            await up.call_json("sleep", {"seconds": 30}, {})
        assert failure.value.kind == "timeout" and time.monotonic() - started < 3
        for _ in range(50):
            if "\ncancelled" in record.read_text():
                break
            await anyio.sleep(0.1)

    try:
        with_upstream(f"http://127.0.0.1:{port}/mcp", scenario, timeout_s=1)
    finally:
        stop(proc)
    assert [line for line in record.read_text().splitlines() if not line.startswith("{")] == ["start", "cancelled"]


# ---- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """The HTTPS test server (tests/e2e/tls_server.py) with a certificate from a private CA."""
    from tests.e2e.test_tls_identity import make_ca, server_cert

    tmp = tmp_path_factory.mktemp("tls")
    server_cert(tmp, "secure", make_ca(tmp))
    (tmp / "ca.pem").rename(tmp / "right-ca.pem")
    make_ca(tmp)  # another CA, which did not sign the server's certificate
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests/e2e/tls_server.py"),
            str(port),
            str(tmp / "secure.pem"),
            str(tmp / "secure.key"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "tls.log").open("ab"),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield port, tmp
    finally:
        stop(proc)


def test_tls_upstream_with_a_private_ca(tls_peer: tuple[int, Path]) -> None:
    """The pool verifies with the SSLContext the SDK's client verifies with (the configured CA)."""
    port, tmp = tls_peer

    async def main() -> None:
        config = UpstreamConfig(name="secure", url=f"https://127.0.0.1:{port}/mcp", ca_file=tmp / "right-ca.pem")
        up = Upstream(config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(up.run)
            await up.wait_ready(20)
            assert up.state == "up", up.last_error
            assert up._lean is not None and up._lean.pool.tls is not None
            lean = await up.call_json("charge", {"amount": 5}, {})
            assert lean == dumped(await up.call("charge", {"amount": 5}, {}))
            assert lean["content"][0]["text"] == "charged 5"
            up.stop()

    anyio.run(main)


@pytest.mark.parametrize("case", ["other CA", "wrong host name"])
def test_the_pool_refuses_a_certificate_the_session_would(tls_peer: tuple[int, Path], case: str) -> None:
    port, tmp = tls_peer
    ca = tmp / ("ca.pem" if case == "other CA" else "right-ca.pem")
    host = "127.0.0.1" if case == "other CA" else "localhost"  # the certificate names 127.0.0.1 only
    pool = HttpPool(f"https://{host}:{port}/mcp", ssl.create_default_context(cafile=str(ca)), {})

    async def main() -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            async with pool.post(b"{}", {"content-type": "application/json"}):
                pass
        pool.close()

    anyio.run(main)


def test_a_stdio_upstream_delegates_to_call() -> None:
    """No HTTP session to post into: call_json is `call` + model_dump, failures included."""

    async def main() -> None:
        command = (sys.executable, str(ROOT / "tests/e2e/slow_server.py"))
        up = Upstream(UpstreamConfig(name="slow", command=command, cwd=ROOT, timeout_s=2))
        async with anyio.create_task_group() as tg:
            tg.start_soon(up.run)
            await up.wait_ready(20)
            assert up.state == "up" and up._lean is None, up.last_error
            assert await up.call_json("echo", {"text": "hi"}, {}) == dumped(await up.call("echo", {"text": "hi"}, {}))
            with pytest.raises(UpstreamError) as failure:
                await up.call_json("sleep", {"seconds": 5}, {})
            assert failure.value.kind == "timeout"
            up.stop()

    anyio.run(main)
