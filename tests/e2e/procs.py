"""Helpers for end-to-end tests: real processes on real sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloister.dev.kms import KmsHttpServer, LocalKms, log_key_policy, make_server
from cloister.dev.measure import mock_pcrs
from cloister.dev.proc import stop_group
from cloister.enclave.config import load_config
from cloister.verify.attestation import TrustRoot


@dataclass
class KmsStandIn:
    """The local KMS stand-in (cloister.dev.kms) for one dev state, served from a thread of the
    test process: its key's policy names the state's mock PCR0 as measured here."""

    kms: LocalKms
    server: KmsHttpServer
    key_id: str

    @property
    def endpoint(self) -> str:
        return self.server.url

    def allow(self, *pcr0s: bytes) -> None:
        self.kms.put_key_policy(self.key_id, log_key_policy(list(pcr0s)))

    def relay_table(self) -> str:
        return f'\n[kms]\nkey_id = "{self.key_id}"\nendpoint_url = "{self.endpoint}"\n'


_KMS: dict[Path, KmsStandIn] = {}


def kms_for(state_root: Path) -> KmsStandIn:
    """The KMS stand-in of the dev state at `state_root` (started on first use, kept for the session)."""
    root = state_root.resolve()
    if root not in _KMS:
        trust = TrustRoot.from_pem((root / "mock-nsm" / "root.pem").read_bytes())
        kms = LocalKms(root.parent / f"{root.name}-kms", trust_root=trust, clock=lambda: datetime.now(UTC))
        pcr0 = mock_pcrs(load_config(root / "enclave.toml", mock_nsm=True).raw)[0]
        key_id = kms.create_key(log_key_policy([pcr0]))
        server = make_server(kms)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
        _KMS[root] = KmsStandIn(kms, server, key_id)
    return _KMS[root]


async def unseal(client: Any, state_root: Path, origin: str, *, first_start: bool) -> Any:
    """The relay's sealed-key exchange against the state's KMS stand-in, for tests that drive the
    enclave's gRPC directly: GenerateDataKey (first start) or Decrypt, then OpenSealedKey."""
    from cloister.relay import kms as kms_api

    stand_in = kms_for(state_root)
    document = await client.request_key()
    api = kms_api.local_kms_client(stand_in.endpoint)
    context = {"cloister:origin": origin}
    blob_file = state_root.parent / f"{state_root.name}-sealed-seed"
    if blob_file.exists():
        envelope = kms_api.decrypt_for_recipient(api, blob_file.read_bytes(), document, encryption_context=context)
    else:
        sealed = kms_api.generate_sealed_seed(api, stand_in.key_id, document, encryption_context=context)
        blob_file.write_bytes(sealed.ciphertext_blob)
        envelope = sealed.ciphertext_for_recipient
    return await client.open_sealed_key(envelope, first_start=first_start)


def start_enclave(
    state_root: Path, listen: str, *, log: Path, cwd: Path | None = None
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start the enclave (`python -m cloister.dev.enclave`, mock NSM) and wait for its ready line (`cwd`: run that code)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloister.dev.enclave",
            "--listen",
            listen,
            "--config",
            str(state_root / "enclave.toml"),
            "--mock-nsm",
            str(state_root / "mock-nsm"),
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        start_new_session=True,
    )
    ready: dict[str, Any] = {}

    def read() -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line:
            ready.update(json.loads(line))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(60)
    if not ready:
        proc.kill()
        raise RuntimeError(f"enclave did not start; see {log}: {log.read_text()[-2000:]}")
    return proc, ready


def write_relay_config(path: Path, *, port: int, sock: Path, extra: str = "", upstreams: str = "") -> Path:
    """Write a relay config for the dev state next to `path`: `extra` adds `[relay]` keys, `upstreams`
    tables; its `[kms]` names the state's KMS stand-in (`kms_for`), which unseals the log key."""
    path.write_text(f"""[relay]
listen = "127.0.0.1:{port}"
enclave = "unix:{sock}"
bundle = "state/bundle.signed"
storage = "state/log"
run_dir = "run"
{extra}{upstreams}{kms_for(path.parent / "state").relay_table()}""")
    return path


def start_relay(config: Path, log: Path, *, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `python -m cloister.cli relay` in its own process group (`cwd`: run that code)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cloister.cli", "relay", "--config", str(config)],
        cwd=cwd,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    stop_group(proc, sig, timeout)


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


# server-everything asks its client for roots 350 ms after `initialize` (its dist/server/index.js:
# `setTimeout(() => syncRoots(...), 350)`). A fixture lets that ask pass before any test's call:
# with no agent call in flight it is refused and logs nothing, whereas inside a call it is
# attributed to that call and logged as that agent's (an extra roots decision a test did not expect).
EVERYTHING_ROOTS_ASK_S = 0.35


def let_server_everything_ask_for_roots() -> None:
    """Call once server-everything's upstream is up (its initialize done)."""
    time.sleep(EVERYTHING_ROOTS_ASK_S + 0.65)
