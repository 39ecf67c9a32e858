"""The refund scenario, driven end to end: `python -m cloister.dev.examples.demo` (./scripts/demo).

Starts `cloister up` on a fresh state directory, drives two agents through the official MCP
client, prints a transcript, then audits the log: it fetches an attested checkpoint with a
fresh nonce, verifies it against the mock trust root and the enclave's PCR0, and proves every
call's decision and outcome entries into it. Stops everything it started; exits non-zero if
anything did not behave as the scenario says.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from cloister.dev.examples.payments import USDC_DECIMALS
from cloister.dev.examples.payments import payment as example_payment
from cloister.dev.mcp_http import mcp_http_client
from cloister.dev.proc import stop_group
from cloister.verify.attestation import DOCUMENT_TIME, AttestationPolicy, TrustRoot
from cloister.verify.checkpoint import verify_checkpoint
from cloister.verify.enclave_identity import verify_enclave
from cloister.verify.entries import DecisionEntry, OutcomeEntry, parse_entry
from cloister.verify.merkle import leaf_hash, verify_inclusion
from cloister.verify.tiles import entry_bundle_path, parse_entry_bundle
from cloister.verify.x402 import amount_of

GREEN, RED, DIM, BOLD, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[1m", "\033[0m"


def _color() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def say(text: str = "", style: str = "") -> None:
    print(f"{style}{text}{RESET}" if style and _color() else text, flush=True)


@dataclass
class Transcript:
    calls: list[tuple[str, int]] = field(default_factory=list)  # (label, log index) to prove
    failures: list[str] = field(default_factory=list)

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
            say(f"    UNEXPECTED: {what}", RED)


class Agent:
    def __init__(self, name: str, url: str, token: str) -> None:
        self.name, self.url, self.token = name, url, token

    def client(self) -> Client:
        http = mcp_http_client(headers={"Authorization": f"Bearer {self.token}"})
        return Client(streamable_http_client(self.url, http_client=http), cache=None)


def _denied(
    t: Transcript, agent: str, tool: str, shown: str, message: str, data: dict[str, Any], *, expect: str, why: str
) -> None:
    say(f"  {agent:13} {tool}({shown})", BOLD)
    say(f"    -> DENIED  {message}", RED)
    if "log_index" in data:
        t.calls.append((f"{agent} {tool} (denied)", int(data["log_index"])))
        say(f"       logged as entry {data['log_index']}", DIM)
    t.expect(expect in ("deny", "any"), f"{agent} {tool} should have been allowed ({why}): {message}")
    if expect == "deny" and why:
        t.expect(why in message, f"{agent} {tool}: the denial should mention {why!r}: {message}")


async def call(
    t: Transcript, client: Client, agent: str, tool: str, args: dict[str, Any], *, expect: str, why: str = ""
) -> dict[str, Any] | None:
    if expect == "quiet":
        with contextlib.suppress(MCPError):
            await client.call_tool(tool, args)
        return None
    shown = json.dumps(args)
    try:
        result = await client.call_tool(tool, args)
    except MCPError as exc:  # token, unknown names, enclave unavailable: JSON-RPC errors (decision 0018)
        data = exc.data if isinstance(exc.data, dict) else {}
        _denied(t, agent, tool, shown, exc.message, data, expect=expect, why=why)
        return None
    denial = (result.meta or {}).get("dev.cloister/denial")
    if isinstance(denial, dict):  # a denial the model can act on: an isError result, data in _meta
        text = " ".join("".join(getattr(c, "text", "") for c in result.content).split())
        _denied(t, agent, tool, shown, text, denial, expect=expect, why=why)
        return None
    meta = (result.meta or {}).get("dev.cloister/log", {})
    text = " ".join("".join(getattr(c, "text", "") for c in result.content).split())[:140]
    say(f"  {agent:13} {tool}({shown})", BOLD)
    say(f"    -> {'error' if result.is_error else 'OK'}  {text}", RED if result.is_error else GREEN)
    if meta:
        say(f"       decision logged as entry {meta['decision']}, outcome as entry {meta['outcome']}", DIM)
        t.calls.append((f"{agent} {tool} (decision)", int(meta["decision"])))
        t.calls.append((f"{agent} {tool} (outcome)", int(meta["outcome"])))
    t.expect(
        expect == "any" or (expect == "allow" and not result.is_error),
        f"{agent} {tool} should have been denied: {text}",
    )
    return dict(result.structured_content) if result.structured_content else None


def _paid_denied(t: Transcript, message: str, data: dict[str, Any], *, expect: str, why: str) -> None:
    say(f"    -> DENIED  {message}", RED)
    if "log_index" in data:
        t.calls.append(("research-bot deep_search (denied)", int(data["log_index"])))
    t.expect(expect == "deny" and why in message, f"paid deep_search: {message}")


async def paid_call(t: Transcript, client: Client, payment: dict[str, Any], *, expect: str, why: str = "") -> None:
    args = {"query": "attestation"}
    value = payment["payload"]["authorization"]["value"]
    network = payment["accepted"]["network"]
    paying = f"{amount_of(int(value), USDC_DECIMALS)} USDC (x402 exact: value {value} on {network})"
    say(f"  research-bot  research___deep_search({json.dumps(args)}) paying {paying}", BOLD)
    try:
        result = await client.call_tool("research___deep_search", args, meta={"x402/payment": payment})  # type: ignore[arg-type]
    except MCPError as exc:
        _paid_denied(t, exc.message, exc.data if isinstance(exc.data, dict) else {}, expect=expect, why=why)
        return
    denial = (result.meta or {}).get("dev.cloister/denial")
    if isinstance(denial, dict):  # the default shape of a denial (decision 0018)
        text = " ".join("".join(getattr(c, "text", "") for c in result.content).split())
        _paid_denied(t, text, denial, expect=expect, why=why)
        return
    meta = (result.meta or {}).get("dev.cloister/log", {})
    say(
        f"    -> OK  paid; decision entry {meta.get('decision')} charged it, outcome entry {meta.get('outcome')} "
        "records it",
        GREEN,
    )
    t.calls += [
        ("research-bot deep_search (decision)", int(meta["decision"])),
        ("research-bot deep_search (outcome)", int(meta["outcome"])),
    ]
    t.expect(expect == "allow", "the paid call should have been refused")


async def run_agents(info: dict[str, Any], tokens: dict[str, str], t: Transcript) -> None:
    url = info["mcp_url"]
    refund = Agent("refund-bot", url, tokens["refund-bot"])
    research = Agent("research-bot", url, tokens["research-bot"])

    say("\n== Discovery: each agent sees only what its policy lets it call", BOLD)
    async with refund.client() as rc, research.client() as sc:
        r_tools = sorted(tool.name for tool in (await rc.list_tools()).tools)
        s_tools = sorted(tool.name for tool in (await sc.list_tools()).tools)
        say(f"  refund-bot   sees {r_tools}")
        say(f"  research-bot sees {s_tools}")
        t.expect(
            r_tools == ["refunds___customer_lookup", "refunds___refund.create", "refunds___transaction_history"],
            "refund-bot's tool list",
        )
        t.expect(
            s_tools == ["research___deep_search", "research___web_search"],
            "research-bot's tool list (no refunds server at all)",
        )

        say("\n== Allowed calls go upstream with an enclave grant", BOLD)
        await call(t, rc, "refund-bot", "refunds___customer_lookup", {"customer_id": "cus_1001"}, expect="allow")
        await call(t, rc, "refund-bot", "refunds___transaction_history", {"customer_id": "cus_1001"}, expect="allow")
        await call(
            t, sc, "research-bot", "research___web_search", {"query": "nitro enclaves attestation"}, expect="allow"
        )

        say("\n== Refunds: $1,000 at a time against a $10,000/hour cap", BOLD)
        for i in range(10):
            await call(
                t,
                rc,
                "refund-bot",
                "refunds___refund.create",
                {"customer_id": "cus_1001", "amount": 1000, "reason": f"demo refund {i + 1}"},
                expect="allow",
            )
        say("\n== Denials, each with its reason", BOLD)
        await call(
            t,
            rc,
            "refund-bot",
            "refunds___refund.create",
            {"customer_id": "cus_1001", "amount": 1000, "reason": "the 11th thousand"},
            expect="deny",
            why="refund-bot-hourly-refunds",
        )
        await call(
            t,
            rc,
            "refund-bot",
            "refunds___refund.approve_above_threshold",
            {"refund_id": "re_0001"},
            expect="deny",
            why="approvals-need-a-supervisor",
        )
        await call(
            t,
            sc,
            "research-bot",
            "refunds___customer_lookup",
            {"customer_id": "cus_1001"},
            expect="deny",
            why="no policy permits",
        )
        await call(
            t,
            sc,
            "research-bot",
            "research___db_write",
            {"key": "k", "value": "v"},
            expect="deny",
            why="no policy permits",
        )

        say("\n== x402: a paid tool, and a daily cap on what research-bot may pay", BOLD)
        await call(
            t,
            sc,
            "research-bot",
            "research___deep_search",
            {"query": "attestation"},
            expect="deny",
            why="payment required",
        )
        # Each payment is a signed EIP-3009 authorisation (a mock one here); the enclave prices it from
        # the asset the bundle names for research (USDC, 6 decimals) and binds it into the grant.
        now = int(time.time())
        for n in range(2):
            await paid_call(t, sc, example_payment("0.05", now_s=now, nonce=f"demo-{n}"), expect="allow")
        await paid_call(
            t, sc, example_payment("0.05", now_s=now, nonce="demo-2"), expect="deny", why="research-daily-payments"
        )

    if info.get("refunds_url"):
        say("\n== A direct call to the refunds server, skipping the enclave", BOLD)
        async with Client(info["refunds_url"], cache=None) as direct:
            try:
                await direct.call_tool("refund.create", {"customer_id": "cus_1001", "amount": 5000})
                t.expect(False, "the refunds server accepted a call without a grant")
            except MCPError as exc:
                say(f"  (no grant)    refund.create -> REFUSED  {exc.message}", RED)
                t.expect("grant refused" in exc.message, "the refusal names the missing grant")
            forged = {
                "dev.cloister/grant": base64.b64encode(secrets.token_bytes(120)).decode(),
                "dev.cloister/attestation": base64.b64encode(b"not a document").decode(),
            }
            try:
                await direct.call_tool("refund.create", {"customer_id": "cus_1001", "amount": 5000}, meta=forged)  # type: ignore[arg-type]
                t.expect(False, "the refunds server accepted a forged grant")
            except MCPError as exc:
                say(f"  (forged)      refund.create -> REFUSED  {exc.message}", RED)


async def tool_names(agent: Agent) -> list[str]:
    async with agent.client() as c:
        return sorted(t.name for t in (await c.list_tools()).tools)


async def one_call(agent: Agent, tool: str, args: dict[str, Any], t: Transcript, *, expect: str, why: str = "") -> None:
    async with agent.client() as c:
        await call(t, c, agent.name, tool, args, expect=expect, why=why)


def upstream_identities(info: dict[str, Any]) -> dict[str, Any]:
    health: dict[str, Any] = json.loads(_get(info["mcp_url"].removesuffix("/mcp") + "/healthz"))
    return {name: u["identity"] for name, u in health["upstreams"].items()}


def redeploy_refunds(info: dict[str, Any], t: Transcript) -> subprocess.Popen[bytes] | None:
    """Replace the refunds server by a copy whose code differs by one constant; show the quarantine."""
    if not info.get("refunds_pid"):
        return None
    state = Path(info["state"])
    tokens = {a: Path(p).read_text().strip() for a, p in info["tokens"].items()}
    refund = Agent("refund-bot", info["mcp_url"], tokens["refund-bot"])
    say("\n== Upstream identity: the enclave verified each server before agents could use it", BOLD)
    for name, identity in upstream_identities(info).items():
        say(f"  {name:9} {identity}")
    t.expect(upstream_identities(info).get("refunds") == "nitro verified", "refunds is nitro-verified")
    say("\n== The refunds server is redeployed with changed code (approval threshold 5000 -> 50000)", BOLD)
    from cloister.dev.examples import refunds as refunds_module

    patched_dir = state / "redeployed"
    patched_dir.mkdir(exist_ok=True)
    source = Path(refunds_module.__file__).read_text()
    (patched_dir / "refunds.py").write_text(source.replace("APPROVAL_THRESHOLD = 5000", "APPROVAL_THRESHOLD = 50000"))
    os.killpg(int(info["refunds_pid"]), signal.SIGTERM)
    time.sleep(0.5)
    argv = [sys.executable, str(patched_dir / "refunds.py"), *info["refunds_argv"][2:]]
    patched = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=(state / "logs" / "refunds-redeployed.log").open("ab"),
        start_new_session=True,
    )
    say(
        f"  new PCR0 {refunds_module.expected_pcr0(patched_dir / 'refunds.py').hex()[:16]}... "
        f"(pinned: {refunds_module.expected_pcr0().hex()[:16]}...)"
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # The next call finds the old session gone; the relay reconnects and the enclave re-checks.
        with contextlib.suppress(Exception):  # the first calls race the restart; only the end state matters
            anyio.run(
                partial(
                    one_call,
                    refund,
                    "refunds___customer_lookup",
                    {"customer_id": "cus_1001"},
                    Transcript(),
                    expect="quiet",
                )
            )
        if "quarantined" in upstream_identities(info).get("refunds", "") or "failed" in upstream_identities(info).get(
            "refunds", ""
        ):
            break
        time.sleep(0.5)
    say(f"  refunds   {upstream_identities(info).get('refunds')}")
    names = anyio.run(tool_names, refund)
    say(f"  refund-bot now sees {names}")
    t.expect(not any(n.startswith("refunds___") for n in names), "the quarantined server's tools vanish")
    anyio.run(
        partial(
            one_call,
            refund,
            "refunds___customer_lookup",
            {"customer_id": "cus_1001"},
            t,
            expect="deny",
            why="quarantined",
        )
    )
    return patched


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (the relay we started)
        data: bytes = resp.read()
        return data


def audit(info: dict[str, Any], t: Transcript) -> None:
    say("\n== Audit: an attested checkpoint, and an inclusion proof for every call", BOLD)
    log_url = info["log_url"]
    nonce = secrets.token_bytes(16)
    att = json.loads(_get(f"{log_url}/attestation?nonce={nonce.hex()}"))
    checkpoint = att["checkpoint"].encode()
    root = TrustRoot.from_pem(Path(info["trust_root"]).read_bytes())
    policy = AttestationPolicy(
        root=root, at=DOCUMENT_TIME, now=datetime.now(UTC), nonce=nonce, expected_pcrs={0: bytes.fromhex(info["pcr0"])}
    )
    enclave = verify_enclave(base64.b64decode(att["document"]), policy, checkpoint=checkpoint)
    cp = verify_checkpoint(checkpoint, [enclave.binding.log_verifier()], origin=enclave.binding.origin).checkpoint
    say(f"  attestation verified: mock root, PCR0 {info['pcr0'][:16]}..., our nonce {nonce.hex()[:16]}...")
    say(f"  checkpoint verified:  {cp.origin}, size {cp.size}, root {cp.root_hash.hex()[:16]}...")
    bundles: dict[int, list[bytes]] = {}
    for label, index in t.calls:
        if index >= cp.size:
            t.expect(False, f"{label}: entry {index} is beyond the attested checkpoint ({cp.size})")
            continue
        n = index // 256
        if n not in bundles:
            width = min(256, cp.size - n * 256)
            bundles[n] = parse_entry_bundle(_get(f"{log_url}/{entry_bundle_path(n, width)}"))
        entry = bundles[n][index % 256]
        proof = json.loads(_get(f"{log_url}/proof/inclusion?index={index}&size={cp.size}"))
        verify_inclusion(leaf_hash(entry), index, cp.size, [base64.b64decode(h) for h in proof["proof"]], cp.root_hash)
        record = parse_entry(entry)
        if isinstance(record, DecisionEntry):
            what = f"{record.decision} {record.agent} {record.server}/{record.tool}"
        elif isinstance(record, OutcomeEntry):
            what = f"outcome of entry {record.decision_index}"
        else:
            what = type(record).__name__
        say(f"  entry {index:3}  proven in checkpoint  {what}", DIM)
    say(f"  {len(t.calls)} entries proven against the attested checkpoint", GREEN)
    say("\n== Audit with the auditor's own tools (cloister audit)", BOLD)
    trust = ["--trust-root", info["trust_root"], "--expect-pcr", f"0={info['pcr0']}"]
    for verb, extra in (("checkpoint", ["--state", str(Path(info["state"]) / "audit")]), ("replay", ["--no-progress"])):
        argv = [sys.executable, "-m", "cloister.cli", "audit", verb, "--log", log_url, *trust, *extra]
        say(f"  $ cloister audit {verb} --log {log_url} --trust-root <mock root> --expect-pcr 0=<PCR0>", DIM)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        for line in (out.stdout + out.stderr).strip().splitlines():
            say(f"    {line}")
        t.expect(out.returncode == 0, f"cloister audit {verb} exited {out.returncode}")
    audit_body(info, t, trust)


def audit_body(info: dict[str, Any], t: Transcript, trust: list[str]) -> None:
    """A call's arguments: refused to anyone without the auditor token, stored sealed to the
    auditor's key, opened and checked against the entry by `cloister audit body`."""
    index = next((i for label, i in t.calls if label.endswith("(decision)")), None)
    if index is None:
        return
    log_url = info["log_url"]
    say("\n== Bodies: served only to the auditor, stored sealed to the auditor's key", BOLD)
    try:
        _get(f"{log_url}/body/{index}/args")
        t.expect(False, "an anonymous client read a stored body")
    except urllib.error.HTTPError as exc:
        say(f"  anonymous GET /log/body/{index}/args -> HTTP {exc.code}")
        t.expect(exc.code == 401, f"an anonymous body read should be refused with 401, not {exc.code}")
    creds = ["--auditor-token-file", info["auditor_token_file"], "--key", info["body_key"]]
    argv = [sys.executable, "-m", "cloister.cli", "audit", "body", "--log", log_url, *trust, "--index", str(index)]
    argv += [*creds, "--state", str(Path(info["state"]) / "audit")]
    say(f"  $ cloister audit body --log {log_url} ... --index {index} --auditor-token-file F --key KEY", DIM)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    for line in out.stderr.strip().splitlines():
        say(f"    {line}")
    opened = json.loads(out.stdout) if out.returncode == 0 else {}
    if opened:
        say(f"    arguments: {json.dumps(opened['body'])}")
    t.expect(opened.get("sealed") is True, f"cloister audit body exited {out.returncode}, or the body was not sealed")


