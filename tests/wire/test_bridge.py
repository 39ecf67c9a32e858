"""The vsock bridge, run with AF_UNIX on both sides (this machine has no vsock).

A small server in the test plays the gRPC socket behind the bridge. Every socket has a timeout
and every wait is bounded, so a bridge that hangs fails the test instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

from cloister.verify.errors import DecodeError
from cloister.wire.bridge import PARENT_CID, VMADDR_CID_ANY, Bridge, Endpoint, choose_mode, grpc_address

pytestmark = pytest.mark.timeout(10)

TIMEOUT = 5.0

# --- Endpoint.parse ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("vsock:5005", Endpoint(kind="vsock", port=5005)),
        ("vsock:16:5005", Endpoint(kind="vsock", cid=16, port=5005)),
        ("vsock:3:8001", Endpoint(kind="vsock", cid=PARENT_CID, port=8001)),
        ("vsock:4294967295:1", Endpoint(kind="vsock", cid=VMADDR_CID_ANY, port=1)),
        ("vsock:65535", Endpoint(kind="vsock", port=65535)),
        ("unix:/run/cloister/enclave.sock", Endpoint(kind="unix", path="/run/cloister/enclave.sock")),
        ("unix:relative/grpc.sock", Endpoint(kind="unix", path="relative/grpc.sock")),
        ("unix:/a:b", Endpoint(kind="unix", path="/a:b")),
        ("tcp:127.0.0.1:50051", Endpoint(kind="tcp", host="127.0.0.1", port=50051)),
        ("tcp:enclave.internal:1", Endpoint(kind="tcp", host="enclave.internal", port=1)),
        ("tcp:[::1]:8443", Endpoint(kind="tcp", host="::1", port=8443)),
    ],
)
def test_endpoint_parse_accepts(text: str, want: Endpoint) -> None:
    got = Endpoint.parse(text)
    assert got == want
    assert Endpoint.parse(str(got)) == got


def test_endpoint_str_is_the_canonical_form() -> None:
    assert str(Endpoint.parse("vsock:16:5005")) == "vsock:16:5005"
    assert str(Endpoint.parse("vsock:5005")) == "vsock:5005"
    assert str(Endpoint.parse("unix:/x/y.sock")) == "unix:/x/y.sock"
    assert str(Endpoint.parse("tcp:[::1]:8443")) == "tcp:::1:8443"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "vsock",
        "vsock:",
        "unix:",
        "tcp:",
        "udp:127.0.0.1:5000",
        "VSOCK:5000",
        "http://localhost:80",
        "vsock:0",
        "vsock:65536",
        "vsock:-1",
        "vsock:+5",
        "vsock: 5000",
        "vsock:abc",
        "vsock:5000x",
        "vsock:x:5000",
        "vsock:-3:5000",
        "vsock:3:",
        "vsock:1:2:3",
        "vsock:4294967296:5000",
        "tcp:host",
        "tcp:host:",
        "tcp:host:http",
        "tcp:host:0",
        "tcp:host:70000",
        # Unicode digits: "²" and "٥" are str.isdigit() but not a port
        "vsock:²",
        "tcp:host:٥٠٠٠",
        "vsock:٣:5000",
    ],
)
def test_endpoint_parse_refuses_malformed_input_naming_it(text: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(f"endpoint {text!r}")):
        Endpoint.parse(text)


@pytest.mark.parametrize("text", ["vsock:9000", "vsock:3:9000", "vsock:16:9000"])
def test_endpoint_parse_refuses_the_nitro_heartbeat_port(text: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(f"endpoint {text!r}") + ".*9000.*heartbeat"):
        Endpoint.parse(text)


def test_tcp_port_9000_is_not_reserved() -> None:
    assert Endpoint.parse("tcp:127.0.0.1:9000").port == 9000


# --- A server behind the bridge ----------------------------------------------------------------

Handler = Callable[[socket.socket], None]


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then half-close: the peer sees EOF after the last echoed byte."""
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


