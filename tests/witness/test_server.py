"""The witness over a real socket: C2SP tlog-witness add-checkpoint, status by status.

Every checkpoint is signed with the project's own note signer over a real RFC 9162 tree
(tests/witness/harness.py); every cosignature returned is checked with cloister.verify.cosignature.
"""

from __future__ import annotations

import base64
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloister.verify.checkpoint import verify_checkpoint
from cloister.verify.cosignature import CosignaturePolicy, verify_cosignature_line, verify_cosignatures
from cloister.verify.merkle import EMPTY_ROOT
from cloister.verify.note import Ed25519NoteSigner, parse_note
from cloister.witness.protocol import MAX_BODY
from cloister.witness.state import CHECKPOINTS_DIR, Record, WitnessState, origin_hash

from .harness import T0, Clock, Served, TestLog, key, new_state, send

EM = "\N{EM DASH}"


@pytest.fixture
def log() -> TestLog:
    return TestLog("log.test/a", 1)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return new_state(tmp_path)


@pytest.fixture
def served(state_dir: Path, log: TestLog, clock: Clock) -> Iterator[Served]:
    s = Served(state_dir, [log, TestLog("log.test/b", 2)], clock)
    try:
        yield s
    finally:
        s.stop()


def cosigned_at(served: Served, log: TestLog, body: bytes, size: int) -> int:
    """POST, expect 200, check the one cosignature line; return its timestamp."""
    reply = served.post(body)
    assert reply.status == 200, reply.body
    assert reply.body.startswith(EM.encode()) and reply.body.endswith(b"\n") and reply.body.count(b"\n") == 1
    text = parse_note(log.checkpoint(size)).text
    return verify_cosignature_line(reply.body.decode(), text, served.state.cosigner.verifier)


def expect(reply_status: int, served: Served, body: bytes, match: bytes = b"") -> bytes:
    reply = served.post(body)
    assert reply.status == reply_status, reply.body
    assert match in reply.body
    assert b"Traceback" not in reply.body
    return reply.body


# --- 200 ---------------------------------------------------------------------------------------


def test_first_checkpoint_from_size_0_is_cosigned(served: Served, log: TestLog) -> None:
    assert cosigned_at(served, log, log.body(0, 3), 3) == T0
    # A client appends the line to the checkpoint and verifies it with the witness's vkey.
    reply = served.post(log.body(3, 3))
    note = log.checkpoint(3) + reply.body
    policy = CosignaturePolicy.from_vkeys([served.witness.vkey], 1)
    assert verify_cosignatures(note, policy) == {"witness.test/w1": T0}


def test_a_growing_log_is_cosigned_with_consistency_proofs(served: Served, log: TestLog, clock: Clock) -> None:
    assert cosigned_at(served, log, log.body(0, 1), 1) == T0
    for old, new in [(1, 2), (2, 3), (3, 8), (8, 13), (13, 13), (13, 64), (64, 100)]:
        clock.now += 7
        assert cosigned_at(served, log, log.body(old, new), new) == clock.now
        assert served.state.latest(log.origin) == Record(
            log.origin,
            new,
            log.root(new),
            clock.now,
            served.state.latest(log.origin).note,  # type: ignore[union-attr]
        )


def test_empty_checkpoint_is_cosigned_then_grows(served: Served, log: TestLog) -> None:
    assert cosigned_at(served, log, log.body(0, 0), 0) == T0
    assert cosigned_at(served, log, log.body(0, 5), 5) == T0


def test_timestamps_never_go_backwards(served: Served, log: TestLog, clock: Clock) -> None:
    clock.now = T0 + 100
    assert cosigned_at(served, log, log.body(0, 2), 2) == T0 + 100
    clock.now = T0  # the clock steps back: the next cosignature keeps the last time
    assert cosigned_at(served, log, log.body(2, 4), 4) == T0 + 100


