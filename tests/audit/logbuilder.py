"""Real Cloister logs for the auditor's tests, made by the real enclave code in this process.

`TestLog` runs `cloister.enclave.core.EnclaveCore` on a `MockNsm` (AWS-format attestation documents from a
local CA), loads a signed policy bundle (the example bundle plus a test issuer key), makes
decisions and outcomes, restarts the enclave over its own log (a resumed log, with a second key
entry), and writes everything in the C2SP tlog-tiles layout with `write_tiles`.

`LogServer` serves such a directory over HTTP the way the relay does (`/log/checkpoint`,
`/log/tile/...`, `/log/attestation?nonce=`), with hooks to tamper with any answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.dev.mock_nsm import MockNsm
from cloister.enclave.bundle import read_bundle_dir
from cloister.enclave.config import EnclaveConfig
from cloister.enclave.core import EnclaveCore, LogAppend, policy_extension
from cloister.verify.attestation import TrustRoot
from cloister.verify.bundle import admin_key_id, sign_bundle
from cloister.verify.checkpoint import Checkpoint
from cloister.verify.entries import DecisionEntry, KeyEntry, OutcomeEntry, encode_entry, parse_entry
from cloister.verify.jwt import encode_jwt
from cloister.verify.merkle import CompactRange, inclusion_proof, leaf_hash, root_from_leaf_hashes
from cloister.verify.note import sign_note
from cloister.verify.tiles import (
    TILE_WIDTH,
    encode_entry_bundle,
    entry_bundles,
    hash_tiles,
)
from tests.world import decision_bundle

EXAMPLE_BUNDLE = Path(__file__).resolve().parents[2] / "cloister" / "dev" / "examples" / "bundle"
PCRS = {0: bytes.fromhex("a1" * 48), 1: bytes.fromhex("b2" * 48), 2: bytes.fromhex("c3" * 48)}
ORIGIN = "audit.test/log"


def pcr_args(pcrs: dict[int, bytes] = PCRS) -> list[str]:
    out = []
    for i, v in sorted(pcrs.items()):
        out += ["--expect-pcr", f"{i}={v.hex()}"]
    return out


def tree_levels(entries: list[bytes]) -> list[list[bytes]]:
    """Hashes at Merkle levels 0, 8, 16, ...: what the hash tiles of each tile level hold."""
    levels = [[leaf_hash(e) for e in entries]]
    while len(levels[-1]) >= TILE_WIDTH:
        below = levels[-1]
        levels.append(
            [
                root_from_leaf_hashes(below[i : i + TILE_WIDTH])
                for i in range(0, len(below) - TILE_WIDTH + 1, TILE_WIDTH)
            ]
        )
    return levels


def write_tiles(directory: Path, entries: list[bytes], note: bytes, *, levels: list[list[bytes]] | None = None) -> None:
    """The log of `entries` in the tlog-tiles layout: bundles, hash tiles at their widths, checkpoint."""
    n = len(entries)
    directory.mkdir(parents=True, exist_ok=True)
    tile_dir = directory / "tile"
    if tile_dir.exists():
        shutil.rmtree(tile_dir)
    for b in entry_bundles(n):
        path = directory / b.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_entry_bundle(entries[b.index * TILE_WIDTH : b.index * TILE_WIDTH + b.width]))
    levels = levels or tree_levels(entries)
    for t in hash_tiles(n):
        path = directory / t.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(levels[t.level][t.index * TILE_WIDTH : t.index * TILE_WIDTH + t.width]))
    (directory / "checkpoint").write_bytes(note)


class TestLog:
    """A Cloister log grown by real enclave cores (MockNsm), mirrored in memory."""

    __test__ = False  # not a pytest class

    def __init__(
        self, workdir: Path, *, origin: str = ORIGIN, pcrs: dict[int, bytes] = PCRS, nsm_dir: Path | None = None
    ) -> None:
        self.workdir = workdir
        self.origin = origin
        self.pcrs = dict(pcrs)
        self.nsm_dir = nsm_dir or workdir / "mock-nsm"
        self.nsm = MockNsm(self.nsm_dir, self.pcrs)
        self.root_pem = self.nsm_dir / "root.pem"
        self.root_pem.parent.mkdir(parents=True, exist_ok=True)
        self.root_pem.write_bytes(self.nsm.root_pem())
        self.admin = ed25519.Ed25519PrivateKey.generate()
        self.issuer = ed25519.Ed25519PrivateKey.generate()
        self.config = EnclaveConfig(
            origin=origin,
            admin_keys={admin_key_id(self.admin.public_key()): self.admin.public_key()},
            trust_root=TrustRoot.from_pem(self.nsm.root_pem(), name="mock NSM root"),
            predecessor_pcr0=frozenset(),
            allow_debug=False,
            raw=b"",
        )
        self.entries: list[bytes] = []
        self.note = b""
        self.core: EnclaveCore | None = None
        self.policy_version = 0
        self.signed_bundle = b""  # the bundle in force, as signed (a restart loads these bytes again)
        self.grants: dict[int, bytes] = {}
        self.dir = workdir / "log"
        self.log_key = ed25519.Ed25519PrivateKey.generate()

    # ---- the enclave ---------------------------------------------------------------------

    def _new_core(self) -> EnclaveCore:
        return EnclaveCore(
            self.config,
            self.nsm,
            pcrs=self.pcrs,
            clock_ms=lambda: time.time_ns() // 1_000_000,
            mock_nsm=True,
            log_key=self.log_key,  # one log key per origin, across restarts (as unsealed from KMS)
        )

    def _absorb(self, append: LogAppend) -> None:
        first = append.first_index
        if first > len(self.entries):
            raise AssertionError(f"gap in the log: {first} > {len(self.entries)}")
        self.entries[first : first + len(append.entries)] = list(append.entries)
        self.note = append.checkpoint.note

    def start(self) -> TestLog:
        self.core = self._new_core()
        self._absorb(self.core.start_new_log())
        return self

    def load_policy(self) -> None:
        assert self.core is not None
        bundle_dir = self.workdir / f"bundle-{self.policy_version + 1}"
        if bundle_dir.exists():
            shutil.rmtree(bundle_dir)
        decision_bundle(bundle_dir)  # the example, minus upstream identities (tests/world.py)
        (bundle_dir / "issuers").mkdir(exist_ok=True)
        pem = self.issuer.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        (bundle_dir / "issuers" / "cloister-dev.pem").write_bytes(pem)
        self.policy_version += 1
        self.signed_bundle = self._sign(read_bundle_dir(bundle_dir), self.policy_version)
        _, _, append = self.core.load_policy(self.signed_bundle)
        self._absorb(append)

    def _sign(self, files: dict[str, bytes], version: int) -> bytes:
        """Signed for this log's origin, loadable for 90 days (the enclave here runs on the real clock)."""
        return sign_bundle(files, version, self.admin, origin=self.origin, not_after=int(time.time()) + 90 * 86400)

    def token(self, agent: str, roles: list[str]) -> str:
        now = int(time.time())
        claims = {
            "iss": "cloister-dev",
            "aud": self.origin,
            "sub": agent,
            "roles": roles,
            "iat": now,
            "exp": now + 3600,
        }
        return encode_jwt(claims, self.issuer)

    def call(
        self,
        agent: str,
        roles: list[str],
        server: str,
        tool: str,
        args: dict[str, Any],
        *,
        outcome: bool = True,
        request_id: str = "req-1",
        token: str | None = None,
    ) -> int:
        """One decision (and its outcome when allowed); returns the decision's index."""
        assert self.core is not None
        token = self.token(agent, roles) if token is None else token
        verdict = self.core.authorize(
            token=token,
            server=server,
            tool=tool,
            arguments_json=json.dumps(args).encode(),
            request_id=request_id,
            persisted_size=len(self.entries),
        )
        self._absorb(verdict.log)
        if verdict.grant:
            self.grants[verdict.log_index] = verdict.grant
        if verdict.allowed and outcome:
            self._absorb(
                self.core.record_outcome(
                    decision_index=verdict.log_index,
                    result_sha256=b"\x01" * 32,
                    error="",
                    duration_us=1234,
                    paid_amount="",
                    persisted_size=len(self.entries),
                )
            )
        return verdict.log_index

    def typical_traffic(self, rounds: int = 3) -> None:
        """Allows, policy denies, unknown tools, an unauthenticated call, outcomes."""
        for r in range(rounds):
            self.call(
                "refund-bot", ["refund-agent"], "refunds", "refund.create", {"amount": 10 + r}, request_id=f"r{r}-a"
            )
            self.call(
                "refund-bot", ["refund-agent"], "refunds", "refund.create", {"amount": 6000}, request_id=f"r{r}-b"
            )
            self.call("refund-bot", ["refund-agent"], "refunds", "customer_lookup", {"id": r}, request_id=f"r{r}-c")
            self.call(
                "research-bot", ["research-agent"], "research", "web_search", {"q": f"q{r}"}, request_id=f"r{r}-d"
            )
            self.call("research-bot", ["research-agent"], "research", "db_write", {"x": r}, request_id=f"r{r}-e")
            if r == 0:
                self.call("refund-bot", ["refund-agent"], "refunds", "no.such.tool", {}, request_id="r0-f")
                self.call("", [], "refunds", "customer_lookup", {}, request_id="r0-g", token="not-a-jwt")

    def restart(self) -> None:
        """A new enclave (new keys) resumes this log: verifies it, appends its key entry, reloads policy."""
        size = len(self.entries)
        key_index = max(i for i, e in enumerate(self.entries) if isinstance(parse_entry(e), KeyEntry))
        hashes = [leaf_hash(e) for e in self.entries]

        def node(level: int, index: int) -> bytes:
            return root_from_leaf_hashes(hashes[index << level : (index + 1) << level])

        self.core = self._new_core()
        self._absorb(
            self.core.resume_log(
                checkpoint=self.note,
                range_size=0,
                range_hashes=[],
                entries=list(self.entries),
                key_entry=self.entries[key_index],
                key_entry_index=key_index,
                key_entry_proof=inclusion_proof(key_index, size, node),
                boundary_entry=b"",
                boundary_proof=[],
            )
        )
        # The same bundle again, as the relay keeps it: the enclave logs nothing new for it (same
        # version and hash as in force). Signed anew it would differ (its not-after moves with the
        # clock) and be refused as a rollback.
        assert self.core is not None
        _, _, append = self.core.load_policy(self.signed_bundle)
        self._absorb(append)

    def attest(self, nonce: bytes) -> tuple[bytes, bytes]:
        assert self.core is not None
        return self.core.attest(nonce, include_checkpoint=True)

    def write(self, directory: Path | None = None) -> Path:
        target = directory or self.dir
        write_tiles(target, self.entries, self.note)
        return target