class Server:
    """An AF_UNIX server running `handler` per connection, in threads it joins on stop()."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.accepted = 0
        self.finished = threading.Semaphore(0)  # released once per connection its handler ended
        self.errors: list[BaseException] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(128)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept, name="test server", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(TIMEOUT)
            t = threading.Thread(target=self._serve, args=(conn,), name="test server conn", daemon=True)
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
                self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError as exc:
            self.errors.append(exc)
        finally:
            conn.close()
            self.finished.release()

    def wait_finished(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.finished.acquire(timeout=TIMEOUT), "a server connection never ended"

    def stop(self) -> None:
        self._stop.set()
        self._accepter.join(TIMEOUT)
        self._sock.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in [self._accepter, *threads]:
            t.join(TIMEOUT)
            assert not t.is_alive()


# The bridge's way of moving bytes in the test at hand: every test with a socket directory runs
# once with splice (the production default) and once with the copy loop (its fallback).
MODE: Literal["splice", "copy"] = "splice"


class Rig:
    def __init__(self, tmp: Path, handler: Handler, **bridge_args: int) -> None:
        self.listen_path = tmp / "l.sock"
        self.server = Server(tmp / "t.sock", handler)
        self.bridge = Bridge(
            Endpoint(kind="unix", path=str(self.listen_path)),
            Endpoint(kind="unix", path=str(self.server.path)),
            mode=MODE,
            **bridge_args,
        ).start()
        assert self.bridge.mode == MODE

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(str(self.listen_path))
        return sock


def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


@pytest.fixture(params=["splice", "copy"])
def sockdir(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Path:
    assert len(str(tmp_path / "l.sock")) < 100, "AF_UNIX paths are limited to 108 bytes"
    monkeypatch.setattr(sys.modules[__name__], "MODE", request.param)
    return tmp_path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def threads_before() -> Iterator[set[threading.Thread]]:
    """The threads alive before the test; afterwards none of the test's may be left, nor any
    socket it opened (the bridge closes both sides of every connection it carried)."""
    before = set(threading.enumerate())
    fds = open_fds()
    yield before
    wait_until(lambda: not new_threads(before), "the test's threads ended")
    wait_until(lambda: open_fds() <= fds, "the test's sockets were closed")


@pytest.fixture
def rig(sockdir: Path, threads_before: set[threading.Thread]) -> Iterator[Rig]:
    r = Rig(sockdir, echo)
    yield r
    r.bridge.stop()
    r.server.stop()


# --- Bytes both ways ---------------------------------------------------------------------------


def test_bytes_are_copied_both_ways(rig: Rig) -> None:
    with rig.connect() as c:
        for message in (b"hello", b"\x00\xff" * 1000, b"x"):
            c.sendall(message)
            got = b""
            while len(got) < len(message):
                got += c.recv(1 << 16)
            assert got == message
        c.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""  # the server's EOF came back through the bridge
    rig.server.wait_finished()
    assert rig.server.accepted == 1 and rig.server.errors == []


def test_half_close_from_the_client_still_carries_the_answer(
    sockdir: Path, threads_before: set[threading.Thread]
) -> None:
    def digest_after_eof(conn: socket.socket) -> None:
        conn.sendall(hashlib.sha256(read_all(conn)).digest())  # only after the client's EOF

    r = Rig(sockdir, digest_after_eof)
    try:
        body = random.Random(1).randbytes(300_000)
        with r.connect() as c:
            c.sendall(body)
            c.shutdown(socket.SHUT_WR)
            assert read_all(c) == hashlib.sha256(body).digest()
    finally:
        r.bridge.stop()
        r.server.stop()


def test_half_close_from_the_server_still_carries_the_request(
    sockdir: Path, threads_before: set[threading.Thread]
) -> None:
    received: list[bytes] = []

    def greet_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        received.append(read_all(conn))

    r = Rig(sockdir, greet_then_listen)
    try:
        with r.connect() as c:
            assert read_all(c) == b"hello"  # EOF from the server...
            c.sendall(b"still talking")  # ...and the other direction stays open
            c.shutdown(socket.SHUT_WR)
            r.server.wait_finished()
        assert received == [b"still talking"]
    finally:
        r.bridge.stop()
        r.server.stop()


def test_large_payloads_arrive_intact(rig: Rig) -> None:
    body = random.Random(2).randbytes(8 << 20)
    with rig.connect() as c:

        def send() -> None:
            c.sendall(body)
            c.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = read_all(c)
        sender.join(TIMEOUT)
        assert not sender.is_alive()
    assert len(got) == len(body) and hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


def test_many_concurrent_connections(rig: Rig) -> None:
    n = 24
    results: dict[int, bytes] = {}
    barrier = threading.Barrier(n, timeout=TIMEOUT)

    def client(k: int) -> None:
        body = random.Random(100 + k).randbytes(100_000 + k)
        with rig.connect() as c:
            barrier.wait()  # all connections are open through the bridge at once
            c.sendall(body)
            c.shutdown(socket.SHUT_WR)
            got = read_all(c)
        results[k] = hashlib.sha256(got).digest() if got == body else b"mismatch"

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert sorted(results) == list(range(n)) and b"mismatch" not in results.values()
    rig.server.wait_finished(n)
    assert rig.server.accepted == n


# --- Peers that go away ------------------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_does_not_hang_the_bridge(
    sockdir: Path, threads_before: set[threading.Thread]
) -> None:
    r = Rig(sockdir, echo)
    try:
        c = r.connect()
        c.sendall(b"a" * 100_000)  # more than it will ever read back
        c.close()
        r.server.wait_finished()  # the server saw the end of its connection
        # The bridge's threads for that connection end, and it keeps serving others.
        wait_until(lambda: len(new_threads(threads_before)) == 2, "only the bridge's and server's accept loops run")
        with r.connect() as c2:
            c2.sendall(b"ping")
            assert c2.recv(4) == b"ping"
    finally:
        r.bridge.stop()
        r.server.stop()


def test_a_server_that_disconnects_mid_stream_does_not_hang_the_bridge(
    sockdir: Path, threads_before: set[threading.Thread]
) -> None:
    def hang_up_after_a_little(conn: socket.socket) -> None:
        conn.recv(1000)
        conn.sendall(b"bye")
        # The handler returns and the server closes the connection with data still unread.

    r = Rig(sockdir, hang_up_after_a_little)
    try:
        with r.connect() as c:
            # Keep writing: the bridge must pass the hang-up on, not leave us blocked (a timeout
            # is an OSError too, so only the errors of a closed connection are expected here).
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(1000):
                    c.sendall(b"b" * 65536)
            got = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := c.recv(1 << 16):
                    got += chunk
            assert b"bye".startswith(got)  # what the server said, then EOF or a reset
        wait_until(lambda: len(new_threads(threads_before)) == 2, "the bridge's pumps for the dead connection ended")
    finally:
        r.bridge.stop()
        r.server.stop()


def test_an_unreachable_target_closes_the_client_and_the_bridge_keeps_going(
    sockdir: Path, threads_before: set[threading.Thread]
) -> None:
    listen = sockdir / "l.sock"
    bridge = Bridge(Endpoint(kind="unix", path=str(listen)), Endpoint(kind="unix", path=str(sockdir / "absent.sock")))
    bridge.start()
    try:
        for _ in range(3):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(TIMEOUT)
                c.connect(str(listen))
                assert c.recv(1) == b""
    finally:
        bridge.stop()


def test_connections_beyond_the_maximum_are_refused(sockdir: Path, threads_before: set[threading.Thread]) -> None:
    r = Rig(sockdir, echo, max_connections=2)
    try:
        first, second = r.connect(), r.connect()
        for c in (first, second):  # both are through the bridge
            c.sendall(b"hi")
            assert c.recv(2) == b"hi"
        with r.connect() as third:
            assert third.recv(1) == b""  # closed by the bridge without reaching the server
        assert r.server.accepted == 2
        first.close()
        second.close()
        r.server.wait_finished(2)
        wait_until(lambda: len(new_threads(threads_before)) == 2, "the closed connections' pumps ended")
        with r.connect() as fourth:
            fourth.sendall(b"ok")
            assert fourth.recv(2) == b"ok"
    finally:
        r.bridge.stop()
        r.server.stop()


# --- stop() ------------------------------------------------------------------------------------


def test_stop_closes_every_connection_and_leaves_no_thread(sockdir: Path) -> None:
    before = set(threading.enumerate())
    fds = open_fds()
    r = Rig(sockdir, echo)
    clients = [r.connect() for _ in range(5)]
    for c in clients:
        c.sendall(b"x")
        assert c.recv(1) == b"x"  # each connection is up, with both pumps running
    r.bridge.stop()
    # Nothing of the bridge runs any more: not its accept loop, not a pump.
    leftover = [t.name for t in new_threads(before) if not t.name.startswith("test server")]
    assert leftover == []
    for c in clients:
        assert c.recv(1) == b""  # the client sees its connection end
        c.close()
    r.server.wait_finished(5)  # and so does the server
    assert not r.listen_path.exists()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late, pytest.raises(OSError):
        late.connect(str(r.listen_path))
    r.server.stop()
    assert new_threads(before) == []
    assert open_fds() == fds


def test_stop_is_quick_with_nothing_connected(sockdir: Path) -> None:
    before = set(threading.enumerate())
    r = Rig(sockdir, echo)
    started = time.monotonic()
    r.bridge.stop()
    assert time.monotonic() - started < 1.0
    assert [t.name for t in new_threads(before) if not t.name.startswith("test server")] == []
    r.server.stop()


def test_stop_also_ends_a_half_closed_connection_whose_client_stopped_reading(sockdir: Path) -> None:
    """Regression: once the client had half-closed, its socket left the bridge's open set, so
    stop() no longer shut it down and the pump writing to it stayed blocked for ever."""
    before = set(threading.enumerate())
    flooding = threading.Event()

    def flood_after_eof(conn: socket.socket) -> None:
        read_all(conn)
        flooding.set()
        conn.sendall(b"z" * (32 << 20))  # far more than the socket buffers hold

    r = Rig(sockdir, flood_after_eof)
    with r.connect() as c:
        c.sendall(b"go")
        c.shutdown(socket.SHUT_WR)  # and never reads again
        assert flooding.wait(TIMEOUT)
        # The client-to-server pump has finished; the other is stuck writing to the client.
        wait_until(
            lambda: [t.name.startswith("bridge pump") for t in new_threads(before)].count(True) == 1,
            "the client's pump ended",
        )
        started = time.monotonic()
        r.bridge.stop()
        assert time.monotonic() - started < 1.0
        assert [t.name for t in new_threads(before) if t.name.startswith("bridge")] == []
    r.server.wait_finished()
    r.server.stop()
    assert [type(e) for e in r.server.errors] in ([BrokenPipeError], [ConnectionResetError])


def frames_of(thread: threading.Thread) -> list[str]:
    """The functions `thread` is in right now, innermost last (to see where it is blocked)."""
    frame = sys._current_frames().get(thread.ident or -1)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names[::-1]


class GatedEndpoint(Endpoint):
    """A target whose connect() waits for the test's go-ahead (a slow vsock peer, say)."""

    dialling = threading.Event()
    go = threading.Event()

    def connect(self, timeout: float = 5.0) -> socket.socket:
        GatedEndpoint.dialling.set()
        assert GatedEndpoint.go.wait(TIMEOUT)
        return super().connect(timeout)


