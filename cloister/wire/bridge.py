"""The vsock bridge: copies bytes between a listening socket and a target socket.

PyPI's grpcio wheels are built without vsock support, so gRPC always runs on a UNIX socket
and this bridge carries its bytes over `AF_VSOCK` (production) or `AF_UNIX`/TCP (CI and
laptops). The enclave runs `listen=vsock:PORT -> target=unix:<grpc socket>`; the parent runs
the mirror image `listen=unix:<local socket> -> target=vsock:CID:PORT`. Only the socket family
differs between CI and production.

Where bridging would be the identity (the far end is AF_UNIX or TCP, which gRPC serves and dials
itself: mock mode, CI, laptops) there is no bridge at all (`direct`): the parent dials the enclave's
socket and the enclave's gRPC server listens on it. Where it is needed (vsock), each direction is
moved by `os.splice` through a pipe (`splice`: the kernel copies, the GIL is released throughout),
or by the recv/sendall loop (`copy`) where splice is missing or refused. `choose_mode` picks and
the choice is logged (decision 0022).

This is the enclave's only network code. It does not parse what it carries: everything above
it (gRPC, then our own parsers) treats the bytes as untrusted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from cloister.verify.errors import DecodeError

log = logging.getLogger(__name__)

# Nitro facts: the parent is CID 3; port 9000 on the parent is nitro-cli's heartbeat.
PARENT_CID = 3
RESERVED_VSOCK_PORTS = frozenset({9000})
VMADDR_CID_ANY = 0xFFFFFFFF
MAX_CONNECTIONS = 64
_CHUNK = 256 * 1024

BridgeMode = Literal["direct", "splice", "copy"]
MODES: tuple[str, ...] = ("auto", "direct", "splice", "copy")
# splice(2) refuses a socket whose family cannot feed a pipe with one of these: copy instead.
_SPLICE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


@dataclass(frozen=True)
class Endpoint:
    """A socket address: `vsock:[CID:]PORT`, `unix:PATH` or `tcp:HOST:PORT`."""

    kind: Literal["vsock", "unix", "tcp"]
    host: str = ""
    port: int = 0
    cid: int = VMADDR_CID_ANY
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise DecodeError(f"endpoint {text!r}: expected vsock:[CID:]PORT, unix:PATH or tcp:HOST:PORT")
        if kind == "unix":
            return cls(kind="unix", path=rest)
        if kind == "tcp":
            host, _, port_text = rest.rpartition(":")
            return cls(kind="tcp", host=host.strip("[]") or "127.0.0.1", port=_port(text, port_text))
        if kind == "vsock":
            cid_text, _, port_text = rest.rpartition(":")
            port = _port(text, port_text)
            if port in RESERVED_VSOCK_PORTS:
                raise DecodeError(f"endpoint {text!r}: vsock port {port} is nitro-cli's heartbeat port")
            if not cid_text:
                return cls(kind="vsock", port=port)
            if not (cid_text.isascii() and cid_text.isdigit()) or int(cid_text) > VMADDR_CID_ANY:
                raise DecodeError(f"endpoint {text!r}: vsock CID must be a number in 0..{VMADDR_CID_ANY}")
            return cls(kind="vsock", cid=int(cid_text), port=port)
        raise DecodeError(f"endpoint {text!r}: unknown kind {kind!r} (use vsock, unix or tcp)")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "tcp":
            return f"tcp:{self.host}:{self.port}"
        return f"vsock:{self.cid}:{self.port}" if self.cid != VMADDR_CID_ANY else f"vsock:{self.port}"

    def _family(self) -> int:
        if self.kind == "unix":
            return socket.AF_UNIX
        if self.kind == "tcp":
            return socket.AF_INET6 if ":" in self.host else socket.AF_INET
        return socket.AF_VSOCK  # the only line CI does not run

    def _address(self) -> str | tuple[str, int] | tuple[int, int]:
        if self.kind == "unix":
            return self.path
        if self.kind == "tcp":
            return (self.host, self.port)
        return (self.cid, self.port)

    def listen(self, backlog: int = 64) -> socket.socket:
        sock = socket.socket(self._family(), socket.SOCK_STREAM)
        try:
            if self.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    Path(self.path).unlink()
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self._address())
            if self.kind == "unix":
                Path(self.path).chmod(0o600)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.socket(self._family(), socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self._address())
            sock.settimeout(None)
            if self.kind == "tcp":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return sock


def _port(text: str, port: str) -> int:
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise DecodeError(f"endpoint {text!r}: port must be a number in 1..65535")
    return int(port)


def choose_mode(far: Endpoint, requested: str = "auto") -> BridgeMode:
    """How to carry gRPC to or from `far` (the enclave's endpoint, seen from either side).

    gRPC speaks AF_UNIX and TCP itself, so for those no bridge runs (`direct`); vsock needs one,
    `splice` where the platform has it. A requested mode is honoured when it can work."""
    if requested not in MODES:
        raise DecodeError(f"bridge mode {requested!r}: expected one of {', '.join(MODES)}")
    if requested == "direct" and far.kind == "vsock":
        raise DecodeError(f"bridge mode 'direct' for {far}: gRPC cannot use vsock itself, a bridge must run")
    if requested == "auto":
        requested = "direct" if far.kind != "vsock" else "splice"
    if requested == "splice" and not hasattr(os, "splice"):
        return "copy"
    return cast(BridgeMode, requested)


def set_switch_interval(mode: BridgeMode) -> float:
    """The GIL switch interval for a process that runs a bridge in `mode`: CLOISTER_SWITCH_INTERVAL
    if set; else 0.5 ms under a Python bridge (its pump threads wake on every gRPC frame and would
    otherwise wait out up to 5 ms of a decision or of the event loop for the GIL); else Python's
    default, since no thread of ours then needs to cut in."""
    text = os.environ.get("CLOISTER_SWITCH_INTERVAL")
    if text is not None or mode != "direct":
        sys.setswitchinterval(float(text or "0.0005"))
    return sys.getswitchinterval()


def grpc_address(endpoint: Endpoint) -> str:
    """The endpoint as a gRPC address, for a direct connection (AF_UNIX or TCP only)."""
    if endpoint.kind == "unix":
        return f"unix:{endpoint.path}"
    if endpoint.kind == "tcp":
        return f"[{endpoint.host}]:{endpoint.port}" if ":" in endpoint.host else f"{endpoint.host}:{endpoint.port}"
    raise DecodeError(f"endpoint {endpoint}: gRPC cannot use vsock directly")


class Bridge:
    """Accepts on `listen` and, per connection, dials `target` and moves bytes both ways
    (`splice` through a pipe, or `copy`; the default is splice where the platform has it)."""

    def __init__(
        self,
        listen: Endpoint,
        target: Endpoint,
        *,
        max_connections: int = MAX_CONNECTIONS,
        mode: Literal["splice", "copy"] | None = None,
    ) -> None:
        self.listen_endpoint = listen
        self.target = target
        self.mode: Literal["splice", "copy"] = mode or ("splice" if hasattr(os, "splice") else "copy")
        self._max = max_connections
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()  # every socket not yet closed, so stop() reaches it
        self._drained: set[socket.socket] = set()  # sockets whose pump has seen EOF
        self._pumps: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> Bridge:
        self._sock = self.listen_endpoint.listen()
        if self.listen_endpoint.kind == "tcp" and self.listen_endpoint.port == 0:
            self.listen_endpoint = Endpoint(
                kind="tcp", host=self.listen_endpoint.host, port=self._sock.getsockname()[1]
            )
        self._thread = threading.Thread(target=self._accept_loop, name=f"bridge {self.listen_endpoint}", daemon=True)
        self._thread.start()
        log.info("bridge: %s (%s to %s)", self.mode, self.listen_endpoint, self.target)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            for s in list(self._open):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=2)
        # The accept loop has ended, so no pump starts now; wait for those that run to finish.
        with self._lock:
            pumps = list(self._pumps)
        for t in pumps:
            t.join(timeout=2)
        if self.listen_endpoint.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                Path(self.listen_endpoint.path).unlink()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                too_many = len(self._open) >= 2 * self._max
            if too_many:
                log.warning("bridge %s: refusing connection, %d already open", self.listen_endpoint, self._max)
                client.close()
                continue
            try:
                upstream = self.target.connect()
            except OSError as exc:
                log.warning("bridge %s: cannot reach %s: %s", self.listen_endpoint, self.target, exc)
                client.close()
                continue
            if self.listen_endpoint.kind == "tcp":
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopping.is_set():  # stop() has already shut the open connections down
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
                self._pumps = {t for t in self._pumps if t.is_alive()}
                for src, dst in ((client, upstream), (upstream, client)):
                    pump = threading.Thread(
                        target=self._pump, args=(src, dst), daemon=True, name=f"bridge pump {self.listen_endpoint}"
                    )
                    self._pumps.add(pump)
                    pump.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            if self.mode != "splice" or not _splice(src, dst):
                _copy(src, dst)
        except OSError:
            pass
        finally:
            # Half-close so the peer sees EOF; the other pump closes its side in turn.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                src.shutdown(socket.SHUT_RD)
            with self._lock:
                self._drained.add(src)
                closing = dst in self._drained
                if closing:
                    self._open -= {src, dst}
                    self._drained -= {src, dst}
            if closing:
                src.close()
                dst.close()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """Move bytes from `src` to `dst` through user space until EOF."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if n == 0:
            return
        dst.sendall(view[:n])


def _splice(src: socket.socket, dst: socket.socket) -> bool:
    """Move bytes from `src` to `dst` through a pipe with splice(2) until EOF: the kernel copies,
    and the GIL is released for each call. False, having moved nothing, when the kernel refuses
    to splice these sockets (the caller copies instead)."""
    r, w = os.pipe()
    try:
        src_fd, dst_fd = src.fileno(), dst.fileno()
        moved = False
        while True:
            try:
                n = os.splice(src_fd, w, _CHUNK)
            except OSError as exc:
                if not moved and exc.errno in _SPLICE_UNSUPPORTED:
                    log.warning("bridge: splice refused for %s (%s); copying instead", src.family.name, exc)
                    return False
                raise
            if n == 0:
                return True
            moved = True
            while n:
                n -= os.splice(r, dst_fd, n)
    finally:
        os.close(r)
        os.close(w)