def test_logs_are_independent(served: Served, log: TestLog) -> None:
    b = TestLog("log.test/b", 2)
    cosigned_at(served, log, log.body(0, 10), 10)
    assert cosigned_at(served, b, b.body(0, 2), 2) == T0


def test_keep_alive_serves_several_requests_on_one_connection(served: Served, log: TestLog) -> None:
    conn = served.connect()
    try:
        assert send(conn, "POST", "/add-checkpoint", log.body(0, 2)).status == 200
        first = conn.sock
        assert first is not None
        assert send(conn, "POST", "/add-checkpoint", log.body(2, 5)).status == 200
        assert send(conn, "POST", "/add-checkpoint", log.body(2, 5)).status == 409
        assert conn.sock is first
    finally:
        conn.close()


def test_kept_alive_connections_send_without_nagle_delay(
    served: Served, log: TestLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply's headers and body are two writes: with Nagle's algorithm on a kept-alive connection
    the body waited for the client's delayed ACK (about 40 ms per cosignature, seen as +47 ms per call
    with wait_for_witness). Regression: the accepted socket has TCP_NODELAY."""
    from cloister.witness import server as witness_server

    seen: list[int] = []
    setup = witness_server._Handler.setup

    def recording(handler: witness_server._Handler) -> None:
        setup(handler)
        seen.append(handler.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(witness_server._Handler, "setup", recording)
    conn = served.connect()
    try:
        assert send(conn, "POST", "/add-checkpoint", log.body(0, 2)).status == 200
        assert send(conn, "POST", "/add-checkpoint", log.body(2, 5)).status == 200
    finally:
        conn.close()
    assert seen and all(seen), seen


# --- 409 ---------------------------------------------------------------------------------------


def test_stale_old_size_is_409_with_the_witness_size(served: Served, log: TestLog) -> None:
    cosigned_at(served, log, log.body(0, 8), 8)
    for old, new in [(0, 9), (3, 9), (9, 12), (7, 8)]:
        reply = served.post(log.body(old, new))
        assert (reply.status, reply.content_type, reply.body) == (409, "text/x.tlog.size", b"8\n")
    # A client that knows nothing asks with old 0 and learns the size, as the spec suggests.
    assert served.post(log.body(0, 8)).body == b"8\n"


def test_an_older_tree_is_refused(served: Served, log: TestLog) -> None:
    cosigned_at(served, log, log.body(0, 8), 8)
    # Claiming the witness is at 5 and showing tree 5: 409, the witness is at 8.
    assert served.post(log.body(5, 5)).body == b"8\n"
    # Old size 8 (right) with tree 5: the old size is above the checkpoint's: 400.
    expect(400, served, log.body(8, 5, proof=[]), b"above the checkpoint size")
    assert served.state.latest(log.origin).size == 8  # type: ignore[union-attr]


# --- 422 ---------------------------------------------------------------------------------------


def test_bad_consistency_proofs_are_422(served: Served, log: TestLog) -> None:
    cosigned_at(served, log, log.body(0, 5), 5)
    proof = log.proof(5, 11)
    tampered = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
    expect(422, served, log.body(5, 11, proof=tampered), b"consistency proof")
    expect(422, served, log.body(5, 11, proof=proof[:-1]), b"too short")
    expect(422, served, log.body(5, 11, proof=[*proof, proof[0]]), b"too long")
    expect(422, served, log.body(5, 11, proof=[]), b"is empty")
    expect(422, served, log.body(5, 5, proof=proof[:1]), b"must be empty")
    assert cosigned_at(served, log, log.body(5, 11), 11) == T0


def test_proof_from_0_must_be_empty(served: Served, log: TestLog) -> None:
    expect(422, served, log.body(0, 4, proof=log.proof(1, 4)), b"from old size 0 must be empty")


def test_size_0_checkpoint_needs_the_empty_root(served: Served, log: TestLog) -> None:
    expect(422, served, log.body(0, 0, note=log.checkpoint(0, root=log.root(3))), b"a checkpoint of size 0 must have")
    assert log.root(0) == EMPTY_ROOT


def test_a_fork_is_refused(served: Served, log: TestLog) -> None:
    cosigned_at(served, log, log.body(0, 8), 8)
    fork = TestLog(log.origin, 1, prefix=b"forked")  # same origin and key, other entries
    # Same size, other root (tlog-witness: 422).
    expect(422, served, fork.body(8, 8), b"roots differ")
    # The fork grown further, with a proof that is right for the fork: not for what was cosigned.
    expect(422, served, fork.body(8, 12), b"does not match")
    assert served.state.latest(log.origin).root_hash == log.root(8)  # type: ignore[union-attr]


# --- 404, 403 ----------------------------------------------------------------------------------


def test_unknown_origin_is_404(served: Served) -> None:
    stranger = TestLog("log.test/unknown", 3)
    expect(404, served, stranger.body(0, 2), b"unknown log origin")


def test_bad_log_signatures_are_403(served: Served, log: TestLog) -> None:
    impostor = Ed25519NoteSigner(log.origin, key(66))  # the origin's name, another key
    expect(403, served, log.body(0, 2, note=log.checkpoint(2, signers=[impostor])), b"no known key")
    other_log = TestLog("log.test/b", 2)  # a key the witness trusts, but for another origin
    expect(403, served, log.body(0, 2, note=log.checkpoint(2, signers=[other_log.signer])), b"no known key")
    good = log.checkpoint(2)
    sig = parse_note(good).signatures[0].to_line()
    blob = bytearray(base64.b64decode(sig.split(" ")[-1]))
    blob[10] ^= 1
    forged = good.replace(sig.encode(), f"{EM} {log.origin} {base64.b64encode(bytes(blob)).decode()}\n".encode())
    expect(403, served, log.body(0, 2, note=forged), b"does not verify")
    # A bad signature by the trusted key rejects the note even beside a good one.
    expect(403, served, log.body(0, 2, note=good + forged.split(b"\n\n")[1]), b"does not verify")
    assert served.state.latest(log.origin) is None


def test_unknown_signatures_beside_the_log_signature_are_ignored(served: Served, log: TestLog) -> None:
    extra = Ed25519NoteSigner("someone.else/key", key(77))
    assert cosigned_at(served, log, log.body(0, 2, note=log.checkpoint(2, signers=[extra, log.signer])), 2) == T0


def test_several_trusted_keys_for_one_origin(tmp_path: Path, clock: Clock) -> None:
    old_key, new_key = TestLog("log.test/r", 5), TestLog("log.test/r", 6)
    served = Served(new_state(tmp_path), {"log.test/r": (old_key, new_key)}, clock)
    try:
        assert served.post(old_key.body(0, 2)).status == 200
        assert served.post(new_key.body(2, 4)).status == 200
    finally:
        served.stop()


# --- 400, 411, 413 and other malformed requests ------------------------------------------------


def test_malformed_bodies_are_400(served: Served, log: TestLog) -> None:
    note = log.checkpoint(2)
    h = base64.b64encode(log.root(1)) + b"\n"
    bad = {
        b"": b"no empty line",
        note: b"first line",
        b"old 0\n" + note: b"line 1 is not base64",  # no empty line after "old": the note's lines are proof lines
        b"old 01\n\n" + note: b"no leading zeroes",
        b"old -1\n\n" + note: b"first line",
        b"Old 0\n\n" + note: b"first line",
        b"old 0 \n\n" + note: b"first line",
        b"old  0\n\n" + note: b"first line",
        b"old 0\r\n\n" + note: b"first line",
        b"old 18446744073709551616\n\n" + note: b"64 bits",
        b"old 0\nnot base64!\n\n" + note: b"line 1 is not base64",
        b"old 0\n" + base64.b64encode(b"x" * 31) + b"\n\n" + note: b"31 bytes",
        b"old 0\n" + h.rstrip(b"=\n") + b"\n\n" + note: b"not base64",
        b"old 0\n\xff\xfe\n\n" + note: b"not base64",
        b"old 0\n" + h * 64 + b"\n" + note: b"64 consistency proof lines",
        b"old 0\n\nnot a note\n": b"checkpoint:",
        b"old 0\n\n" + note.replace(b"\n2\n", b"\n02\n"): b"checkpoint:",
        b"old 0\n\n" + note.rstrip(b"\n"): b"checkpoint:",
        b"old 0\n\n" + note.replace(b"log.test/a\n", b"log.test/\xffa\n"): b"checkpoint:",
        b"old 0\n\n" + note.split(b"\n\n")[0] + b"\n": b"checkpoint:",
    }
    for body, match in bad.items():
        reply = served.post(body)
        assert (reply.status, reply.content_type) == (400, "text/plain; charset=utf-8"), (body, reply.body)
        assert match in reply.body, (body, reply.body)
    # 63 proof lines are allowed by the format (and then checked as a proof).
    assert served.post(b"old 0\n" + h * 63 + b"\n" + note).status == 422


def test_oversize_bodies_are_refused_unread(served: Served, log: TestLog) -> None:
    head = b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    # The witness answers from the header alone, without waiting for (or reading) the body.
    for length in (MAX_BODY + 1, 10 * MAX_BODY, 10**12):
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
            s.sendall(head % length)
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 413 "), answer
            assert b"Connection: close" in answer
    # Exactly MAX_BODY is read and judged (here: malformed).
    body = b"old 0\n\n" + b"x" * (MAX_BODY - 7)
    assert len(body) == MAX_BODY
    assert served.post(body).status == 400


def raw(served: Served, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_a_body_needs_a_content_length(served: Served) -> None:
    head = b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\n"
    assert raw(served, head + b"Connection: close\r\n\r\n").startswith(b"HTTP/1.1 411 ")
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nold 0\r\n0\r\n\r\n"
    assert raw(served, chunked).startswith(b"HTTP/1.1 411 ")
    assert raw(served, head + b"Content-Length: 1e3\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(served, head + b"Content-Length: -1\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_a_client_that_stops_mid_body_gets_nothing_and_the_witness_goes_on(served: Served, log: TestLog) -> None:
    body = log.body(0, 2)
    request = b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
        s.sendall(request + body[:10])
        s.shutdown(socket.SHUT_WR)
        assert s.recv(4096) == b""
    assert served.state.latest(log.origin) is None
    assert served.post(body).status == 200


def test_connections_beyond_the_cap_are_closed_at_once(state_dir: Path, log: TestLog, clock: Clock) -> None:
    served = Served(state_dir, [log], clock, max_connections=2)
    try:
        idle = [socket.create_connection(("127.0.0.1", served.port), timeout=5) for _ in range(2)]
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as third:
            third.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert third.recv(4096) == b""  # closed unanswered
        for s in idle:
            s.close()
        for _ in range(100):  # the handler threads notice the close and free their slots
            try:
                if served.post(log.body(0, 2)).status == 200:
                    break
            except (http.client.HTTPException, ConnectionError):
                time.sleep(0.05)
        else:
            pytest.fail("no slot freed")
    finally:
        served.stop()


def test_other_paths_and_methods(served: Served) -> None:
    assert served.request("POST", "/add-checkpoint/", b"x").status == 404
    assert served.request("POST", "/add-checkpoint?x=1", b"x").status == 404
    assert served.request("GET", "/add-checkpoint").status == 404
    assert served.request("PUT", "/add-checkpoint", b"x").status == 501
    # http.server's own refusals (an HTTP/0.9-style line gets a bare answer): 400, never a 500.
    assert raw(served, b"NONSENSE\r\n\r\n").startswith(b"400 ")
    assert raw(served, b"POST /add-checkpoint HTTP/9.9\r\n\r\n").startswith(b"505 ")


def test_the_spec_example_request_is_parsed_and_refused_as_unknown(served: Served) -> None:
    """tlog-witness's example body: well-formed (not 400), for a log this witness does not follow (404)."""
    body = (
        Path(__file__).resolve().parents[1] / "fixtures/tlog/witness/add_checkpoint_request_example.txt"
    ).read_bytes()
    expect(404, served, body, b"example.com/behind-the-sofa")