def build_log(workdir: Path, *, rounds: int = 3, restart: bool = True, **kw: Any) -> TestLog:
    """A log with two key entries, a policy entry, decisions of every kind and outcomes, on disk."""
    log = TestLog(workdir, **kw).start()
    log.load_policy()
    log.typical_traffic(rounds)
    if restart:
        log.restart()
        log.typical_traffic(1)
    log.write()
    return log


AGENTS = [
    ("refund-bot", "refund-agent"),
    ("research-bot", "research-agent"),
    ("ops-bot", "ops"),
    ("billing-bot", "billing"),
    ("triage-bot", "triage"),
]
TOOLS = [
    ("refunds", "refund.create"),
    ("refunds", "customer_lookup"),
    ("refunds", "transaction_history"),
    ("research", "web_search"),
    ("research", "db_write"),
    ("crm", "note.add"),
    ("crm", "ticket.close"),
    ("mail", "send"),
]


def synthetic_log(directory: Path, n: int, seed: int = 1) -> TestLog:
    """A big log fast: a real key entry and policy entry, then N synthetic decisions and outcomes
    made by the real entry encoder, under a checkpoint signed by the enclave's log key."""
    rnd = random.Random(seed)
    log = TestLog(directory).start()
    log.load_policy()
    core = log.core
    assert core is not None and core.policy is not None
    version, sha = core.policy.version, core.policy.sha256
    t = time.time_ns() // 1_000_000
    entries = log.entries
    open_allow: list[int] = []
    req = 0
    while len(entries) < n:
        t += rnd.randint(0, 3)
        if open_allow and rnd.random() < 0.45:
            d = open_allow.pop(rnd.randrange(len(open_allow)))
            entries.append(
                encode_entry(
                    OutcomeEntry(
                        time_ms=t,
                        decision_index=d,
                        result_sha256=hashlib.sha256(os.urandom(8)).digest(),
                        error="" if rnd.random() < 0.97 else "upstream timeout",
                        duration_us=rnd.randint(200, 900_000),
                    )
                )
            )
            continue
        agent, role = rnd.choice(AGENTS)
        server, tool = rnd.choice(TOOLS)
        req += 1
        deny = rnd.random() < 0.15
        code = rnd.choice(["policy", "no-permit", "limit"]) if deny else ""
        entries.append(
            encode_entry(
                DecisionEntry(
                    time_ms=t,
                    agent=agent,
                    roles=(role,),
                    issuer="cloister-dev",
                    server=server,
                    tool=tool,
                    args_sha256=hashlib.sha256(os.urandom(8)).digest(),
                    decision="deny" if deny else "allow",
                    code=code,
                    reason=(
                        f"limit: {agent} over {rnd.randint(1, 999)} calls/min"
                        if code == "limit"
                        else "forbidden by policy refund-single-cap"
                        if code == "policy"
                        else "no policy permits this call"
                        if code
                        else "permitted by refund-agent-tools"
                    ),
                    policies=("refund-agent-tools",) if not deny else (),
                    policy_sha256=sha,
                    policy_version=version,
                    request_id=f"{req:x}",
                    grant_nonce=None if deny else os.urandom(16),
                    grant_expiry_ms=None if deny else t + 60_000,
                    charges={"refund-agent-call-rate": "1"} if not deny and tool == "refund.create" else {},
                )
            )
        )
        if not deny:
            open_allow.append(len(entries) - 1)
    del entries[n:]
    tree = CompactRange()
    levels = tree_levels(entries)
    for h in levels[0]:
        tree.append(h)
    text = Checkpoint(
        origin=log.origin, size=n, root_hash=tree.root(), extensions=(policy_extension(version, sha),)
    ).to_text()
    log.note = sign_note(text, [core.note_signer])
    write_tiles(log.dir, entries, log.note, levels=levels)
    return log


