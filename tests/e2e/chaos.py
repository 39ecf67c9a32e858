"""Helpers for the crash tests (tests/e2e/test_crash.py): a stack whose processes can be SIGKILLed
and restarted, agents and an auditor that record everything they were told, and the invariant
checker that compares those records with what storage holds.

The checker is a pure function of (the stored log, what was observed), so the tests can also feed
it corrupted copies and check that it complains.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx2
from cryptography.hazmat.primitives.asymmetric import ed25519
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from cloister.audit.source import DirSource, SourceSpec, read_tile
from cloister.dev.mcp_http import mcp_http_client
from cloister.dev.state import DevState, ensure_state, free_port
from cloister.relay.call_path import DENIAL_META_KEY
from cloister.verify.attestation import DOCUMENT_TIME, AttestationPolicy, TrustRoot
from cloister.verify.canonical import canonical_sha256
from cloister.verify.checkpoint import parse_checkpoint, verify_checkpoint
from cloister.verify.enclave_identity import verify_enclave
from cloister.verify.entries import DecisionEntry, Entry, KeyEntry, OutcomeEntry, parse_entry
from cloister.verify.errors import CloisterError
from cloister.verify.merkle import (
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)
from cloister.verify.note import Ed25519NoteVerifier
from cloister.verify.tiles import TILE_WIDTH, TileNodeSource, entry_bundle_path, parse_entry_bundle
from tests.e2e.procs import start_relay, wait_for, write_relay_config

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
SERVER, TOOL, SLOW_TOOL = "slow", "echo", "sleep"
# Texts starting with this are denied by a forbid policy, so agents also receive denials.
DENY_PREFIX = "deny-"
# Agents named sleepy-<n> call slow___sleep (1.5 to 4.5 s upstream) instead of slow___echo.
SLEEPY = "sleepy-"
# Error codes after which the relay's MCP session is still usable.
RELAY_CODES = {-32001, -32002, -32003, -32004, -32005, -32006}


def args_key(tool: str, args: dict[str, Any]) -> tuple[str, bytes]:
    """What a decision entry commits to about a call: the tool and the SHA-256 of its canonical arguments."""
    return tool, canonical_sha256(args)


def label(tool: str, args: dict[str, Any]) -> str:
    return f"{tool}({json.dumps(args)})"


# ---- the stack --------------------------------------------------------------------------------


ISSUERS_TOML = """[issuers.cloister-dev]
issuer = "cloister-dev"
keys = ["issuers/cloister-dev.pem"]
roles_claim = "roles"
max_lifetime_s = 86400
"""


def make_bundle(dst: Path, agents: Sequence[str]) -> Path:
    """A self-contained bundle (ensure_state adds the dev issuer's key): role tester for every agent,
    server slow with echo and sleep, a permit, and a forbid for texts that start with DENY_PREFIX."""
    (dst / "policies").mkdir(parents=True)
    (dst / "bundle.toml").write_text('[bundle]\nname = "crash"\nmode = "enforce"\nmax_argument_bytes = 4096\n')
    (dst / "issuers.toml").write_text(ISSUERS_TOML)
    entities = "[roles]\ntester = {}\n"
    for a in agents:
        entities += f'\n[agents.{a}]\nroles = ["tester"]\nregion = "eu"\n'
    entities += f'\n[servers.{SERVER}]\nregion = "eu"\ntools = ["{TOOL}", "{SLOW_TOOL}"]\n'
    (dst / "entities.toml").write_text(entities)
    (dst / "policies" / "crash.cedar").write_text(
        '@id("tester-slow")\npermit (principal in Cloister::Role::"tester", action, '
        f'resource == Cloister::Server::"{SERVER}");\n\n'
        '@id("no-deny-texts")\nforbid (principal, action, resource) '
        f'when {{ context.input has text && context.input.text like "{DENY_PREFIX}*" }};\n'
    )
    return dst


class ChaosStack:
    """The enclave (mock NSM behind the AF_UNIX bridge), the relay and its stdio upstream, as
    separate process groups that can be SIGKILLed and restarted with the same socket and config."""

    def __init__(self, tmp: Path, agents: Sequence[str]) -> None:
        self.tmp = tmp
        self.agents = list(agents)
        self.state: DevState = ensure_state(
            tmp / "state", bundle_source=make_bundle(tmp / "bundle", agents), witnessed=False
        )
        self.sock = tmp / "enclave.vsock"
        self.calls_file = tmp / "calls.jsonl"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        py = json.dumps(sys.executable)
        self.config = write_relay_config(
            tmp / "relay.toml",
            port=self.port,
            sock=self.sock,
            extra="max_argument_bytes = 65536\nenclave_timeout_s = 5\n",
            upstreams=f"""
[[upstreams]]
name = "{SERVER}"
command = [{py}, "{HERE / "slow_server.py"}"]
env = {{ CALLS_FILE = "{self.calls_file}" }}
timeout_s = 10
""",
        )
        # The processes run a snapshot of the code taken now: other work in the same tree must not
        # change the enclave's measurement (its mock PCR0) between two starts of one run.
        self.code = tmp / "code"
        for pkg in ("cloister",):
            shutil.copytree(ROOT / pkg, self.code / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        self.enclave: subprocess.Popen[bytes] | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.pcr0 = b""
        self.enclave_starts = 0
        self.relay_starts = 0

    @property
    def log_dir(self) -> Path:
        return self.state.log_dir

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp"

    def trust_root(self) -> TrustRoot:
        return TrustRoot.from_pem(self.state.mock_root.read_bytes())

    def token(self, agent: str) -> str:
        return self.state.mint_token(agent, ["tester"], 3600)

    def start_enclave(self) -> None:
        self.enclave, ready = _start_enclave(
            self.code, self.state.root, f"unix:{self.sock}", log=self.tmp / "enclave.log"
        )
        pcr0 = bytes.fromhex(ready["pcr0"])
        assert not self.pcr0 or pcr0 == self.pcr0, "the same enclave code must measure the same"
        self.pcr0 = pcr0
        self.enclave_starts += 1

    def start_relay(self) -> None:
        self.relay = start_relay(self.config, self.tmp / "relay.log", cwd=self.code)
        self.relay_starts += 1

    def health(self) -> dict[str, Any]:
        try:
            r = httpx2.get(f"{self.url}/healthz", timeout=2)
            body: dict[str, Any] = r.json()
            return body
        except (httpx2.HTTPError, ValueError):
            return {"ready": False, "upstreams": {}}

    def wait_relay_ready(self, timeout: float = 60) -> None:
        relay = self.relay
        assert relay is not None

        def up() -> bool:
            if relay.poll() is not None:
                raise RuntimeError(f"the relay exited ({relay.returncode}): {self.relay_log_tail()}")
            h = self.health()
            return h.get("ready") is True and h["upstreams"].get(SERVER, {}).get("state") == "up"

        wait_for(up, timeout, "the relay and its upstream to be ready")

    def relay_log_tail(self, n: int = 3000) -> str:
        path = self.tmp / "relay.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
        """Signal the process group (the relay's group includes its stdio upstream) and reap it."""
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill_enclave(self) -> None:
        self._kill(self.enclave, signal.SIGKILL)

    def kill_relay(self) -> None:
        self._kill(self.relay, signal.SIGKILL)

    def stop(self) -> None:
        """A graceful stop: the relay materializes its tiles and publishes on the way out."""
        self._kill(self.relay, signal.SIGTERM)
        self._kill(self.enclave, signal.SIGTERM)


def _start_enclave(
    code: Path, state_root: Path, listen: str, *, log: Path
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """tests.e2e.procs.start_enclave, run from the code snapshot."""
    from tests.e2e.procs import start_enclave

    return start_enclave(state_root, listen, log=log, cwd=code)


# ---- what agents and the auditor were told ---------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """A successful tools/call result an agent received."""

    agent: str
    tool: str
    args: dict[str, Any]
    decision: int
    outcome: int
    checkpoint_size: int

    @property
    def what(self) -> str:
        return f"{self.agent} got {label(self.tool, self.args)}"


@dataclass(frozen=True)
class Refusal:
    """An error an agent received that names a log entry (`data.log_index`)."""

    agent: str
    tool: str
    args: dict[str, Any]
    code: int
    log_index: int


@dataclass(frozen=True)
class ServedCheckpoint:
    """A checkpoint the relay served, verified when it was served (signature, attestation)."""

    size: int
    root: bytes
    log_key: bytes | None  # the attested key; None for /log/checkpoint (checked against the key entries)
    note: bytes
    where: str
    # The attested enclave's grant key: new at every enclave start (the log key is one per origin).
    grant_key: bytes | None = None


@dataclass
class Observed:
    grants: list[Grant] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    checkpoints: list[ServedCheckpoint] = field(default_factory=list)
    forwarded: list[dict[str, Any]] = field(default_factory=list)
    enclave_starts: int = 0
    serving_enclaves: int = 0  # enclave starts after which calls were acknowledged (their key entry is durable)
    problems: list[str] = field(default_factory=list)  # found while running (bad attestations, ...)
    errors: Counter[str] = field(default_factory=Counter)  # other failures agents saw (expected during kills)
    events: list[tuple[float, str]] = field(default_factory=list)


def _client(url: str, token: str) -> Client:
    http = mcp_http_client(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(20.0, read=20.0))
    return Client(streamable_http_client(url, http_client=http), cache=None)


def echo_call(agent: str, seq: int, deny_every: int = 10) -> tuple[str, dict[str, Any], str | None]:
    """A unique echo; one in `deny_every` is denied by policy. Returns (tool, args, expected text)."""
    prefix = DENY_PREFIX if seq % deny_every == 0 else "ok-"
    text = f"{prefix}{agent}-{seq}-{secrets.token_hex(4)}"
    return TOOL, {"text": text}, text


def sleep_call(agent: str, seq: int) -> tuple[str, dict[str, Any], str | None]:
    """A call that spends 1.5 to 4.5 s upstream (kills land while it is there; an enclave may restart before it
    returns, so its outcome is recorded by the next enclave), with unique arguments."""
    seconds = 1.5 + (seq % 16) * 0.2 + int(agent.rsplit("-", 1)[-1]) * 1e-4 + seq * 1e-8
    return SLOW_TOOL, {"seconds": seconds}, "awake"


async def agent_loop(
    url: str,
    agent: str,
    token: str,
    obs: Observed,
    stop: anyio.Event,
    make_call: Callable[[str, int], tuple[str, dict[str, Any], str | None]] = echo_call,
) -> None:
    """Make unique calls until `stop`; record every answer; reconnect whenever the session breaks."""
    seq = 0
    while not stop.is_set():
        try:
            async with _client(url, token) as c:
                while not stop.is_set():
                    seq += 1
                    tool, args, expect = make_call(agent, seq)
                    try:
                        with anyio.fail_after(30):
                            result = await c.call_tool(f"{SERVER}___{tool}", args)
                    except MCPError as exc:
                        data = exc.data if isinstance(exc.data, dict) else {}
                        if "log_index" in data:
                            obs.refusals.append(Refusal(agent, tool, args, exc.code, int(data["log_index"])))
                        else:
                            obs.errors[f"{exc.code}"] += 1
                        if exc.code not in RELAY_CODES:
                            break
                        if exc.code == -32004:  # fail closed while the enclave is down: do not spin
                            await anyio.sleep(0.05)
                        continue
                    denial = (result.meta or {}).get(DENIAL_META_KEY)
                    if result.is_error and isinstance(denial, dict):  # a denial result (decision 0018)
                        code, index = int(denial["error_code"]), int(denial["log_index"])
                        obs.refusals.append(Refusal(agent, tool, args, code, index))
                        continue
                    meta = (result.meta or {}).get("dev.cloister/log")
                    answer = "".join(getattr(part, "text", "") for part in result.content)
                    if result.is_error or not meta or answer != expect:
                        obs.problems.append(
                            f"{agent}: {label(tool, args)} answered {result!r}, not {expect!r} with log indexes"
                        )
                        continue
                    obs.grants.append(
                        Grant(
                            agent, tool, args, int(meta["decision"]), int(meta["outcome"]), int(meta["checkpoint_size"])
                        )
                    )
        except Exception as exc:  # the session broke (relay killed): count, pause, reconnect
            obs.errors[_error_name(exc)] += 1
        await anyio.sleep(0.1)


def _error_name(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return type(exc).__name__


def verify_attested(reply: dict[str, Any], nonce: bytes, root: TrustRoot, pcr0: bytes) -> ServedCheckpoint:
    """A /log/attestation reply: our nonce, the mock root, PCR0, and a note signed by the bound key."""
    note = str(reply["checkpoint"]).encode()
    if bytes.fromhex(str(reply["nonce"])) != nonce:
        raise CloisterError("the reply is for another nonce")
    policy = AttestationPolicy(root=root, at=DOCUMENT_TIME, now=datetime.now(UTC), nonce=nonce, expected_pcrs={0: pcr0})
    enclave = verify_enclave(base64.b64decode(reply["document"]), policy, checkpoint=note)
    cp = verify_checkpoint(note, [enclave.binding.log_verifier()], origin=enclave.binding.origin).checkpoint
    return ServedCheckpoint(
        cp.size, cp.root_hash, enclave.binding.log_key, note, "attestation", enclave.binding.grant_key
    )


async def checkpoint_watcher(
    url: str, obs: Observed, root: TrustRoot, pcr0: bytes, stop: anyio.Event, interval: float = 0.2
) -> None:
    """Ask for an attested checkpoint (fresh nonce) and the published one, again and again."""
    async with httpx2.AsyncClient(timeout=10) as h:
        while not stop.is_set():
            nonce = secrets.token_bytes(16)
            try:
                r = await h.get(f"{url}/log/attestation", params={"nonce": nonce.hex()})
                if r.status_code == 200:
                    try:
                        obs.checkpoints.append(verify_attested(r.json(), nonce, root, pcr0))
                    except (CloisterError, ValueError, KeyError) as exc:
                        obs.problems.append(f"the relay served an attested checkpoint that does not verify: {exc}")
                r = await h.get(f"{url}/log/checkpoint")
                if r.status_code == 200:
                    note = r.content
                    try:
                        # The note's text only: its signature is checked against the log's key entries later.
                        text = note.split(b"\n\n", 1)[0] + b"\n"
                        cp = parse_checkpoint(text)
                        obs.checkpoints.append(ServedCheckpoint(cp.size, cp.root_hash, None, note, "checkpoint"))
                    except CloisterError as exc:
                        obs.problems.append(f"the relay served a malformed /log/checkpoint: {exc}")
            except httpx2.HTTPError:
                pass  # the relay is down: nothing was served
            await anyio.sleep(interval)


def read_forwarded(calls_file: Path) -> list[dict[str, Any]]:
    if not calls_file.exists():
        return []
    out = []
    for line in calls_file.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"torn": line})  # the upstream was killed while writing: still a received call
    return out


# ---- the stored log ---------------------------------------------------------------------------------


@dataclass
class LogView:
    """A log as storage holds it: its entries and a node source for proofs, at one tree size."""

    size: int
    root: bytes  # the root of a checkpoint the enclave signed for `size`
    entries: list[bytes]
    get_node: Callable[[int, int], bytes]
    where: str


def read_log_dir(path: Path, size: int, root: bytes) -> LogView:
    """Entry bundles and hash tiles of the tree of `size` leaves, read from a storage directory."""
    source = DirSource(SourceSpec(str(path)))
    entries: list[bytes] = []
    for n in range((size + TILE_WIDTH - 1) // TILE_WIDTH):
        width = min(TILE_WIDTH, size - n * TILE_WIDTH)
        p = entry_bundle_path(n, width)
        entries.extend(parse_entry_bundle(read_tile(source, p, 1 << 26), width))
    nodes = TileNodeSource(size, lambda p: read_tile(source, p, TILE_WIDTH * 32))
    return LogView(size, root, entries, nodes.get_node, str(path))


def view_from_entries(entries: Sequence[bytes], where: str = "memory") -> LogView:
    """A self-consistent log of these entries (as a storage that rewrote history would serve it)."""
    levels = [[leaf_hash(e) for e in entries]]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])
    rng = CompactRange.empty()
    for h in levels[0]:
        rng.append(h)
    return LogView(len(entries), rng.root(), list(entries), lambda lvl, i: levels[lvl][i], where)


# ---- the invariants ---------------------------------------------------------------------------------


def check_invariants(view: LogView, obs: Observed, *, root: TrustRoot, pcr0: bytes) -> list[str]:  # noqa: C901 (over the gate before it existed; split when next changed)
    """Everything the crash tests claim, as a list of problems (empty: all hold). See test_crash.py."""
    problems: list[str] = list(obs.problems)
    size = view.size

    # The stored entries are the tree the final checkpoint signs.
    if len(view.entries) != size:
        problems.append(f"storage holds {len(view.entries)} entries for a tree of {size}")
    rng = CompactRange.empty()
    prefix_roots: dict[int, bytes] = {0: rng.root()}
    for data in view.entries:
        rng.append(leaf_hash(data))
        prefix_roots[rng.size] = rng.root()
    if rng.root() != view.root:
        problems.append(
            f"the stored entries hash to {rng.root().hex()[:16]}, not to the final checkpoint's root "
            f"{view.root.hex()[:16]} ({view.where})"
        )

    records: dict[int, Entry] = {}
    for i, data in enumerate(view.entries):
        try:
            records[i] = parse_entry(data)
        except CloisterError as exc:
            problems.append(f"entry {i} does not parse: {exc}")

    def prove(index: int, what: str) -> None:
        try:
            proof = inclusion_proof(index, size, view.get_node)
            verify_inclusion(leaf_hash(view.entries[index]), index, size, proof, view.root)
        except (CloisterError, ValueError, IndexError) as exc:
            problems.append(f"{what}: entry {index} does not prove into the final checkpoint: {exc}")

    # (c) The chain: a key entry at the start and after every enclave restart, each continuing a real
    # earlier state of this log, with an attestation for this enclave image binding its keys.
    keys = [(i, e) for i, e in records.items() if isinstance(e, KeyEntry)]
    log_keys: set[bytes] = set()
    verifiers: list[Ed25519NoteVerifier] = []
    if not keys or keys[0][0] != 0:
        problems.append("the log does not start with a key entry")
    for i, k in keys:
        log_keys.add(k.log_key)
        if i == 0:
            if k.previous_size is not None:
                problems.append("the first key entry claims a previous state")
        elif k.previous_size is None or k.previous_root is None:
            problems.append(f"key entry {i} continues no previous state")
        elif k.previous_size != i:
            problems.append(f"key entry {i} continues from size {k.previous_size}, not from the entries before it")
        elif prefix_roots.get(k.previous_size) != k.previous_root:
            problems.append(
                f"key entry {i}: previous_root is not the root of the log's first {k.previous_size} entries"
            )
        try:
            policy = AttestationPolicy(root=root, at=DOCUMENT_TIME, expected_pcrs={0: pcr0})
            enclave = verify_enclave(k.attestation, policy)
            if (enclave.binding.log_key, enclave.binding.grant_key) != (k.log_key, k.grant_key):
                problems.append(f"key entry {i}: its attestation binds other keys")
            verifier = enclave.binding.log_verifier()
            if all((v.name, v.key_id) != (verifier.name, verifier.key_id) for v in verifiers):  # one log key
                verifiers.append(verifier)
        except CloisterError as exc:
            problems.append(f"key entry {i}: its attestation does not verify: {exc}")
    # Each enclave start has its own grant key; the log key is one per origin (sealed, decision 0014).
    grant_keys = {k.grant_key for _, k in keys}
    if len(keys) > obs.enclave_starts or len(grant_keys) != len(keys):
        problems.append(
            f"{len(keys)} key entries ({len(grant_keys)} distinct grant keys) for {obs.enclave_starts} enclave starts"
        )
    if len(log_keys) > 1:
        problems.append(f"{len(log_keys)} log keys in one log: the sealed log key is one per origin")
    served_keys = {c.log_key for c in obs.checkpoints if c.log_key is not None}
    if len(keys) < obs.serving_enclaves or not served_keys <= log_keys:
        problems.append(
            f"{len(keys)} key entries, but {obs.serving_enclaves} enclaves served calls and "
            f"{len(served_keys - log_keys)} attested log keys are not introduced by any"
        )

    # Outcomes follow their allowed decision, once.
    closed: Counter[int] = Counter()
    for i, e in records.items():
        if isinstance(e, OutcomeEntry):
            d = records.get(e.decision_index)
            if e.decision_index >= i or not isinstance(d, DecisionEntry) or d.decision != "allow":
                problems.append(f"outcome {i} points to entry {e.decision_index}, not to an earlier allow")
            closed[e.decision_index] += 1
    problems += [f"decision {d} has {n} outcomes" for d, n in closed.items() if n > 1]

    def decision(index: int, agent: str, tool: str, args: dict[str, Any], want: str | None, what: str) -> None:
        e = records.get(index)
        if index >= size:
            problems.append(f"{what}: decision {index} is not in storage (the log has {size} entries)")
        elif not isinstance(e, DecisionEntry):
            problems.append(f"{what}: entry {index} is a {type(e).__name__}, not its decision")
        elif (e.agent, e.server, e.tool, e.args_sha256) != (agent, SERVER, *args_key(tool, args)):
            problems.append(
                f"{what}: entry {index} decides {e.agent}/{e.server}/{e.tool} "
                f"args {e.args_sha256.hex()[:12]}, another call"
            )
        elif want is not None and e.decision != want:
            problems.append(f"{what}: entry {index} is a {e.decision}, the agent was told {want}")
        else:
            prove(index, what)

    # (a) Every acknowledged call: its decision (an allow for exactly this call) and its outcome.
    for g in obs.grants:
        what = g.what
        decision(g.decision, g.agent, g.tool, g.args, "allow", what)
        o = records.get(g.outcome)
        if g.outcome >= size:
            problems.append(f"{what}: outcome {g.outcome} is not in storage (the log has {size} entries)")
        elif not isinstance(o, OutcomeEntry) or o.decision_index != g.decision or o.error:
            problems.append(f"{what}: entry {g.outcome} is not a successful outcome of decision {g.decision}")
        else:
            prove(g.outcome, what)
        if g.checkpoint_size > size:
            problems.append(f"{what}: the relay named a checkpoint of size {g.checkpoint_size} beyond the log")
    for r in obs.refusals:
        want = "deny" if r.code in (-32001, -32002, -32003) else None
        decision(r.log_index, r.agent, r.tool, r.args, want, f"{r.agent} refused {label(r.tool, r.args)} ({r.code})")

    # (b) Every checkpoint ever served is a prefix of the final one.
    for c in obs.checkpoints:
        what = f"a checkpoint served at {c.where} (size {c.size})"
        if c.log_key is not None and c.log_key not in log_keys:
            problems.append(f"{what}: signed by a key that no key entry introduces")
        if c.log_key is None:
            try:
                verify_checkpoint(c.note, verifiers, origin=parse_checkpoint(_note_text(c.note)).origin)
            except CloisterError as exc:
                problems.append(f"{what}: not signed by any key the log introduces: {exc}")
        if c.size > size:
            problems.append(f"{what}: larger than the final log ({size}): it was rolled back")
            continue
        try:
            proof = consistency_proof(c.size, size, view.get_node)
            verify_consistency(c.size, size, proof, c.root, view.root)
        except (CloisterError, ValueError) as exc:
            problems.append(f"{what}: not consistent with the final checkpoint: {exc}")

    # (d) Nothing reached the upstream without an allow for exactly those arguments.
    allows: Counter[tuple[str, bytes]] = Counter(
        (e.tool, e.args_sha256)
        for e in records.values()
        if isinstance(e, DecisionEntry) and e.decision == "allow" and e.server == SERVER
    )
    seen: Counter[tuple[str, bytes]] = Counter()
    for call in obs.forwarded:
        tool, args = call.get("tool"), call.get("args")
        if not isinstance(tool, str) or not isinstance(args, dict):
            problems.append(f"the upstream received {call!r}, which no agent sent")
            continue
        key = args_key(tool, args)
        seen[key] += 1
        if seen[key] > allows[key]:
            problems.append(f"the upstream received {label(tool, args)} without an allow decision in storage")
    problems += [
        f"{g.what} back, but the upstream never received it" for g in obs.grants if args_key(g.tool, g.args) not in seen
    ]
    return problems


def _note_text(note: bytes) -> bytes:
    return note.split(b"\n\n", 1)[0] + b"\n"


def elapsed(t0: float) -> str:
    return f"{time.monotonic() - t0:6.1f}s"


# ---- the chaos ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    target: str  # "enclave", "relay" or "both"
    after_grants: int  # acknowledged calls to wait for once the stack serves again
    delay: float  # then this much more (s), so the kill lands at an arbitrary point of a call
    down: float  # how long the killed process stays down (s)
    # Kill the restarted process(es) again this long after the restart, while they recover (resume the
    # log, recover storage, re-sync), before they serve; then restart once more.
    again: float | None = None


def plan_kills(seed: int, rounds: int) -> list[Kill]:
    """A reproducible schedule. Every target appears at least once when rounds >= 3."""
    import random

    rng = random.Random(seed)
    targets = ["enclave", "relay", "both"] * (rounds // 3 + 1)
    order = targets[:rounds]
    rng.shuffle(order)
    return [
        Kill(
            t,
            rng.randint(10, 80),
            round(rng.uniform(0, 0.3), 3),
            round(rng.uniform(0, 1.0), 2),
            round(rng.uniform(0.05, 1.5), 2) if rng.random() < 0.3 else None,
        )
        for t in order
    ]


async def _wait_grants(obs: Observed, n: int, timeout: float, what: str, stack: ChaosStack) -> None:
    with anyio.move_on_after(timeout):
        while len(obs.grants) < n:  # noqa: ASYNC110 (agents append to a list; polling it is simplest)
            await anyio.sleep(0.05)
        return
    hint = ""
    if "log storage failed" in stack.relay_log_tail(10**7):
        hint = (
            "; the relay's log writer failed (compare test_an_enclave_crash_that_loses_a_response_does_not_"
            "wedge_the_relay, which reproduces one such failure exactly)"
        )
    raise TimeoutError(
        f"{what}: {len(obs.grants)} acknowledged calls after {timeout}s, waiting for {n}{hint}; "
        f"agents saw {dict(obs.errors)}; relay log: {stack.relay_log_tail(1500)}"
    )


async def run_chaos(
    stack: ChaosStack,
    kills: Sequence[Kill],
    obs: Observed,
    *,
    say: Callable[[str], None],
    settle: int = 16,
    timeout: float = 60,
) -> None:
    """Agents call continuously while `kills` happen; returns with the agents stopped, stack up."""
    t0 = time.monotonic()
    stop = anyio.Event()
    root = stack.trust_root()

    def note(text: str) -> None:
        obs.events.append((time.monotonic() - t0, text))
        say(f"{elapsed(t0)} {text} (acknowledged so far: {len(obs.grants)})")

    async def kill(target: str) -> None:
        if target in ("relay", "both"):
            await anyio.to_thread.run_sync(stack.kill_relay)
        if target in ("enclave", "both"):
            await anyio.to_thread.run_sync(stack.kill_enclave)

    async def restart(target: str, *, wait: bool) -> None:
        if target in ("enclave", "both"):
            await anyio.to_thread.run_sync(stack.start_enclave)
        if target in ("relay", "both"):
            await anyio.to_thread.run_sync(stack.start_relay)
            if wait:
                await anyio.to_thread.run_sync(stack.wait_relay_ready)

    async with anyio.create_task_group() as tg:
        for a in stack.agents:
            make_call = sleep_call if a.startswith(SLEEPY) else echo_call
            tg.start_soon(agent_loop, stack.mcp_url, a, stack.token(a), obs, stop, make_call)
        tg.start_soon(lambda: checkpoint_watcher(stack.url, obs, root, stack.pcr0, stop))
        try:
            await _wait_grants(obs, settle, timeout, "warm-up", stack)
            obs.serving_enclaves += 1
            for k in kills:
                await _wait_grants(obs, len(obs.grants) + k.after_grants, timeout, f"before killing {k.target}", stack)
                await anyio.sleep(k.delay)
                await kill(k.target)
                note(f"SIGKILL {k.target}")
                await anyio.sleep(k.down)
                if k.again is not None:
                    await restart(k.target, wait=False)
                    await anyio.sleep(k.again)
                    await kill(k.target)
                    note(f"SIGKILL {k.target} again, {k.again}s into its recovery")
                await restart(k.target, wait=True)
                note(f"restarted {k.target}")
                await _wait_grants(obs, len(obs.grants) + settle, timeout, f"serving again after {k.target}", stack)
                if k.target != "relay":
                    obs.serving_enclaves += 1
            note("done: stopping the agents")
        finally:
            stop.set()
    obs.enclave_starts = stack.enclave_starts


# ---- exact crash points, in-process ---------------------------------------------------------------------


class _Aborted(Exception):
    pass


class _Context:
    """What EnclaveService needs of a grpc.ServicerContext: abort raises (with the status, as gRPC does)."""

    def abort(self, code: Any, details: str) -> None:
        raise _Aborted(code, details)


class InProcessEnclave:
    """cloister.relay.enclave_client.EnclaveClient's interface, answered by the enclave's own gRPC servicer
    (enclave.service.EnclaveService over an EnclaveCore) in this process, with no sockets. A dead
    enclave's lost answers are simply answers the test never hands to the relay."""

    def __init__(self, core: Any) -> None:
        from cloister.enclave.service import EnclaveService

        self.core = core
        self.service = EnclaveService(core)

    def restart(self, core: Any) -> None:
        """SIGKILL and a fresh start: new keys, an empty log (AWAITING_LOG)."""
        from cloister.enclave.service import EnclaveService

        self.core, self.service = core, EnclaveService(core)

    async def _call(self, method: str, request: Any) -> Any:
        from cloister.relay.enclave_client import EnclaveRefused

        try:
            return getattr(self.service, method)(request, _Context())
        except _Aborted as exc:
            raise EnclaveRefused(*exc.args) from exc

    async def health(self, timeout: float | None = None) -> Any:
        from cloister.wire import enclave_pb2 as pb

        return await self._call("Health", pb.HealthRequest())

    async def start_log(self, resume: Any) -> Any:
        from cloister.wire import enclave_pb2 as pb

        return await self._call(
            "StartLog", pb.StartLogRequest(resume=resume) if resume is not None else pb.StartLogRequest()
        )

    async def resume_log(self, start: Any, chunks: Any) -> Any:
        """The streamed resume (ResumeLog): the chunks, after the start, as the servicer's iterator."""
        from cloister.wire import enclave_pb2 as pb

        requests = [pb.ResumeChunk(start=start, first_index=start.range_size)] + [c async for c in chunks]
        return await self._call("ResumeLog", iter(requests))

    async def sync(self, persisted_size: int) -> Any:
        from cloister.wire import enclave_pb2 as pb

        return await self._call("SyncLog", pb.SyncLogRequest(persisted_size=persisted_size))

    async def load_policy(self, bundle: bytes, persisted_size: int) -> Any:
        from cloister.wire import enclave_pb2 as pb

        return await self._call("LoadPolicy", pb.LoadPolicyRequest(bundle=bundle, persisted_size=persisted_size))

    async def authorize(self, request: Any) -> Any:
        return await self._call("Authorize", request)

    async def record_outcome(self, request: Any) -> Any:
        return await self._call("RecordOutcome", request)

    async def attest(self, nonce: bytes, *, include_checkpoint: bool = False) -> Any:
        from cloister.wire import enclave_pb2 as pb

        return await self._call("Attest", pb.AttestRequest(nonce=nonce, include_checkpoint=include_checkpoint))

    async def close(self) -> None:
        pass


class InProcess:
    """The relay's own code (cloister.relay.relay.Relay: its storage, start-up and enclave-restart handling)
    over the enclave's own code (EnclaveCore behind EnclaveService, mock NSM), in one process and with
    no sockets, to reproduce crash points exactly that the process-level chaos only hits by chance
    (e.g. an enclave that dies after sequencing an entry whose answer never reaches the relay)."""

    def __init__(self, tmp: Path, agent: str = "agent-0") -> None:
        from cloister.dev.measure import mock_pcrs
        from cloister.enclave.config import load_config
        from cloister.relay.config import load_relay_config

        self.tmp = tmp
        self.agent = agent
        self.state = ensure_state(tmp / "state", bundle_source=make_bundle(tmp / "bundle", [agent]), witnessed=False)
        self.config = load_config(self.state.enclave_config, mock_nsm=True)
        self.pcrs = mock_pcrs(self.config.raw)
        self.token = self.state.mint_token(agent, ["tester"], 600)
        relay_toml = tmp / "relay.toml"
        relay_toml.write_text(
            f'[relay]\nlisten = "127.0.0.1:1"\nenclave = "unix:{tmp / "unused.sock"}"\n'
            'bundle = "state/bundle.signed"\nstorage = "state/log"\nrun_dir = "run"\n'
        )
        self.relay_config = load_relay_config(relay_toml)
        # The origin's one log key, as every enclave start unseals it from KMS (decision 0014).
        self.log_key = ed25519.Ed25519PrivateKey.generate()

    def new_core(self) -> Any:
        from cloister.dev.mock_nsm import MockNsm
        from cloister.enclave.core import EnclaveCore

        return EnclaveCore(
            self.config,
            MockNsm(self.state.mock_nsm_dir, self.pcrs),
            pcrs=self.pcrs,
            clock_ms=lambda: time.time_ns() // 1_000_000,
            mock_nsm=True,
            log_key=self.log_key,
        )

    async def start_relay(self) -> tuple[Any, InProcessEnclave]:
        """Relay.start without the network: open storage, then bring the enclave to a running log."""
        from cloister.relay.lifecycle import open_storage
        from cloister.relay.relay import Relay

        relay = Relay(self.relay_config)
        enclave = InProcessEnclave(self.new_core())
        relay.state.enclave = enclave  # type: ignore[assignment]
        relay.state.writer = await open_storage(
            self.relay_config.storage, s3_endpoint_url=None, body_retention_days=None
        )
        await relay.lifecycle.ensure_enclave_ready(startup=True)
        return relay, enclave

    async def authorize(self, relay: Any, text: str) -> Any:
        """CallPath.call's step 1: ask the enclave (the answer is persisted separately)."""
        from cloister.wire import enclave_pb2 as pb

        return await relay.state.enclave.authorize(
            pb.AuthorizeRequest(
                token=self.token,
                server=SERVER,
                tool=TOOL,
                arguments_json=json.dumps({"text": text}).encode(),
                request_id=text,
                persisted_size=relay.state.writer.persisted_size,
            )
        )
