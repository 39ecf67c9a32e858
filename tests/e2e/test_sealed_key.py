"""The sealed log key end to end (issue 10): real enclave and relay processes and the KMS stand-in
(cloister.dev.kms over HTTP, through boto3).

- A restarted enclave and relay on the same state sign with the same log key: the checkpoint's
  vkey is unchanged, and the restarted enclave resumed the log (it did not start a new one).
- An enclave whose code measures differently (here: a changed measured config, so another mock
  PCR0) cannot unseal the key: the stand-in's key policy refuses its Recipient, the relay does
  not start, and the enclave never starts a log (fail closed).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import anyio

from cloister.dev.state import ensure_state, free_port
from cloister.relay.enclave_client import EnclaveClient
from cloister.relay.lifecycle import SEALED_SEED_OBJECT
from cloister.verify.checkpoint import verify_checkpoint
from cloister.verify.note import Ed25519NoteVerifier
from cloister.wire import enclave_pb2 as pb
from tests.e2e.procs import kms_for, start_enclave, start_relay, stop, wait_for, write_relay_config
from tests.world import decision_bundle


def _health(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            body: dict[str, Any] = json.loads(r.read())
            return body
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        return body
    except OSError:
        return {"ready": False}


def _checkpoint(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"{url}/log/attestation?nonce={'11' * 16}", timeout=5) as r:
            note = str(json.loads(r.read())["checkpoint"])
            return note.encode() if note else None
    except (OSError, ValueError, KeyError):
        return None


def test_the_log_key_survives_restarts_and_another_pcr0_cannot_unseal_it(tmp_path: Path) -> None:
    state = ensure_state(tmp_path / "state", bundle_source=decision_bundle(tmp_path / "bundle"), witnessed=False)
    sock = tmp_path / "enclave.vsock"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_relay_config(tmp_path / "relay.toml", port=port, sock=sock)
    relay_log = tmp_path / "relay.log"

    first_pcr0 = ""

    def run_once() -> tuple[str, int]:
        nonlocal first_pcr0
        enclave, ready = start_enclave(state.root, f"unix:{sock}", log=tmp_path / "enclave.log")
        first_pcr0 = ready["pcr0"]
        relay = start_relay(config, relay_log)
        try:
            wait_for(lambda: _health(url).get("ready") is True, 90, "the relay to be ready")
            vkey: str = _health(url)["enclave"]["log_verifier_key"]
            # The enclave's latest checkpoint, as the relay serves it attested (the published
            # `checkpoint` object in storage lags behind; it is not read from the directory).
            wait_for(lambda: _checkpoint(url) is not None, 30, "the relay to serve /log/attestation")
            note = _checkpoint(url)
            assert note is not None
        finally:
            stop(relay)
            stop(enclave)
        cp = verify_checkpoint(note, [Ed25519NoteVerifier.from_vkey(vkey)], origin=ready["origin"]).checkpoint
        return vkey, cp.size

    first_vkey, first_size = run_once()
    assert (state.log_dir / SEALED_SEED_OBJECT).exists()
    second_vkey, second_size = run_once()
    # The same log key, continuing the same log: the restarted enclave appended its key entry.
    assert second_vkey == first_vkey and second_size > first_size

    # Another image: a changed measured config gives another mock PCR0, which the key policy lacks.
    kms_for(state.root)  # the stand-in's policy names the PCR0 measured before the change
    state.enclave_config.write_text(state.enclave_config.read_text() + "# another image\n")
    enclave, ready = start_enclave(state.root, f"unix:{sock}", log=tmp_path / "enclave.log")
    relay = start_relay(config, relay_log)
    try:
        relay.wait(90)  # the relay gives up: it cannot give the enclave its log key
        assert relay.returncode != 0
        text = relay_log.read_text(errors="replace")
        assert "AccessDeniedException" in text, text[-2000:]

        async def enclave_health() -> pb.HealthResponse:
            async with EnclaveClient(f"unix:{sock}", tmp_path / "probe") as client:
                return await client.health()

        health = anyio.run(enclave_health)
        # The refused enclave has no log key and started no log; it decides nothing.
        assert health.awaiting_key and health.log_size == 0 and not health.ready
        assert bytes.fromhex(ready["pcr0"]) not in (b"",) and ready["pcr0"] != first_pcr0
    finally:
        stop(relay)
        stop(enclave)