# --- Monitoring: GET /<origin hash>/checkpoint -------------------------------------------------


def test_latest_cosigned_checkpoint_is_served_to_monitors(served: Served, log: TestLog) -> None:
    path = f"/{origin_hash(log.origin)}/checkpoint"
    assert served.request("GET", path).status == 404
    cosigned_at(served, log, log.body(0, 6), 6)
    reply = served.request("GET", path)
    assert reply.status == 200
    assert verify_checkpoint(reply.body, [log.signer.verifier], origin=log.origin).checkpoint.size == 6
    policy = CosignaturePolicy.from_vkeys([served.witness.vkey], 1)
    assert verify_cosignatures(reply.body, policy) == {"witness.test/w1": T0}
    assert served.request("GET", f"/{origin_hash('log.test/unknown')}/checkpoint").status == 404
    assert served.request("GET", f"/{origin_hash(log.origin).upper()}/checkpoint").status == 404


# --- Durability and atomicity ------------------------------------------------------------------


def test_state_survives_a_restart_and_a_rollback_is_still_refused(state_dir: Path, log: TestLog, clock: Clock) -> None:
    first = Served(state_dir, [log], clock)
    try:
        cosigned_at(first, log, log.body(0, 8), 8)
        vkey = first.witness.vkey
    finally:
        first.stop()
    again = Served(state_dir, [log], clock)
    try:
        assert again.witness.vkey == vkey
        assert again.post(log.body(0, 5)).body == b"8\n"
        assert again.post(log.body(5, 5)).body == b"8\n"
        expect(422, again, TestLog(log.origin, 1, prefix=b"forked").body(8, 8))
        assert cosigned_at(again, log, log.body(8, 9), 9) == T0
    finally:
        again.stop()


