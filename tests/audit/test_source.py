"""Reading a log: deadlines, caps, redirects, and how failures are classified."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloister.audit.errors import FetchError, MissingData
from cloister.audit.source import DirSource, HttpSource, SourceSpec, open_source, parse_attestation_reply
from cloister.verify.errors import DecodeError
from tests.audit.clirun import cli
from tests.audit.conftest import trust
from tests.audit.logbuilder import LogServer, TestLog


def _raw_server(respond: object) -> Iterator[str]:
    """A TCP server whose handler `respond(conn)` writes whatever it likes."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            threading.Thread(target=_handle, args=(conn,), daemon=True).start()

    def _handle(conn: socket.socket) -> None:
        try:
            conn.recv(4096)
            respond(conn)  # type: ignore[operator]
        except OSError:
            pass
        finally:
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/log/"
    finally:
        stop.set()
        t.join()
        sock.close()


@pytest.fixture
def trickle() -> Iterator[str]:
    def respond(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            conn.sendall(b"x")
            time.sleep(0.1)

    yield from _raw_server(respond)


@pytest.fixture
def unbounded() -> Iterator[str]:
    def respond(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for _ in range(100):
            conn.sendall(b"\x00" * 4096)

    yield from _raw_server(respond)


@pytest.fixture(params=[b"file:///etc/passwd", b"ftp://127.0.0.1:9/x"])
def redirect_elsewhere(request: pytest.FixtureRequest) -> Iterator[str]:
    def respond(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: " + request.param + b"\r\nContent-Length: 0\r\n\r\n")

    yield from _raw_server(respond)


def test_a_trickling_server_hits_the_whole_request_deadline(trickle: str) -> None:
    source = HttpSource(SourceSpec(trickle, timeout=0.5))
    started = time.monotonic()
    with pytest.raises(FetchError, match="no complete answer within 0.5s"):
        source.read("checkpoint", max_size=1000)
    assert time.monotonic() - started < 2


def test_an_answer_without_a_length_is_capped(unbounded: str) -> None:
    with pytest.raises(DecodeError, match="checkpoint: the answer is more than the cap of 10000 bytes"):
        HttpSource(SourceSpec(unbounded, timeout=5)).read("checkpoint", max_size=10_000)


def test_redirects_away_from_http_are_refused(redirect_elsewhere: str) -> None:
    with pytest.raises(FetchError, match="HTTP 302.*(not allowed|refused)"):
        HttpSource(SourceSpec(redirect_elsewhere, timeout=5)).read("checkpoint", max_size=1000)


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("http://h:1", "http://h:1/log/"),
        ("http://h:1/", "http://h:1/log/"),
        ("https://h/log", "https://h/log/"),
        ("http://h/prefix/log/", "http://h/prefix/log/"),
    ],
)
def test_the_log_prefix(given: str, base: str) -> None:
    assert HttpSource(SourceSpec(given)).base == base


def test_unusable_locations(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only http"):
        open_source(SourceSpec("ftp://h/log"))
    with pytest.raises(ValueError, match="neither an http"):
        open_source(SourceSpec(str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="positive"):
        open_source(SourceSpec("http://h/", timeout=0))


def test_a_directory_source(tmp_path: Path) -> None:
    (tmp_path / "tile").mkdir()
    (tmp_path / "checkpoint").write_bytes(b"x" * 100)
    source = DirSource(SourceSpec(str(tmp_path)))
    assert source.read("checkpoint", max_size=100) == b"x" * 100
    with pytest.raises(DecodeError, match="checkpoint: the file is 100 bytes, more than the cap of 99"):
        source.read("checkpoint", max_size=99)
    with pytest.raises(MissingData, match="tile/0/000: not found"):
        source.read("tile/0/000", max_size=100)
    with pytest.raises(DecodeError, match="is a directory"):
        source.read("tile", max_size=100)
    with pytest.raises(ValueError, match="not a relative log path"):
        source.read("../secret", max_size=100)
    with pytest.raises(FetchError, match="cannot attest"):
        source.attestation(b"n" * 16)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"document": "AA==", "nonce": "zz", "checkpoint": "c"}', "'nonce' is not hex"),
        (b'{"document": "AA==", "nonce": "00", "checkpoint": ""}', "has no 'checkpoint'"),
        (b'{"document": "AA=", "nonce": "00", "checkpoint": "c"}', "not valid base64"),
        (b'{"document": "AA==", "document": "AA==", "nonce": "00", "checkpoint": "c"}', "duplicate member"),
        (b'{"document": NaN}', "NaN is not valid JSON"),
    ],
)
def test_attestation_replies_are_parsed_strictly(body: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        parse_attestation_reply(body)


# --- gzip, and partial tiles that the log has deleted ---------------------------------------


def _gzip_everything(directory: Path):  # type: ignore[no-untyped-def]
    def hook(path: str, query: dict[str, list[str]]) -> tuple[int, bytes, dict[str, str]] | None:
        f = directory / path
        if not path.startswith("tile/") or not f.is_file():
            return None
        return 200, gzip.compress(f.read_bytes()), {"Content-Encoding": "gzip"}

    return hook


def test_gzip_answers_are_decompressed(built: TestLog, server: LogServer, log_copy: Path, tmp_path: Path) -> None:
    server.overrides.append(_gzip_everything(log_copy))
    r = cli("audit", "replay", "--log", server.url, *trust(built, tmp_path), "--no-progress")
    assert r.code == 0, r.err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (gzip.compress(b"\x00" * 10_000_000), "more than the cap of 8192 bytes (after gzip decompression)"),
        (gzip.compress(b"\x00" * 8192)[:-12], "gzip stream is truncated"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 20, "gzip stream is corrupt"),
    ],
)
def test_bad_gzip_is_refused(built: TestLog, server: LogServer, tmp_path: Path, body: bytes, message: str) -> None:
    server.overrides.append(
        lambda path, q: (200, body, {"Content-Encoding": "gzip"}) if path.startswith("tile/0/") else None
    )
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--index", "1")
    assert r.code == 1
    assert message in r.err