def test_a_connection_accepted_while_stopping_is_closed_not_bridged(sockdir: Path) -> None:
    """Regression: a connection whose target answered after stop() had shut the open ones down
    was still bridged, and its pumps outlived stop()."""
    before = set(threading.enumerate())
    server = Server(sockdir / "t.sock", echo)
    GatedEndpoint.dialling.clear()
    GatedEndpoint.go.clear()
    bridge = Bridge(
        Endpoint(kind="unix", path=str(sockdir / "l.sock")), GatedEndpoint(kind="unix", path=str(server.path))
    ).start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(TIMEOUT)
        c.connect(str(sockdir / "l.sock"))
        assert GatedEndpoint.dialling.wait(TIMEOUT)  # the bridge accepted it and is dialling the target
        stopper = threading.Thread(target=bridge.stop, daemon=True)
        stopper.start()
        # stop() has shut the open connections down and waits for the accept loop: now the
        # target answers.
        wait_until(lambda: "join" in frames_of(stopper), "stop() waits for the accept loop")
        GatedEndpoint.go.set()
        stopper.join(TIMEOUT)
        assert not stopper.is_alive()
        assert c.recv(1) == b""  # the client is closed, not bridged
    server.wait_finished()  # and so is the connection to the target
    assert [t.name for t in new_threads(before) if not t.name.startswith("test server")] == []
    server.stop()


