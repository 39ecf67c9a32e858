"""Issue 10 with real processes: the enclave, the relay, the example refunds server (mock Nitro
enclave, GrantGuard, response key) and, between the relay and that server, a hostile host's proxy
(tests/e2e/mitm_proxy.py) that forwards the attestation challenge to the genuine server and then
answers calls itself, or strips the server's signature. Each outcome says so, and `cloister audit
replay` reports it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloister.dev.measure import mock_pcrs
from cloister.dev.state import DevState, ensure_state, free_port
from cloister.enclave.config import load_config
from cloister.verify.entries import OutcomeEntry
from tests.e2e.procs import start_enclave, start_relay, stop, wait_for, write_relay_config
from tests.e2e.test_relay import call, entry_at

HERE = Path(__file__).parent


@dataclass
class Hostile:
    state: DevState
    relay_url: str
    mode: Path
    pcr0: str

    @property
    def mcp_url(self) -> str:
        return f"{self.relay_url}/mcp"

    def token(self) -> str:
        return self.state.mint_token("refund-bot", ["refund-agent"], 600)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _health(url: str) -> dict[str, object]:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            body: dict[str, object] = json.loads(r.read())
            return body
    except OSError:
        return {}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    tmp = tmp_path_factory.mktemp("hostile")
    state = ensure_state(tmp / "state", witnessed=False)
    pcr0 = mock_pcrs(load_config(state.enclave_config, mock_nsm=True).raw)[0].hex()
    sock = tmp / "enclave.vsock"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp / "enclave.log")
        procs.append(enclave)
        server_port, proxy_port, relay_port = free_port(), free_port(), free_port()
        genuine = [sys.executable, "-m", "cloister.dev.examples.refunds", "--port", str(server_port)]
        genuine += ["--trust-root", str(state.mock_root), "--expect-pcr0", pcr0, "--mock-nsm", str(state.mock_nsm_dir)]
        log = (tmp / "refunds.log").open("ab")
        procs.append(subprocess.Popen(genuine, stdout=log, stderr=log, start_new_session=True))
        mode = tmp / "mode"
        mode.write_text("forward")
        proxy = [sys.executable, str(HERE / "mitm_proxy.py"), str(proxy_port), f"http://127.0.0.1:{server_port}/mcp"]
        plog = (tmp / "proxy.log").open("ab")
        procs.append(subprocess.Popen([*proxy, str(mode)], stdout=plog, stderr=plog, start_new_session=True))
        wait_for(lambda: _listening(server_port) and _listening(proxy_port), 30, "the refunds server and the proxy")
        config = write_relay_config(
            tmp / "relay.toml",
            port=relay_port,
            sock=sock,
            extra='trust_root = "mock:state/mock-nsm/root.pem"\n',
            upstreams=f'\n[[upstreams]]\nname = "refunds"\nurl = "http://127.0.0.1:{proxy_port}/mcp"\ntimeout_s = 10\n',
        )
        relay = start_relay(config, tmp / "relay.log")
        procs.append(relay)
        url = f"http://127.0.0.1:{relay_port}"

        def refunds_verified() -> bool:
            ups = _health(url).get("upstreams")
            return isinstance(ups, dict) and "verified" in str(ups.get("refunds", ""))

        wait_for(lambda: relay.poll() is not None or refunds_verified(), 60, "the relay to prove refunds")
        if relay.poll() is not None:
            raise RuntimeError((tmp / "relay.log").read_text()[-3000:])
        yield Hostile(state, url, mode, pcr0)
    finally:
        for p in reversed(procs):
            stop(p)


def outcome_of(h: Hostile, customer: str) -> OutcomeEntry:
    result = call(h, h.token(), "refunds___customer_lookup", {"customer_id": customer})  # type: ignore[arg-type]
    entry = entry_at(h, result.meta["dev.cloister/log"]["outcome"])  # type: ignore[arg-type]
    assert isinstance(entry, OutcomeEntry)
    return entry


def test_the_host_cannot_pass_off_its_own_answers_and_replay_flags_them(hostile: Hostile, tmp_path: Path) -> None:
    hostile.mode.write_text("forward")
    assert outcome_of(hostile, "cus_1001").response == "verified"
    hostile.mode.write_text("self")  # the host answers itself; the genuine server never sees the call
    assert outcome_of(hostile, "cus_1002").response == "missing"
    hostile.mode.write_text("strip")
    assert outcome_of(hostile, "cus_1003").response == "missing"
    hostile.mode.write_text("forward")
    assert outcome_of(hostile, "cus_1001").response == "verified"
    audit = ["audit", "replay", "--log", hostile.relay_url, "--no-progress", "--json", "--state", str(tmp_path / "a")]
    trust = ["--trust-root", str(hostile.state.mock_root), "--expect-pcr", f"0={hostile.pcr0}"]
    out = subprocess.run(
        [sys.executable, "-m", "cloister.cli", *audit, *trust],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["response_signatures"]["missing"] == 2 and report["response_signatures"]["invalid"] == 0
    assert (
        report["response_signatures"]["by_status"]["verified"] == 2 and report["response_signatures"]["rechecked"] == 2
    )
    missing = [p for p in report["problems"] if "response signature is missing" in p["message"]]
    assert len(missing) == 2 and report["problem_count"] == 2, report["problems"]
    # Trusting the enclave's recorded verdicts (faster): nothing verified again, the same problems.
    fast = subprocess.run(
        [sys.executable, "-m", "cloister.cli", *audit, *trust, "--no-recheck-signatures"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fast.returncode != 0, fast.stdout[-2000:] + fast.stderr[-2000:]
    quick = json.loads(fast.stdout)
    assert quick["response_signatures"]["rechecked"] == 0 and quick["response_signatures"]["missing"] == 2
    assert quick["problem_count"] == 2, quick["problems"]