def test_deleted_partial_tiles_are_read_from_the_full_ones(tmp_path: Path) -> None:
    log = TestLog(tmp_path / "grow").start()
    log.load_policy()
    log.typical_traffic(2)
    old_note, old_size = log.note, len(log.entries)
    log.typical_traffic(35)
    assert len(log.entries) > 256 > old_size
    log.write()  # only the tiles of the new size: tile/0/000 is full, tile/0/000.p/<old> is gone
    (log.dir / "checkpoint").write_bytes(old_note)
    assert not (log.dir / f"tile/0/000.p/{old_size}").exists()
    r = cli("audit", "replay", "--log", str(log.dir), *trust(log, tmp_path / "s"), "--no-progress", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["tree_size"] == old_size
    # A tampered full tile is still caught, and the message says where the bytes came from.
    bundle = log.dir / "tile/entries/000"
    data = bytearray(bundle.read_bytes())
    data[0] ^= 0xFF  # the first length prefix
    bundle.write_bytes(bytes(data))
    r = cli("audit", "replay", "--log", str(log.dir), *trust(log, tmp_path / "s"), "--no-progress")
    assert r.code == 1
    assert f"tile/entries/000 (read for tile/entries/000.p/{old_size}): entry bundle truncated" in r.err


def test_the_auditor_library_imports_neither_grpc_nor_mcp() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, cloister.audit\n"
        "for m in pkgutil.iter_modules(cloister.audit.__path__): importlib.import_module('cloister.audit.' + m.name)\n"
        "import cloister.cli.audit\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('grpc', 'mcp')\n"
        "             or n.startswith(('cloister.enclave', 'cloister.relay', 'cloister.wire', 'cloister.dev')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    # Registering the command imports nothing of the library.
    code = "import sys, cloister.cli; cloister.cli.build_parser(); assert 'cloister.audit' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.fixture
def short_body() -> Iterator[str]:
    def respond(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8192\r\n\r\n" + b"\x00" * 100)

    yield from _raw_server(respond)


def test_a_connection_closed_early_is_a_fetch_error(short_body: str) -> None:
    with pytest.raises(FetchError, match="the connection closed 8092 bytes before the end"):
        HttpSource(SourceSpec(short_body, timeout=5)).read("tile/0/000", max_size=8192)


def test_a_fifo_in_the_storage_does_not_block(built: TestLog, log_copy: Path, tmp_path: Path) -> None:
    import os

    (log_copy / "tile/0/000").unlink()
    os.mkfifo(log_copy / "tile/0/000")
    r = cli("audit", "replay", "--log", str(log_copy), *trust(built, tmp_path), "--no-progress")
    assert r.code == 1
    assert "tile/0/000: " in r.err and "is not a regular file" in r.err


def test_an_unwritable_state_directory_is_a_usage_error(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("a file, not a directory")
    r = cli("audit", "checkpoint", "--log", server.url, "--trust-root", str(built.root_pem), "--state", str(state))
    assert r.code == 2
    assert "Traceback" not in r.err