def test_the_record_is_on_disk_when_the_cosignature_is_returned(served: Served, state_dir: Path, log: TestLog) -> None:
    reply = served.post(log.body(0, 4))
    stored = (state_dir / CHECKPOINTS_DIR / origin_hash(log.origin)).read_bytes()
    assert stored.endswith(reply.body)
    assert stored.startswith(log.checkpoint(4))


def test_no_cosignature_unless_persisted(served: Served, log: TestLog, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(record: Record) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(served.state, "commit", disk_full)
    reply = served.post(log.body(0, 4))
    assert (reply.status, reply.body) == (500, b"internal error\n")
    assert served.state.latest(log.origin) is None
    monkeypatch.undo()
    assert served.post(log.body(0, 4)).status == 200


def test_concurrent_requests_from_the_same_old_size_cosign_only_one(served: Served, log: TestLog) -> None:
    """The spec's race: check-then-persist is atomic, so two requests from size 8 cannot both pass."""
    cosigned_at(served, log, log.body(0, 8), 8)
    bodies = [log.body(8, n) for n in (10, 11, 12, 13, 14, 15)]
    statuses: list[int] = []
    barrier = threading.Barrier(len(bodies))

    def submit(body: bytes) -> None:
        barrier.wait()
        statuses.append(served.post(body).status)

    threads = [threading.Thread(target=submit, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(statuses) == [200, 409, 409, 409, 409, 409]
    winner = served.state.latest(log.origin)
    assert winner is not None and winner.root_hash == log.root(winner.size)


def test_a_second_process_cannot_serve_the_same_state(served: Served, state_dir: Path, log: TestLog) -> None:
    from cloister.witness.state import WitnessSetupError

    with pytest.raises(WitnessSetupError, match="in use"):
        WitnessState.open(state_dir, [log.origin])
