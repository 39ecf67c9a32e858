"""Cloister's benchmark: measures, side by side in one run, and prints the figures.

1. tools/call latency and throughput: the same call made directly to an upstream MCP server
   and through relay + enclave, for 1 agent and for 16 concurrent agents (official MCP client).
2. Inside the enclave: decide + limits + append + sign, with 10 ... 10,000 policies and 10,000
   agents (EnclaveCore in-process, mock NSM).
3. The sequencer's append rate, inclusion proofs at 10 million entries, and replay verification.
4. Resume after 10,000 ... 1,000,000 calls: time and enclave memory (scripts/bench_resume.py).

Run with ./scripts/bench (add --quick for a shorter run). Figures vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from cloister.dev.mcp_http import mcp_http_client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


# ---- 1. end to end -------------------------------------------------------------------------------


async def run_calls(url: str, token: str | None, agents: int, calls: int, warmup: int) -> tuple[list[float], float]:
    latencies: list[float] = []

    async def agent(n: int) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        http = mcp_http_client(headers=headers)
        async with Client(streamable_http_client(url, http_client=http), cache=None) as c:
            tool = "refunds___customer_lookup" if token else "customer_lookup"
            for _ in range(warmup):
                await c.call_tool(tool, {"customer_id": "cus_1001"})
            await barrier.wait()
            for _ in range(calls):
                t0 = time.perf_counter()
                r = await c.call_tool(tool, {"customer_id": "cus_1001"})
                latencies.append(time.perf_counter() - t0)
                assert not r.is_error

    barrier = _Barrier(agents)
    async with anyio.create_task_group() as tg:
        for i in range(agents):
            tg.start_soon(agent, i)
        await barrier.all_arrived.wait()
        start = time.perf_counter()
    elapsed = time.perf_counter() - start
    return latencies, elapsed


class _Barrier:
    def __init__(self, n: int) -> None:
        self.n, self.count = n, 0
        self.all_arrived = anyio.Event()

    async def wait(self) -> None:
        self.count += 1
        if self.count == self.n:
            self.all_arrived.set()
        await self.all_arrived.wait()


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(p: subprocess.Popen[bytes]) -> None:
    from cloister.dev.proc import stop_group

    stop_group(p, timeout=20)


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} not listening")


# ---- 2. inside the enclave --------------------------------------------------------------------


def synthetic_bundle(src: Path, dst: Path, policies: int, agents: int) -> None:
    from cloister.dev.state import copy_example_bundle

    copy_example_bundle(dst, src)
    # Only the refunds policies apply to this bundle's servers (the enclave refuses policies that
    # name undeclared servers), plus the generated bulk policies below.
    (dst / "policies" / "research.cedar").unlink()
    (dst / "policies" / "guards.cedar").unlink()
    (dst / "limits.toml").write_text(
        '[[limits]]\nid = "refund-cap"\nkind = "spend"\nper = "agent"\ntools = ["refunds___refund.create"]\n'
        'cost = "argument:amount"\nmax = "1000000000"\nwindow = "1h"\n'
    )
    tools = [f"tool_{i}" for i in range(max(1, policies // 2))]
    roles = "\n".join(f"r{i} = {{}}" for i in range(50))
    agent_lines = "\n".join(
        f'[agents.agent-{i}]\nroles = ["r{i % 50}", "refund-agent"]\nregion = "eu"' for i in range(agents)
    )
    (dst / "entities.toml").write_text(
        f"[roles]\nrefund-agent = {{}}\nresearch-agent = {{}}\nrefund-supervisor = {{}}\n{roles}\n\n"
        f'[agents.refund-bot]\nroles = ["refund-agent"]\nregion = "eu"\n\n{agent_lines}\n\n'
        '[servers.refunds]\nregion = "eu"\ncategory = "payments"\n'
        'tools = ["customer_lookup", "transaction_history", "refund.create", "refund.approve_above_threshold"]\n\n'
        '[servers.bulk]\nregion = "us"\ntools = [' + ", ".join(f'"{t}"' for t in tools) + "]\n"
    )
    extra = []
    for i in range(policies - 4):
        t = tools[i % len(tools)]
        if i % 2:
            extra.append(
                f'@id("p{i}")\npermit (principal in Cloister::Role::"r{i % 50}", '
                f'action == Cloister::Action::"bulk___{t}", resource) when {{ context.input.n < {i} }};'
            )
        else:
            extra.append(
                f'@id("p{i}")\nforbid (principal, action == Cloister::Action::"bulk___{t}", resource) '
                f"when {{ context.input.n == {i} }};"
            )
    (dst / "policies" / "bulk.cedar").write_text("\n".join(extra) + "\n")


def bench_enclave(work: Path, quick: bool) -> list[dict[str, Any]]:
    from datetime import UTC, datetime

    import cedarpy
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from cloister.dev.measure import mock_pcrs
    from cloister.dev.mock_nsm import MockNsm
    from cloister.dev.state import example_bundle_dir
    from cloister.enclave.bundle import read_bundle_dir
    from cloister.enclave.config import load_config
    from cloister.enclave.core import EnclaveCore
    from cloister.verify.bundle import sign_bundle
    from cloister.verify.jwt import encode_jwt

    rows = []
    issuer = ed25519.Ed25519PrivateKey.generate()
    admin = ed25519.Ed25519PrivateKey.generate()
    MockNsm(work / "mock-nsm", {}).root_pem()
    cfg = work / "enclave.toml"
    cfg.write_text(
        f'origin = "bench/log"\nadmin_keys = ["'
        f'{admin.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()}"]\n'
        'trust_root = "mock:mock-nsm/root.pem"\n'
        "unsafe_unwitnessed = true\n"  # the decision path alone, in process (decision 0015)
    )
    sizes = (10, 100, 1000, 10_000)
    for n_policies in sizes:
        d = work / f"bundle-{n_policies}"
        synthetic_bundle(example_bundle_dir(), d, n_policies, 10_000)
        (d / "issuers").mkdir(exist_ok=True)
        (d / "issuers" / "cloister-dev.pem").write_bytes(
            issuer.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        )
        config = load_config(cfg, mock_nsm=True)
        pcrs = mock_pcrs(config.raw)
        core = EnclaveCore(
            config,
            MockNsm(work / "mock-nsm", pcrs),
            pcrs=pcrs,
            clock_ms=lambda: time.time_ns() // 1_000_000,
            mock_nsm=True,
            log_key=ed25519.Ed25519PrivateKey.generate(),  # as if unsealed from KMS (decision 0014)
        )
        core.start_new_log()
        t0 = time.perf_counter()
        core.load_policy(
            sign_bundle(read_bundle_dir(d), 1, admin, origin=config.origin, not_after=int(time.time()) + 86400)
        )
        load_s = time.perf_counter() - t0
        now = int(time.time())

        def token(sub: str, i: int, origin: str = config.origin, now: int = now) -> str:
            claims = {"iss": "cloister-dev", "aud": origin, "sub": sub, "roles": [f"r{i % 50}", "refund-agent"]}
            return encode_jwt({**claims, "iat": now, "exp": now + 3600}, issuer)  # aud: the example issuer's

        tokens = [token(f"agent-{i}", i) for i in range(200)]
        # Agents that make no call before the cold measurement: the first call with a new token.
        cold_tokens = [token(f"agent-{5000 + i}", i) for i in range(300)]
        cases = [
            ("refunds", "refund.create", b'{"customer_id": "c", "amount": 10}'),
            ("bulk", "tool_1", b'{"n": 5}'),
            ("refunds", "customer_lookup", b'{"customer_id": "c"}'),
        ]
        n_calls = 2000 if quick else 6000
        lat: list[float] = []
        cold: list[float] = []
        outcome: list[float] = []
        for i in range(n_calls + 300 + len(cold_tokens)):
            server, tool, args = cases[i % 3]
            is_cold = i >= n_calls + 300  # after the hot calls: each of these agents' first call
            t0 = time.perf_counter()
            v = core.authorize(
                token=cold_tokens[i - n_calls - 300] if is_cold else tokens[i % 200],
                server=server,
                tool=tool,
                arguments_json=args,
                request_id="",
                persisted_size=core.sequencer.size if core.sequencer else 0,
            )
            t1 = time.perf_counter()
            (cold if is_cold else lat if i >= 300 else []).append(t1 - t0)  # the first 300 warm up
            if v.grant and i % 2 and not is_cold:  # every other allowed call reports its outcome
                core.record_outcome(
                    decision_index=v.log_index,
                    result_sha256=bytes(32),
                    error="",
                    duration_us=100,
                    paid_amount="",
                    persisted_size=core.sequencer.size if core.sequencer else 0,
                )
                outcome.append(time.perf_counter() - t1)
        assert core.policy is not None
        rows.append(
            {
                "policies": n_policies,
                "agents": 10_000,
                "p50_us": pct(lat, 50) * 1e6,
                "p99_us": pct(lat, 99) * 1e6,
                "load_s": load_s,
                "slice": core.policy.engine.slice_size("bulk", "tool_1"),
                "cold_p50_us": pct(cold, 50) * 1e6,
                "cold_p99_us": pct(cold, 99) * 1e6,
                "outcome_p50_us": pct(outcome, 50) * 1e6,
                "outcome_p99_us": pct(outcome, 99) * 1e6,
            }
        )
    # The floor at the largest size: Cedar alone on the cases' slices and stores (what the engine
    # hands cedarpy, timed without the engine), and one Ed25519 signature (an allowed call makes two).
    from cloister.enclave.policy import Principal

    engine = core.policy.engine
    who = Principal("agent-1", frozenset({"r1", "refund-agent"}), "cloister-dev")
    requests = []
    for server, tool, args in cases:
        aid = f"{server}___{tool}"
        context = engine._context(who, json.loads(args), None, engine._slice(aid)[1], datetime.now(UTC))
        request = {**engine._request(who, server, aid), "context": context}
        requests.append((request, engine._slice(aid)[0], engine._store(who, aid)._inner))
    cedar, sign, key = [], [], ed25519.Ed25519PrivateKey.generate()
    for i in range(3000):
        request, policies, store = requests[i % 3]
        t0 = time.perf_counter()
        cedarpy._internal.is_authorized_batch([request], policies, store, None, False)
        t1 = time.perf_counter()
        key.sign(b"%d" % i * 40)
        cedar.append(t1 - t0)
        sign.append(time.perf_counter() - t1)
    last = rows[-1]
    print(f"Inside the enclave, {last['policies']:,} policies, p50 / p99 in us:")
    outcome_us, cold_us = (last["outcome_p50_us"], last["outcome_p99_us"]), (last["cold_p50_us"], last["cold_p99_us"])
    print("  record_outcome (entry, append, checkpoint signature): {:.0f} / {:.0f}".format(*outcome_us))
    print("  an agent's first call (token verified, its entity store built): {:.0f} / {:.0f}".format(*cold_us))
    print(
        f"  floor parts: Cedar alone on the call's slice {pct(cedar, 50) * 1e6:.0f} / {pct(cedar, 99) * 1e6:.0f}; "
        f"one Ed25519 signature {pct(sign, 50) * 1e6:.0f} / {pct(sign, 99) * 1e6:.0f} (an allowed call signs twice)",
        flush=True,
    )
    return rows


def bench_log(quick: bool) -> dict[str, float]:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from cloister.enclave.sequencer import Sequencer
    from cloister.verify.merkle import (
        CompactRange,
        compact_range_hashes,
        inclusion_proof,
        leaf_hash,
        node_hash,
        verify_inclusion,
    )
    from cloister.verify.note import Ed25519NoteSigner

    out: dict[str, float] = {}
    seq = Sequencer(
        "bench/log",
        Ed25519NoteSigner("bench/log", ed25519.Ed25519PrivateKey.generate()),
        max_pending=10**9,
        max_pending_bytes=1 << 40,
    )
    entry = b"\xa1" + b"x" * 200
    n = 100_000 if quick else 300_000
    t0 = time.perf_counter()
    for i in range(n):
        seq.append(entry)
        if i % 1000 == 999:
            seq.release(i)
            seq.checkpoint_covering(i + 1)
    out["sequencer_entries_per_s"] = n / (time.perf_counter() - t0)

    # Inclusion proofs at 10 million entries. A tree whose leaves are all equal is a real,
    # consistent Merkle tree (every perfect subtree of a level has the same hash), so proofs
    # have their full shape and verify against its root.
    size = 10_000_000
    levels = [leaf_hash(b"entry")]
    for _ in range(24):
        levels.append(node_hash(levels[-1], levels[-1]))

    def get_node(level: int, index: int) -> bytes:
        return levels[level]

    samples = []
    for i in range(200):
        index = (i * 7_919_993) % size
        t0 = time.perf_counter()
        proof = inclusion_proof(index, size, get_node)
        samples.append(time.perf_counter() - t0)
        assert proof
    out["inclusion_proof_10M_p99_ms"] = pct(samples, 99) * 1000
    # Generate and verify proofs at 10M against the root of the same synthetic tree.
    root = CompactRange.from_hashes(size, compact_range_hashes(size, get_node)).root()
    samples = []
    for i in range(200):
        index = (i * 7_919_993 + 11) % size
        t0 = time.perf_counter()
        verify_inclusion(get_node(0, index), index, size, inclusion_proof(index, size, get_node), root)
        samples.append(time.perf_counter() - t0)
    out["inclusion_generate_and_verify_10M_p99_ms"] = pct(samples, 99) * 1000
    return out


def main() -> int:
    import logging

    # Building the example servers in-process (for their pins) turns on the SDK's INFO logging.
    for noisy in ("httpx", "httpx2", "mcp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer calls; noisier figures")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--only-witness", action="store_true", help="only the witnessing figures")
    p.add_argument("--only-observe", action="store_true", help="only the observability figures")
    p.add_argument("--only-e2e", action="store_true", help="only direct vs governed (latency, calls/s, CPU)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cloister-bench-"))
    print(
        f"Cloister benchmark ({'quick' if args.quick else 'full'}); machine: {os.cpu_count()} CPUs; work dir {work}\n",
        flush=True,
    )
    if args.only_observe or not (args.only_witness or args.only_e2e):
        import bench_observe  # metrics, call log, traces: their cost per call (decision 0020)

        (work / "observe").mkdir()
        bench_observe.report(work / "observe", args.quick, e2e=not args.skip_e2e)
        if args.only_observe:
            return 0
    if not args.skip_e2e and not args.only_e2e:
        import bench_witness

        (work / "witnessing").mkdir()
        bench_witness.report(work / "witnessing", args.quick)
        if args.only_witness:
            return 0
    if not args.skip_e2e:
        import bench_e2e  # direct vs governed, CPU per call per process (issue 13)

        (work / "e2e").mkdir()
        bench_e2e.report(work / "e2e", args.quick)
        if args.only_e2e:
            return 0
    rows = bench_enclave(work, args.quick)
    print("Inside the enclave: decide + limits + append + sign (grant and checkpoint), 10,000 agents:")
    print(f"  {'policies':>8} {'slice':>6} {'p50':>9} {'p99':>9} {'bundle load':>12}")
    for row in rows:
        print(
            f"  {row['policies']:8} {row['slice']:6} {row['p50_us']:7.0f} us {row['p99_us']:7.0f} us "
            f"{row['load_s']:10.2f} s"
        )
    print("  (target: p99 <= 100 us at 10,000 policies; 'slice' = policies evaluated for one tool)\n", flush=True)
    log = bench_log(args.quick)
    print("Log:")
    print(f"  sequencer: {log['sequencer_entries_per_s']:,.0f} entries/s (target >= 20,000)")
    print(
        f"  inclusion proof at 10M entries: p99 {log['inclusion_proof_10M_p99_ms']:.3f} ms to generate, "
        f"{log['inclusion_generate_and_verify_10M_p99_ms']:.3f} ms to generate and verify (target <= 1 ms)"
    )
    entries = 200_000 if args.quick else 1_000_000
    print(
        f"\nReplay verification ({entries:,} entries; `cloister audit replay`, target >= 500,000 entries/s):",
        flush=True,
    )
    out = subprocess.run(
        [sys.executable, "-m", "tests.audit.bench_replay", "--entries", str(entries), "--dir", str(work / "replay")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in (out.stdout + out.stderr).splitlines():
        print(f"  {line}")
    sizes = "10000,100000" if args.quick else "10000,100000,1000000"
    print(
        "\nResume after N calls (scripts/bench_resume.py: newest snapshot + the entries after it, in chunks;"
        " target: flat time and memory):",
        flush=True,
    )
    out = subprocess.run(
        [sys.executable, "scripts/bench_resume.py", "--sizes", sizes],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in (out.stdout + out.stderr).splitlines():
        print(line)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