# ---- HTTP ----------------------------------------------------------------------------------

# (path, query) -> None to pass, or (status, body) or (status, body, extra headers).
Override = Callable[[str, dict[str, list[str]]], tuple[Any, ...] | None]


class LogServer:
    """Serves a log directory at /log/ like the relay, with an attestation endpoint and hooks."""

    def __init__(self, directory: Path, attest: Callable[[bytes], tuple[bytes, bytes]] | None = None) -> None:
        self.directory = directory
        self.attest = attest
        self.overrides: list[Override] = []
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                server.requests.append(parts.path)
                query = parse_qs(parts.query)
                status, body, headers = server.answer(parts.path, query)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/log/"

    def answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes, dict[str, str]]:
        text = {"Content-Type": "text/plain"}
        if not path.startswith("/log/"):
            return 404, b"not found\n", text
        rel = path[len("/log/") :]
        for hook in self.overrides:
            got = hook(rel, query)
            if got is not None:
                return got[0], got[1], {"Content-Type": "application/octet-stream", **(got[2] if len(got) > 2 else {})}
        if rel == "attestation":
            if self.attest is None:
                return 404, b"no attestation here\n", text
            nonce = bytes.fromhex(query.get("nonce", [""])[0])
            doc, note = self.attest(nonce)
            body = {"document": base64.b64encode(doc).decode(), "nonce": nonce.hex(), "checkpoint": note.decode()}
            return 200, json.dumps(body).encode(), {"Content-Type": "application/json"}
        file = self.directory / rel
        if ".." in rel.split("/") or not file.is_file():
            return 404, b"not found\n", text
        return 200, file.read_bytes(), {"Content-Type": "application/octet-stream"}

    def __enter__(self) -> LogServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
