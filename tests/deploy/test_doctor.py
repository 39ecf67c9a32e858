"""`cloister doctor` on a fake Nitro host: one line per problem, nothing when all is well.

What is absent here is faked at its boundary, and doctor runs as a real process against it:
nitro-cli and systemctl are stub executables on PATH, /dev and /etc/nitro_enclaves live under
`--root`, the relay is an HTTP server on a real socket, S3 is moto's server (a real process),
and KMS is a small server speaking KMS's JSON protocol (moto's KMS does not evaluate key
policies, so it cannot refuse an unattested call the way a correctly pinned key must).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from cloister.dev.kms import log_key_policy

ROOT = Path(__file__).resolve().parents[2]
PCR0, OTHER = "a1" * 48, "e5" * 48
KEY = "arn:aws:kms:us-east-1:123456789012:key/0b6c1a2e-1111-4222-8333-944445555666"


# --- fakes --------------------------------------------------------------------------------------


@dataclass
class State:
    """Everything the fakes answer; a test changes one thing and expects one line."""

    readyz: int = 200
    health: dict[str, Any] = field(
        default_factory=lambda: {
            "ready": True,
            "granting": True,
            "witness_gate": {"reason": None},
            "enclave": {"pcr0": PCR0, "mock_nsm": False},
        }
    )
    key_state: str = "Enabled"
    policy: dict[str, Any] = field(default_factory=lambda: log_key_policy([bytes.fromhex(PCR0)]))
    unattested_data_key: bool = False  # True: KMS hands out a plaintext data key without attestation


class Fakes(ThreadingHTTPServer):
    state: State


class Handler(BaseHTTPRequestHandler):
    server: Fakes

    def _send(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:  # the relay
        s = self.server.state
        if self.path == "/readyz":
            self._send(s.readyz, {})
        elif self.path == "/healthz":
            self._send(200 if s.health.get("ready") else 503, s.health)
        else:
            self._send(404, {})

    def do_POST(self) -> None:  # KMS, JSON 1.1 as boto3 speaks it
        s = self.server.state
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        op = self.headers.get("X-Amz-Target", "").removeprefix("TrentService.")
        if op == "DescribeKey":
            self._send(200, {"KeyMetadata": {"KeyId": KEY, "Arn": KEY, "KeyState": s.key_state}})
        elif op == "GetKeyPolicy":
            self._send(200, {"Policy": json.dumps(s.policy), "PolicyName": "default"})
        elif op == "GenerateDataKey" and s.unattested_data_key:
            self._send(200, {"KeyId": KEY, "Plaintext": "AAAA", "CiphertextBlob": "AAAA"})
        elif op == "GenerateDataKey":
            message = "no resource-based policy allows the kms:GenerateDataKey action"
            self._send(400, {"__type": "AccessDeniedException", "Message": message})
        else:
            self._send(400, {"__type": "UnsupportedOperationException", "Message": op})

    def log_message(self, format: str, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class FakeHost:
    tmp: Path
    fakes: Fakes
    moto: str

    @property
    def state(self) -> State:
        return self.fakes.state

    def write(self, rel: str, text: str) -> Path:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def doctor(self, *extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env |= AWS_ENV | {"NO_PROXY": "127.0.0.1", "PATH": f"{self.tmp / 'bin'}:{os.environ['PATH']}"}
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "cloister.cli",
                "doctor",
                "--root",
                str(self.tmp / "root"),
                "--config",
                str(self.tmp / "relay.toml"),
                "--enclave-env",
                str(self.tmp / "enclave.env"),
                "--pinned",
                str(self.tmp / "measurements.json"),
                "--timeout",
                "5",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT,
        )


@pytest.fixture
def host(tmp_path: Path, moto: str) -> Iterator[FakeHost]:
    fakes = Fakes(("127.0.0.1", 0), Handler)
    fakes.state = State()
    threading.Thread(target=fakes.serve_forever, daemon=True).start()
    h = FakeHost(tmp_path, fakes, moto)
    bucket = f"log-{os.urandom(6).hex()}"
    s3 = boto3.client("s3", endpoint_url=moto, aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket=bucket)
    port = fakes.server_address[1]
    h.write(
        "relay.toml",
        f'[relay]\nlisten = "127.0.0.1:{port}"\nenclave = "vsock:16:5005"\nstorage = "s3://{bucket}/log"\n'
        f's3_endpoint_url = "{moto}"\n[kms]\nkey_id = "{KEY}"\nregion = "us-east-1"\n'
        f'endpoint_url = "http://127.0.0.1:{port}"\n',
    )
    h.write("enclave.env", f"EIF={tmp_path}/cloister.eif\nCPU_COUNT=2\nMEMORY_MIB=2048\nCID=16\n")
    h.write("measurements.json", json.dumps({"PCR0": PCR0, "PCR1": "b2" * 48}))
    h.write("root/dev/nitro_enclaves", "")
    h.write("root/dev/vsock", "")
    h.write("root/etc/nitro_enclaves/allocator.yaml", "---\nmemory_mib: 2048\ncpu_count: 2\n")
    # The stubs answer from files the tests can change.
    h.write("allocator-state", "active\n")
    h.write(
        "enclaves.json",
        json.dumps([{"EnclaveName": "cloister", "EnclaveCID": 16, "State": "RUNNING", "Flags": "NONE"}]),
    )
    h.write("eif.json", json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": PCR0}}))
    h.write(
        "bin/nitro-cli",
        f"""#!/usr/bin/env bash
