"""`cloister up [--config FILE] [--state DIR]`: the whole stack in the foreground, mock NSM.

Starts the enclave (mock NSM, AF_UNIX standing in for vsock), the example upstream servers
and the relay; prints the agents' MCP URL, the log URL, the mock trust root, PCR0 and a
ready token per example agent; stops everything on Ctrl-C or SIGTERM, or when any part dies.
`--config` takes a relay config (TOML) whose [[upstreams]] replace the example servers.
The relay gets the state's admin token (/admin/*), auditor token (stored bodies) and the
auditor's X25519 public key (bodies are stored sealed to it); `up` prints where they are.
Two local C2SP witnesses (`cloister witness serve`, state under <state>/witnesses, outside the
log's storage) cosign the relay's checkpoints; `up` prints their vkeys and the audit command
that pins them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

EXAMPLE_AGENTS = {"refund-bot": ["refund-agent"], "research-bot": ["research-agent"]}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "up", help="run the embedded default: enclave (mock NSM), relay, example servers"
    )
    p.add_argument("--state", type=Path, default=None, help="state directory (default .cloister or $CLOISTER_STATE)")
    p.add_argument(
        "--config", type=Path, default=None, help="a relay config whose [[upstreams]] replace the example servers"
    )
    p.add_argument("--bundle", type=Path, default=None, help="a policy bundle directory (default: the example)")
    p.add_argument("--host", default="127.0.0.1", help="address the relay listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8440, help="relay port (default 8440; 0 picks a free one)")
    p.add_argument("--token-ttl", type=int, default=86400, help="lifetime of the printed tokens (seconds)")
    p.add_argument(
        "--wait-for-witness",
        action="store_true",
        help="forward refunds calls only once the witnesses cosigned their decisions (decision 0015)",
    )
    p.add_argument(
        "--unsafe-unwitnessed",
        action="store_true",
        help="UNSAFE: no witnesses; a restored copy of storage would be continued (for measurements)",
    )
    p.set_defaults(handler=_run)


class Stack:
    """The child processes of `cloister up`, stopped together."""

    def __init__(self, log_dir: Path) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.optional: set[str] = set()
        self.log_dir = log_dir
        self.stopping = threading.Event()

    def start(
        self, name: str, argv: list[str], *, ready_line: bool = False, critical: bool = True
    ) -> subprocess.Popen[bytes]:
        logf = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE if ready_line else logf, stderr=logf, start_new_session=True
        )
        self.procs.append((name, proc))
        if not critical:
            # Upstream servers may be restarted or redeployed under us; the relay copes with that.
            self.optional.add(name)
        return proc

    def stop(self) -> None:
        self.stopping.set()
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def dead(self) -> str | None:
        for name, proc in self.procs:
            if name not in self.optional and proc.poll() is not None:
                log = self.log_dir / f"{name}.log"
                lines = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                last = "".join(f"\n    {line}" for line in lines)
                return f"{name} exited with status {proc.returncode}; the end of {log}:{last}"
        return None


def _kms_key(kms_dir: Path, mock_root: Path, pcr0s: list[bytes]) -> str:
    """The KMS stand-in's key for the sealed log key: created on the first run; its policy names
    this image's PCR0 and the predecessors the enclave config pins (so a code edit, which `up`
    pins as a predecessor, keeps the log key)."""
    from cloister.dev.kms import LocalKms, log_key_policy
    from cloister.verify.attestation import TrustRoot

    kms = LocalKms(kms_dir, trust_root=TrustRoot.from_pem(mock_root.read_bytes()), clock=lambda: datetime.now(UTC))
    id_file = kms_dir / "key-id"
    policy = log_key_policy(list(dict.fromkeys(pcr0s)))
    if id_file.exists():
        key_id = id_file.read_text().strip()
        kms.put_key_policy(key_id, policy)
    else:
        key_id = kms.create_key(policy)
        id_file.write_text(key_id + "\n")
    return key_id


def unsealable_log(log_dir: Path) -> str | None:
    """Why the stored dev log cannot be resumed, or None. A log written before the sealed log key
    (decision 0014) was signed with a new key at every start and has no sealed seed
    (`kms/sealed-seed`): no enclave can unseal the key that signed it, so the relay would refuse it."""
    from cloister.relay.lifecycle import SEALED_SEED_OBJECT

    wal = log_dir / "wal"
    stored = (log_dir / "checkpoint").exists() or (wal.is_dir() and any(wal.iterdir()))
    if not stored or (log_dir / SEALED_SEED_OBJECT).exists():
        return None
    return (
        f"the log in {log_dir} was written with a new log key at every start (before the sealed log key) "
        f"and cannot be resumed; to start fresh, move it away (mv {log_dir} {log_dir}.old) or use another --state"
    )


def _wait_ready_line(proc: subprocess.Popen[bytes], timeout: float, what: str = "the enclave") -> dict[str, Any]:
    assert proc.stdout is not None
    result: dict[str, Any] = {}

    def read(stream: IO[bytes]) -> None:
        line = stream.readline()
        if line:
            result.update(json.loads(line))

    t = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise RuntimeError(f"{what} did not become ready")
    return result


def _wait_http(url: str, timeout: float, stack: Stack) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (why := stack.dead()) is not None:
            raise RuntimeError(why)
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (local URL we built)
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready within {timeout:g}s")


def _wait_granting(url: str, timeout: float, stack: Stack) -> None:
    """Wait until the enclave grants: the witnesses cosigned its start (decision 0015). A log older
    than what the witnesses have cosigned (a restored copy) never gets there: say why and stop."""
    deadline = time.monotonic() + timeout
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if (why := stack.dead()) is not None:
            raise RuntimeError(why)
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (local URL we built)
                health = json.loads(resp.read())
        except OSError:
            health = {}
        if health.get("granting"):
            return
        witnesses = (health.get("witnessing") or {}).get("witnesses", {})
        ahead = {name: w["ahead_of_log"] for name, w in witnesses.items() if w.get("ahead_of_log")}
        if ahead:
            raise RuntimeError(
                f"refusing to continue this log: the witnesses have cosigned a larger log than storage holds "
                f"({', '.join(f'{n} at size {s}' for n, s in sorted(ahead.items()))}; storage has "
                f"{health.get('log_size')}). Storage was rolled back, or another enclave ran on a copy; "
                "the enclave grants nothing on it (decision 0015). Put the newest copy of the log back"
            )
        time.sleep(0.2)
    gate = (health.get("witness_gate") or {}).get("reason", "no answer from the relay")
    errors = [
        f"{name}: {w['last_error']}"
        for name, w in (health.get("witnessing") or {}).get("witnesses", {}).items()
        if w.get("last_error")
    ]
    raise RuntimeError(
        f"the enclave does not grant after {timeout:g}s: {gate}"
        + (f"; witnesses: {'; '.join(errors)}" if errors else "")
        + ". If the witnesses have cosigned a larger log than storage holds, storage was rolled back: "
        "the enclave refuses to continue it (put the newest copy back)"
    )


def _toml_str(value: str) -> str:
    return json.dumps(value)


def _run(args: argparse.Namespace) -> int:
    from cloister.dev.measure import mock_pcrs
    from cloister.dev.state import default_state_dir, ensure_state, free_port, research_artifact
    from cloister.enclave.config import load_config

    if args.unsafe_unwitnessed:
        print("cloister up: UNSAFE: running without witnesses (--unsafe-unwitnessed)", file=sys.stderr)
    state = ensure_state(
        (args.state or default_state_dir()).resolve(), bundle_source=args.bundle, witnessed=not args.unsafe_unwitnessed
    )
    why = unsealable_log(state.log_dir)
    if why is not None:
        print(f"cloister up: {why}", file=sys.stderr)
        return 1
    config = load_config(state.enclave_config, mock_nsm=True)
    pcr0 = mock_pcrs(config.raw)[0].hex()
    kms_key_id = _kms_key(state.root / "kms", state.mock_root, [bytes.fromhex(pcr0), *sorted(config.predecessor_pcr0)])
    kms_port = free_port()
    logs = state.root / "logs"
    logs.mkdir(exist_ok=True)
    py = sys.executable
    relay_port = args.port or free_port(args.host)
    witnesses = (
        []
        if args.unsafe_unwitnessed
        else [(name, directory, vkey, free_port()) for name, directory, vkey in state.ensure_witnesses()]
    )
    upstream_tables: list[str] = []
    refunds_port = 0
    if args.config is not None:
        custom = tomllib.loads(args.config.read_text("utf-8"))
        for u in custom.get("upstreams", []):
            lines = [f"{k} = {json.dumps(v)}" for k, v in u.items()]
            upstream_tables.append("[[upstreams]]\n" + "\n".join(lines))
    else:
        refunds_port = free_port()
        upstream_tables = [
            f'[[upstreams]]\nname = "refunds"\nurl = "http://127.0.0.1:{refunds_port}/mcp"\ntimeout_s = 30'
            + ("\nwait_for_witness = true" if args.wait_for_witness else ""),
            f'[[upstreams]]\nname = "research"\ncommand = [{_toml_str(py)}, "-m", "cloister.dev.examples.research"]\n'
            f"artifact = {_toml_str(str(research_artifact()))}\ntimeout_s = 30",
        ]
    public = f"http://{args.host}:{relay_port}"
    state.relay_config.write_text(
        "# Written by `cloister up`.\n[relay]\n"
        f'listen = "{args.host}:{relay_port}"\npublic_url = "{public}"\n'
        f'enclave = "unix:{state.run_dir / "enclave.vsock"}"\n'
        'bundle = "bundle.signed"\nstorage = "log"\nrun_dir = "run"\n'
        'trust_root = "mock:mock-nsm/root.pem"\n'
        f"admin_token_file = {_toml_str(state.admin_token_file.name)}\n"
        f"auditor_token_file = {_toml_str(state.auditor_token_file.name)}\n"
        f"body_encryption_public_key = {_toml_str(str(state.body_public_key_file.relative_to(state.root)))}\n"
        f"keep_denied_arguments = false\nwitness_quorum = {len(witnesses)}\n\n"
        + "\n\n".join(upstream_tables + _witness_tables(witnesses))
        + f'\n\n[kms]\nkey_id = "{kms_key_id}"\nendpoint_url = "http://127.0.0.1:{kms_port}"\n'
    )

    stack = Stack(logs)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        kms = stack.start(
            "kms",
            [
                py,
                "-m",
                "cloister.dev.kms",
                "serve",
                "--state",
                str(state.root / "kms"),
                "--port",
                str(kms_port),
                "--root",
                str(state.mock_root),
            ],
            ready_line=True,
        )
        _wait_ready_line(kms, 30, "the KMS stand-in")
        enclave = stack.start(
            "enclave",
            [
                py,
                "-m",
                "cloister.dev.enclave",
                "--listen",
                f"unix:{state.run_dir / 'enclave.vsock'}",
                "--config",
                str(state.enclave_config),
                "--mock-nsm",
                str(state.mock_nsm_dir),
            ],
            ready_line=True,
        )
        ready = _wait_ready_line(enclave, 60)
        refunds_argv = [
            py,
            "-m",
            "cloister.dev.examples.refunds",
            "--port",
            str(refunds_port),
            "--trust-root",
            str(state.mock_root),
            "--expect-pcr0",
            pcr0,
            "--mock-nsm",
            str(state.mock_nsm_dir),
        ]
        if refunds_port:
            refunds = stack.start("refunds", refunds_argv, critical=False)
            _wait_port(refunds_port, 30, stack)
        stack.start(
            "relay",
            [
                py,
                "-m",
                "cloister.cli",
                "relay",
                "--config",
                str(state.relay_config),
                *(["-v"] if os.environ.get("CLOISTER_DEBUG") else []),
            ],
        )
        _wait_http(f"http://127.0.0.1:{relay_port}/healthz", 90, stack)
        if witnesses:
            _start_witnesses(stack, state.witnesses_dir, witnesses, f"http://127.0.0.1:{relay_port}")
        _wait_granting(f"http://127.0.0.1:{relay_port}/healthz", 30, stack)
    except (RuntimeError, OSError) as exc:
        print(f"cloister up: {exc}", file=sys.stderr)
        stack.stop()
        return 1

    tokens_dir = state.root / "tokens"
    tokens_dir.mkdir(exist_ok=True)
    tokens = {}
    for agent, roles in EXAMPLE_AGENTS.items():
        tokens[agent] = state.mint_token(agent, roles, args.token_ttl)
        (tokens_dir / f"{agent}.jwt").write_text(tokens[agent] + "\n")
    info = {
        "mcp_url": f"{public}/mcp",
        "log_url": f"{public}/log",
        "attestation_url": f"{public}/attestation",
        "trust_root": str(state.mock_root),
        "pcr0": pcr0,
        "origin": ready.get("origin"),
        "refunds_url": f"http://127.0.0.1:{refunds_port}/mcp" if refunds_port else None,
        "refunds_pid": refunds.pid if refunds_port else None,
        "refunds_argv": refunds_argv[1:],
        "state": str(state.root),
        "tokens": {a: str(tokens_dir / f"{a}.jwt") for a in tokens},
        "admin_token_file": str(state.admin_token_file),
        "auditor_token_file": str(state.auditor_token_file),
        "body_key": str(state.body_key_file),
    }
    info["witnesses"] = [{"name": n, "url": f"http://127.0.0.1:{port}", "vkey": v} for n, _d, v, port in witnesses]
    info["witness_quorum"] = len(witnesses)
    (state.root / "up.json").write_text(json.dumps(info, indent=2) + "\n")
    witness_flags = "".join(f" \\\n                    --witness {n}={v}" for n, _d, v, _p in witnesses)
    witness_flags += f" --quorum {len(witnesses)}" if witnesses else ""
    print(f"""Cloister is up (mock NSM: for development only). State: {state.root}

  Agents' MCP endpoint   {info["mcp_url"]}
  Log (C2SP tlog-tiles)  {info["log_url"]}/  (open it in a browser: the read-only audit page)
  Metrics, health        {public}/metrics  {public}/livez  {public}/readyz
  Attestation            {public}/attestation?nonce=<hex>
  Mock trust root        {state.mock_root}
  Enclave PCR0           {pcr0}
  KMS key (stand-in)     {kms_key_id}  (seals the log key to this PCR0 and its pinned predecessors)
  Log origin             {info["origin"]}
