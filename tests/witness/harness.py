"""A test log (real RFC 9162 trees, real signed checkpoints) and a witness served on 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloister.verify.checkpoint import Checkpoint
from cloister.verify.merkle import consistency_proof, leaf_hash, root_from_leaf_hashes
from cloister.verify.note import Ed25519NoteSigner, sign_note
from cloister.witness.protocol import Witness
from cloister.witness.server import WitnessHTTPServer, make_server
from cloister.witness.state import WitnessState, init_state

T0 = 1_700_000_000  # the witness clock's first reading (a fixed instant, not today)
WITNESS_NAME = "witness.test/w1"


def key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


class TestLog:
    """A log of `prefix`-numbered entries, signed under its origin by a deterministic key."""

    __test__ = False  # not a pytest class

    def __init__(self, origin: str, seed: int, prefix: bytes = b"entry") -> None:
        self.origin = origin
        self.signer = Ed25519NoteSigner(origin, key(seed))
        self.prefix = prefix
        self.hashes: list[bytes] = []

    @property
    def vkey(self) -> str:
        return self.signer.vkey

    def grow_to(self, size: int) -> None:
        while len(self.hashes) < size:
            self.hashes.append(leaf_hash(self.prefix + b" %d" % len(self.hashes)))

    def root(self, size: int) -> bytes:
        self.grow_to(size)
        return root_from_leaf_hashes(self.hashes[:size])

    def _node(self, level: int, index: int) -> bytes:
        return root_from_leaf_hashes(self.hashes[index << level : (index + 1) << level])

    def proof(self, old: int, new: int) -> list[bytes]:
        self.grow_to(new)
        return consistency_proof(old, new, self._node)

    def checkpoint(self, size: int, *, root: bytes | None = None, signers: Sequence[Ed25519NoteSigner] = ()) -> bytes:
        text = Checkpoint(self.origin, size, self.root(size) if root is None else root).to_text()
        return sign_note(text, signers or [self.signer])

    def body(self, old: int, size: int, *, proof: Sequence[bytes] | None = None, note: bytes | None = None) -> bytes:
        lines = [b"old %d\n" % old]
        lines += [base64.b64encode(h) + b"\n" for h in (self.proof(old, size) if proof is None else proof)]
        return b"".join(lines) + b"\n" + (self.checkpoint(size) if note is None else note)


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    connection: str | None


class Clock:
    """The witness's clock: fixed until a test moves it."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class Served:
    """A witness on a state directory, served on 127.0.0.1 (a free port) in a thread."""

    def __init__(
        self,
        state_dir: Path,
        logs: dict[str, tuple[TestLog, ...]] | Sequence[TestLog],
        clock: Clock,
        *,
        max_connections: int = 64,
    ) -> None:
        if not isinstance(logs, dict):
            logs = {log.origin: (log,) for log in logs}
        keys = {origin: tuple(log.signer.verifier for log in group) for origin, group in logs.items()}
        self.state = WitnessState.open(state_dir, keys)
        self.witness = Witness(self.state, keys, clock)
        self.server: WitnessHTTPServer = make_server(
            self.witness, "127.0.0.1", 0, timeout=5.0, max_connections=max_connections
        )
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)

    def request(self, method: str, path: str, body: bytes | None = None) -> Reply:
        conn = self.connect()
        try:
            return send(conn, method, path, body)
        finally:
            conn.close()

    def post(self, body: bytes) -> Reply:
        return self.request("POST", "/add-checkpoint", body)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        self.state.close()


def send(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> Reply:
    conn.request(method, path, body=body)
    resp = conn.getresponse()
    data = resp.read()
    return Reply(resp.status, resp.getheader("Content-Type", ""), data, resp.getheader("Connection"))


def new_state(tmp: Path, seed: int = 42, name: str = WITNESS_NAME) -> Path:
    state_dir = tmp / "witness-state"
    init_state(state_dir, name, key(seed))
    return state_dir