# --- Modes: direct where gRPC can do it itself, splice where a bridge must run -------------------


@pytest.mark.parametrize(
    ("far", "requested", "want"),
    [
        ("unix:/run/e.sock", "auto", "direct"),
        ("tcp:127.0.0.1:5005", "auto", "direct"),
        ("vsock:16:5005", "auto", "splice"),
        ("vsock:5005", "copy", "copy"),
        ("unix:/run/e.sock", "splice", "splice"),
        ("unix:/run/e.sock", "copy", "copy"),
    ],
)
def test_choose_mode(far: str, requested: str, want: str) -> None:
    assert choose_mode(Endpoint.parse(far), requested) == want


def test_direct_is_refused_for_vsock_and_unknown_modes_are_named() -> None:
    with pytest.raises(DecodeError, match="gRPC cannot use vsock itself"):
        choose_mode(Endpoint.parse("vsock:16:5005"), "direct")
    with pytest.raises(DecodeError, match="bridge mode 'zero-copy'"):
        choose_mode(Endpoint.parse("unix:/x"), "zero-copy")
    with pytest.raises(DecodeError, match="vsock"):
        grpc_address(Endpoint.parse("vsock:16:5005"))
    assert grpc_address(Endpoint.parse("tcp:[::1]:8443")) == "[::1]:8443"