case "$1" in
  --version) echo "Nitro CLI 1.4.2" ;;
  describe-enclaves) cat "{tmp_path}/enclaves.json" ;;
  describe-eif) cat "{tmp_path}/eif.json" ;;
  *) exit 1 ;;
esac
""",
    ).chmod(0o755)
    h.write("bin/systemctl", f'#!/usr/bin/env bash\ncat "{tmp_path}/allocator-state"\n').chmod(0o755)
    yield h
    fakes.shutdown()
    fakes.server_close()


def problems(r: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in r.stdout.splitlines() if not line.startswith("cloister doctor:")]


# --- tests --------------------------------------------------------------------------------------


def test_a_healthy_host_passes_every_check(host: FakeHost) -> None:
    r = host.doctor()
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "cloister doctor: 8 check(s) passed" and r.stderr == ""


def _set(attr: str, value: object) -> Callable[[FakeHost], None]:
    return lambda h: setattr(h.state, attr, value)


def _health(**changes: Any) -> Callable[[FakeHost], None]:
    def apply(h: FakeHost) -> None:
        h.state.health.update(changes)

    return apply


def _file(rel: str, text: str) -> Callable[[FakeHost], None]:
    def apply(h: FakeHost) -> None:
        h.write(rel, text)

    return apply


def _enclave(**changes: Any) -> Callable[[FakeHost], None]:
    e = {"EnclaveName": "cloister", "EnclaveCID": 16, "State": "RUNNING", "Flags": "NONE", **changes}
    return _file("enclaves.json", json.dumps([e]))


def _unlink(rel: str) -> Callable[[FakeHost], None]:
    return lambda h: (h.tmp / rel).unlink()


PINNED = log_key_policy([bytes.fromhex(PCR0)])
UNATTESTED = {"Sid": "Oops", "Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*", "Resource": "*"}


@pytest.mark.parametrize(
    ("fault", "line"),
    [
        (_unlink("root/dev/vsock"), "devices: no /dev/vsock: the vsock transport is not loaded"),
        (_unlink("root/dev/nitro_enclaves"), "devices: no /dev/nitro_enclaves: Nitro Enclaves are not enabled"),
        (_file("allocator-state", "inactive\n"), "allocator: nitro-enclaves-allocator.service is inactive"),
        (
            _file("root/etc/nitro_enclaves/allocator.yaml", "memory_mib: 1024\ncpu_count: 2\n"),
            "allocator: {tmp}/root/etc/nitro_enclaves/allocator.yaml reserves memory_mib 1024, less than the "
            "enclave's MEMORY_MIB=2048",
        ),
        (_file("enclaves.json", "[]"), "enclave: no enclave named cloister is running"),
        (_enclave(Flags="DEBUG_MODE"), "enclave: the enclave runs in debug mode"),
        (_enclave(EnclaveCID=17), "enclave: the enclave runs at CID 17, the relay dials CID 16"),
        (
            _file("eif.json", json.dumps({"Measurements": {"PCR0": OTHER}})),
            f"measurements: the EIF {{tmp}}/cloister.eif has PCR0 {OTHER}, not the pinned {PCR0}",
        ),
        (
            _health(enclave={"pcr0": OTHER, "mock_nsm": False}),
            f"measurements: the running enclave attests PCR0 {OTHER}, not the pinned {PCR0}",
        ),
        (_health(enclave={"pcr0": PCR0, "mock_nsm": True}), "measurements: the relay's enclave uses a mock NSM"),
        (_set("readyz", 503), "relay: the relay is not ready (HTTP 503)"),
        (
            _health(granting=False, witness_gate={"reason": "witnesses lag 1200 entries"}),
            "relay: the enclave does not grant calls: witnesses lag 1200 entries",
        ),
        (_set("key_state", "PendingDeletion"), f"kms: key {KEY} is PendingDeletion, not Enabled"),
        (_set("unattested_data_key", True), "kms: this host got a plaintext data key without attestation"),
        (
            _set("policy", log_key_policy([bytes.fromhex(OTHER)])),
            f"kms: the key policy does not pin PCR0 {PCR0} (deploy/pin-image.sh); it pins ['{OTHER}']",
        ),
        (
            _set("policy", {**PINNED, "Statement": [*PINNED["Statement"], UNATTESTED]}),
            "kms: statement Oops allows unsealing without a kms:recipientattestation:imagesha384 condition",
        ),
    ],
)
def test_each_problem_is_one_line(host: FakeHost, fault: Callable[[FakeHost], None], line: str) -> None:
    fault(host)
    r = host.doctor()
    assert r.returncode == 1, r.stdout + r.stderr
    found = problems(r)
    expected = line.replace("{tmp}", str(host.tmp))
    assert len(found) == 1 and found[0].startswith(expected), found
    assert r.stdout.splitlines()[-1] == "cloister doctor: 1 problem(s) in 8 check(s)"


def test_storage_without_access_is_one_line(host: FakeHost) -> None:
    text = (host.tmp / "relay.toml").read_text()
    bucket = text.split("s3://", 1)[1].split("/", 1)[0]
    host.write("relay.toml", text.replace(bucket, "no-such-bucket-here"))
    r = host.doctor("--only", "storage")
    assert problems(r) == [
        "storage: cannot list s3://no-such-bucket-here/log/: NoSuchBucket: The specified bucket does not exist"
    ]


def test_storage_probe_leaves_no_object(host: FakeHost) -> None:
    assert host.doctor("--only", "storage").returncode == 0
    text = (host.tmp / "relay.toml").read_text()
    bucket = text.split("s3://", 1)[1].split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=host.moto, aws_access_key_id="test", aws_secret_access_key="test")
    assert s3.list_objects_v2(Bucket=bucket, Prefix="log/").get("KeyCount") == 0


def test_absent_nitro_cli_and_unreadable_inputs_are_named(host: FakeHost) -> None:
    (host.tmp / "bin" / "nitro-cli").unlink()
    (host.tmp / "measurements.json").write_text("not json")
    r = host.doctor("--only", "nitro-cli", "--only", "enclave", "--only", "measurements")
    assert r.returncode == 1
    assert problems(r) == [
        f"config: {host.tmp}/measurements.json is not JSON",
        "nitro-cli: nitro-cli is not installed (dnf install aws-nitro-enclaves-cli; deploy/bootstrap.sh install)",
        "enclave: nitro-cli is not installed",
        "measurements: no pinned measurements (--pinned): copy measurements.json from your own rebuild",
    ]


def test_an_unreachable_relay_is_one_line_per_check(host: FakeHost) -> None:
    text = (host.tmp / "relay.toml").read_text()
    port = host.fakes.server_address[1]
    host.write("relay.toml", text.replace(f'listen = "127.0.0.1:{port}"', f'listen = "127.0.0.1:{_free_port()}"'))
    r = host.doctor("--only", "relay", "--only", "measurements")
    found = problems(r)
    assert len(found) == 2 and found[0].startswith("measurements: cannot see the running enclave's PCR0: cannot reach")
    assert found[1].startswith("relay: cannot reach the relay at http://127.0.0.1:")
