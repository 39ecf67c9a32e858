"""The witness's HTTP front: standard-library http.server, one thread per connection.

    POST /add-checkpoint               tlog-witness add-checkpoint (submission prefix "")
    GET  /<sha256(origin) hex>/checkpoint   the latest cosigned checkpoint (monitoring prefix "")

Bounds: a body needs a Content-Length no larger than protocol.MAX_BODY (411/413 otherwise, and
the connection is closed unread); a connection idle for `timeout` seconds is dropped; at most
`max_connections` are served at once (more are closed on accept); headers are capped by
http.server (100 lines of 64 kB). Every answer is a status and a short text; an
unexpected error is logged and answered 500 with no detail.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from cloister.witness.protocol import MAX_BODY, TEXT, Response, Witness

__all__ = ["WitnessHTTPServer", "make_server"]

logger = logging.getLogger(__name__)

_CHECKPOINT_PATH = re.compile(r"/([0-9a-f]{64})/checkpoint")
_DIGITS = re.compile(r"[0-9]{1,30}")


class WitnessHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], witness: Witness, *, timeout: float = 10.0, max_connections: int = 64
    ) -> None:
        self.witness = witness
        self.request_timeout = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per connection, at most max_connections of them: beyond that, close at once.
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive (tlog-witness: witnesses SHOULD support it)
    # TCP_NODELAY: the headers and the body go out in two writes; on a kept-alive connection
    # Nagle's algorithm held the body until the relay's delayed ACK, about 40 ms per cosignature.
    disable_nagle_algorithm = True
    error_content_type = TEXT
    error_message_format = "%(code)d %(message)s\n"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(cast(WitnessHTTPServer, self.server).request_timeout)

    @property
    def _witness(self) -> Witness:
        return cast(WitnessHTTPServer, self.server).witness

    def do_POST(self) -> None:
        self._guarded(self._post)

    def do_GET(self) -> None:
        self._guarded(self._get)

    def _guarded(self, handler: Callable[[], None]) -> None:
        try:
            handler()
        except Exception:
            logger.exception("witness: unexpected error on %s %s", self.command, self.path[:200])
            self.close_connection = True
            self._send(Response(500, b"internal error\n"))

    def _post(self) -> None:
        if self.path != "/add-checkpoint":
            self._refuse_unread(404, "no such endpoint (POST /add-checkpoint)")
            return
        body = self._read_body()
        if body is not None:
            self._send(self._witness.add_checkpoint(body))

    def _get(self) -> None:
        m = _CHECKPOINT_PATH.fullmatch(self.path)
        if not m:
            self._send(Response(404, b"no such endpoint (GET /<sha256(origin) hex>/checkpoint)\n"))
            return
        self._send(self._witness.get_checkpoint(m.group(1)))

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding") is not None:
            self._refuse_unread(411, "send the body with a Content-Length, not a Transfer-Encoding")
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            self._refuse_unread(411, "a Content-Length is required")
            return None
        if not _DIGITS.fullmatch(length.strip()):
            self._refuse_unread(400, "Content-Length is not a decimal number")
            return None
        n = int(length)
        if n > MAX_BODY:
            self._refuse_unread(413, f"request body is {n} bytes, more than {MAX_BODY}")
            return None
        body = self.rfile.read(n)
        if len(body) != n:
            self.close_connection = True  # the client went away mid-body
            return None
        return body

    def _refuse_unread(self, status: int, message: str) -> None:
        """Answer without reading the body, and close: the rest of the stream is not a request."""
        self.close_connection = True
        self._send(Response(status, message.encode("utf-8") + b"\n"))

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(response.body)

    def version_string(self) -> str:
        return "cloister-witness"

    def log_message(self, format: str, *args: object) -> None:
        logger.info("%s " + format, self.address_string(), *args)


def make_server(
    witness: Witness, host: str, port: int, *, timeout: float = 10.0, max_connections: int = 64
) -> WitnessHTTPServer:
    """Bind (port 0 picks a free port; see .url); call serve_forever() to serve."""
    return WitnessHTTPServer((host, port), witness, timeout=timeout, max_connections=max_connections)