def test_splice_falls_back_to_copy_where_the_platform_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "splice")
    assert choose_mode(Endpoint.parse("vsock:16:5005")) == "copy"
    assert choose_mode(Endpoint.parse("unix:/x"), "splice") == "copy"


def send_and_read(c: socket.socket, payload: bytes) -> bytes:
    """Send `payload` then EOF from a thread while reading the echo (neither side may stall)."""

    def send() -> None:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    got = read_all(c)
    t.join(TIMEOUT)
    return got


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux-only")
@pytest.mark.parametrize("sockdir", ["splice"], indirect=True)  # splice mode only
def test_splice_mode_moves_the_bytes_with_splice(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = os.splice

    def counting(*args: int) -> int:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(os, "splice", counting)
    payload = os.urandom(1 << 20)
    with rig.connect() as c:
        assert send_and_read(c, payload) == payload
    assert calls  # through the kernel, not recv/sendall


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux-only")
@pytest.mark.parametrize("sockdir", ["splice"], indirect=True)  # splice mode only
def test_a_socket_that_refuses_splice_is_copied_instead(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """AF_VSOCK on an older kernel may refuse splice(2) (EINVAL): the bridge copies instead."""

    def refuse(*_args: int) -> int:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "splice", refuse)
    payload = os.urandom(300_000)
    with caplog.at_level("WARNING"), rig.connect() as c:
        assert send_and_read(c, payload) == payload
    assert "splice refused" in caplog.text