def _start_up(state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cloister.cli", "up", "--state", str(state), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def _research_call(info: dict[str, Any], token: str) -> None:
    agent = Agent("research-bot", info["mcp_url"], token)
    async with agent.client() as c:
        with contextlib.suppress(MCPError):  # allowed or denied (its budget is spent): logged either way
            await c.call_tool("research___web_search", {"query": "after the copy"})


def rollback(state: Path, t: Transcript) -> None:
    """The host's rollback: keep a copy of the log storage, let the log grow, put the copy back and
    restart. The witnesses have cosigned more than the copy holds, so the enclave never continues
    it (decision 0015)."""
    say("\n== Rollback: the host puts an old copy of the log storage back", BOLD)
    copy = state / "host-copy-of-log"
    shutil.copytree(state / "log", copy)
    say(f"  the host copies {state / 'log'} (everything is stopped), then restarts the stack")
    up = _start_up(state)
    try:
        info = wait_up(state, up)
        (state / "up.json").unlink()
        token = Path(info["tokens"]["research-bot"]).read_text().strip()
        anyio.run(_research_call, info, token)
        relay = info["mcp_url"].removesuffix("/mcp")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = json.loads(_get(f"{relay}/healthz"))
            sizes = [w["witnessed_size"] for w in health["witnessing"]["witnesses"].values()]
            if sizes and all(size == health["log_size"] for size in sizes):
                break
            time.sleep(0.2)
        say(f"  one more call is decided and logged; the witnesses cosign the log at size {health['log_size']}")
    finally:
        stop_group(up, timeout=30)
    shutil.rmtree(state / "log")
    shutil.copytree(copy, state / "log")
    say("  the host puts the old copy back and starts `cloister up` again:")
    again = _start_up(state)
    try:
        output, _ = again.communicate(timeout=120)
    finally:
        stop_group(again, timeout=30)
    refusal = [line for line in output.decode(errors="replace").splitlines() if "refusing to continue" in line]
    for line in refusal:
        say(f"    {line}", BOLD)
    t.expect(again.returncode == 1 and bool(refusal), "the restored copy of the log was not refused")
    say("  nothing is granted on the old copy; putting the newest storage back lets the log continue")


def wait_up(state: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cloister up exited with status {proc.returncode}; logs in {state}/logs")
        info_path = state / "up.json"
        if info_path.exists():
            info: dict[str, Any] = json.loads(info_path.read_text())
            return info
        time.sleep(0.2)
    raise RuntimeError("cloister up did not become ready in time")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cloister.dev.examples.demo")
    p.add_argument("--state", type=Path, default=Path(".cloister-demo"), help="fresh state directory to use")
    args = p.parse_args(argv)
    state = args.state.resolve()
    if state.exists():
        shutil.rmtree(state)
    say("Starting `cloister up` (enclave with mock NSM, relay, two witnesses, example servers)...", BOLD)
    up = _start_up(state)
    t = Transcript()
    patched: subprocess.Popen[bytes] | None = None
    try:
        info = wait_up(state, up)
        say(f"  MCP endpoint {info['mcp_url']}; log {info['log_url']}; PCR0 {info['pcr0'][:16]}...")
        tokens = {a: Path(p).read_text().strip() for a, p in info["tokens"].items()}
        anyio.run(run_agents, info, tokens, t)
        patched = redeploy_refunds(info, t)
        audit(info, t)
    except Exception as exc:
        t.failures.append(f"{type(exc).__name__}: {exc}")
        say(f"demo failed: {type(exc).__name__}: {exc}", RED)
    finally:
        if patched is not None:
            stop_group(patched)
        stop_group(up, timeout=30)
    if not t.failures:
        try:
            (state / "up.json").unlink(missing_ok=True)
            rollback(state, t)
        except Exception as exc:
            inner: BaseException = exc
            while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
                inner = inner.exceptions[0]  # the MCP client's task groups wrap the error
            t.failures.append(f"{type(inner).__name__}: {inner}")
            say(f"demo failed: {type(inner).__name__}: {inner}", RED)
    if t.failures:
        say(f"\n{len(t.failures)} thing(s) did not behave as the scenario says:", RED)
        for f in t.failures:
            say(f"  - {f}", RED)
        say(f"Process logs: {state}/logs", DIM)
        return 1
    say("\nEverything behaved as the scenario says. All processes stopped.", GREEN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