""")
    if refunds_port:
        print(f"  Upstream 'refunds'     {info['refunds_url']} (mock Nitro enclave; verifies grants)")
        print("  Upstream 'research'    stdio, launched by the relay after its checksum verifies\n")
    print(f"  Witnesses (C2SP tlog-witness; the relay sends them checkpoints, quorum {len(witnesses)}):")
    for name, _directory, vkey, port in witnesses:
        print(f"    {name}  http://127.0.0.1:{port}  {vkey}")
    print("  Tokens (send as 'Authorization: Bearer <token>'):")
    for agent, token in tokens.items():
        print(f"    {agent:13} {token}")
    print(
        f"""
  Admin token     {state.admin_token_file}  (/admin/*: cloister policy push --admin-token-file ...)
  Auditor token   {state.auditor_token_file}  (GET /log/body/...: bodies go to nobody else)
  Body key        {state.body_key_file}  (X25519: the relay stores bodies sealed to its public half)

  Audit the log:  cloister audit checkpoint --log {info["log_url"]} --trust-root {state.mock_root} \\
                    --expect-pcr 0={pcr0}{witness_flags}
  Replay it all:  cloister audit replay --log {info["log_url"]} --trust-root {state.mock_root} \\
                    --expect-pcr 0={pcr0} --json
  Evidence file:  cloister audit report --log {info["log_url"]} --trust-root {state.mock_root} \\
                    --expect-pcr 0={pcr0}{witness_flags} \\
                    --format html -o cloister-report.html
  Read a body:    cloister audit body --log {info["log_url"]} --trust-root {state.mock_root} --index N \\
                    --auditor-token-file {state.auditor_token_file} --key {state.body_key_file}
Logs of each process are in {logs}. Press Ctrl-C to stop.""",
        flush=True,
    )
    while not stopping.is_set():
        if (why := stack.dead()) is not None:
            print(f"cloister up: {why}; stopping everything", file=sys.stderr)
            stack.stop()
            return 1
        stopping.wait(0.5)
    print("stopping...", file=sys.stderr)
    stack.stop()
    return 0


def _wait_port(port: int, timeout: float, stack: Stack) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (why := stack.dead()) is not None:
            raise RuntimeError(why)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:g}s")


def _witness_tables(witnesses: list[tuple[str, Path, str, int]]) -> list[str]:
    return [
        f'[[witnesses]]\nname = {_toml_str(name)}\nurl = "http://127.0.0.1:{port}"\nvkey = {_toml_str(vkey)}'
        for name, _directory, vkey, port in witnesses
    ]


def _start_witnesses(stack: Stack, root: Path, witnesses: list[tuple[str, Path, str, int]], relay: str) -> None:
    """Start the local witnesses, following the log key the enclave reports. The log key is one per
    origin, unsealed from the KMS stand-in at every enclave start (decision 0014), so it is the
    same from run to run; the witnesses' logs file is still rewritten each time `up` runs, from
    what the relay reports, so it always names the key in use."""
    with urllib.request.urlopen(f"{relay}/healthz", timeout=5) as resp:  # noqa: S310 (local URL we built)
        enclave = json.loads(resp.read())["enclave"]
    logs = root / "logs.toml"
    logs.write_text(
        "# Written by `cloister up`: the log the local witnesses follow.\n[[log]]\n"
        f"origin = {_toml_str(enclave['origin'])}\nvkeys = [{_toml_str(enclave['log_verifier_key'])}]\n"
    )
    py = sys.executable
    for i, (_name, directory, _vkey, port) in enumerate(witnesses, 1):
        argv = [py, "-m", "cloister.cli", "witness", "serve", "--state", str(directory)]
        stack.start(f"witness-{i}", [*argv, "--listen", f"127.0.0.1:{port}", "--logs", str(logs)])
    for *_, port in witnesses:
        _wait_port(port, 30, stack)
