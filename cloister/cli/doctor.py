"""`cloister doctor`: is this Nitro host set up to run Cloister, and running it as pinned?

    cloister doctor [--config /etc/cloister/relay.toml] [--pinned /etc/cloister/measurements.json]
                    [--enclave-env /etc/cloister/enclave.env] [--root /] [--only CHECK ...]

One line per problem (`CHECK: what is wrong`), then a summary; exit 1 when there is a problem.
The checks, in order (deploy/README.md; docs/decisions/0021):

- `nitro-cli`: installed and runs.
- `devices`: /dev/nitro_enclaves (enclaves enabled on the instance) and /dev/vsock.
- `allocator`: nitro-enclaves-allocator.service active; /etc/nitro_enclaves/allocator.yaml
  reserves at least the memory and CPUs enclave.env asks for.
- `enclave`: `nitro-cli describe-enclaves` shows the enclave RUNNING, not in debug mode, at the
  CID the relay dials.
- `measurements`: the EIF's PCR0 (`nitro-cli describe-eif`) and the running enclave's attested
  PCR0 (the relay's /healthz) are the pinned one (measurements.json from your own rebuild).
- `relay`: /readyz (or /healthz) answers 200, and the enclave grants (witnesses keep up).
- `storage`: the instance's credentials can list, read and write the log's S3 prefix (it
  writes and deletes `<prefix>/doctor/probe`).
- `kms`: the key is enabled; its policy lets Decrypt/GenerateDataKey happen only under a
  `kms:RecipientAttestation:ImageSha384` condition, whose values include the pinned PCR0 and
  no all-zero (debug) value; and a GenerateDataKey without attestation is refused.

This runs on the host, with the host's credentials and answers: it finds mistakes, it proves
nothing to anyone else. Auditors check the deployment with `cloister audit` instead.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKS = ("nitro-cli", "devices", "allocator", "enclave", "measurements", "relay", "storage", "kms")
ENCLAVE_NAME = "cloister"
_PCR0 = re.compile(r"^[0-9a-f]{96}$")
_UNSEAL_ACTIONS = ("kms:decrypt", "kms:generatedatakey")
_ATTESTED = "kms:recipientattestation:imagesha384"
MAX_FILE = 1 << 20  # config, env and measurement files are small; refuse anything else


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "doctor",
        help="check this Nitro host: nitro-cli, allocator, vsock, the enclave and its measurements, storage, KMS",
        description="Check a Cloister host and say what is wrong, one line per problem (exit 1 if any).",
    )
    p.add_argument("--config", type=Path, default=Path("/etc/cloister/relay.toml"), help="the relay configuration")
    p.add_argument("--enclave-env", type=Path, default=Path("/etc/cloister/enclave.env"), help="EIF, CPUs, memory, CID")
    p.add_argument(
        "--pinned",
        type=Path,
        default=Path("/etc/cloister/measurements.json"),
        help="measurements.json (eif/build.sh) from your own rebuild: the PCR0 that must be running",
    )
    p.add_argument("--root", type=Path, default=Path("/"), help="where /dev and /etc/nitro_enclaves are (tests)")
    p.add_argument("--only", action="append", choices=CHECKS, help="run only this check (repeatable)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per command or request")
    p.set_defaults(handler=_run)


class Unusable(Exception):
    """An input the checks need is missing or malformed; the message says which and why."""


@dataclass(frozen=True)
class Host:
    """What the checks read: the host's files (under `root`), its commands and its services."""

    root: Path
    config: dict[str, Any]
    enclave_env: dict[str, str]
    pinned_pcr0: str | None
    timeout: float

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=self.timeout, check=False)

    def relay(self) -> dict[str, Any]:
        table = self.config.get("relay")
        return table if isinstance(table, dict) else {}

    def relay_url(self) -> str:
        listen = str(self.relay().get("listen", "127.0.0.1:8440"))
        host, _, port = listen.rpartition(":")
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host  # noqa: S104 (a listen address, not a bind)
        return f"http://{host}:{port}"

    def http_json(self, path: str) -> tuple[int, dict[str, Any]]:
        url = self.relay_url() + path
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:  # noqa: S310 (the local relay's URL)
                status, raw = resp.status, resp.read(MAX_FILE)
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read(MAX_FILE)
        except (urllib.error.URLError, OSError) as exc:
            raise Unusable(f"cannot reach the relay at {url}: {getattr(exc, 'reason', exc)}") from exc
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        return status, body if isinstance(body, dict) else {}


def _read_small(path: Path, what: str) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise Unusable(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(data) > MAX_FILE:
        raise Unusable(f"{what} {path} is larger than {MAX_FILE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unusable(f"{what} {path} is not UTF-8") from exc


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines (systemd EnvironmentFile=), comments and blank lines ignored."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"')
        # Other lines are systemd's business; the checks name the keys they miss.
    return out


def pcr0_of(document: Any, where: str) -> str:
    """The PCR0 of a nitro-cli measurements object (`{"PCR0": ...}` or `{"Measurements": {...}}`)."""
    if isinstance(document, dict) and isinstance(document.get("Measurements"), dict):
        document = document["Measurements"]
    value = document.get("PCR0") if isinstance(document, dict) else None
    if not isinstance(value, str) or not _PCR0.match(value.lower()):
        raise Unusable(f"{where} has no PCR0 of 96 hex characters")
    return value.lower()


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, str) and value.isdigit() else None


# --- the checks: each returns its problems, one short sentence each ---------------------------


def check_nitro_cli(host: Host) -> list[str]:
    if shutil.which("nitro-cli") is None:
        return ["nitro-cli is not installed (dnf install aws-nitro-enclaves-cli; deploy/bootstrap.sh install)"]
    r = host.run(["nitro-cli", "--version"])
    return [] if r.returncode == 0 else [f"nitro-cli --version failed: {_first_line(r.stderr or r.stdout)}"]


def check_devices(host: Host) -> list[str]:
    problems = []
    if not (host.root / "dev/nitro_enclaves").exists():
        problems.append("no /dev/nitro_enclaves: Nitro Enclaves are not enabled on this instance (EnclaveOptions)")
    if not (host.root / "dev/vsock").exists():
        problems.append("no /dev/vsock: the vsock transport is not loaded, the relay cannot reach the enclave")
    return problems


def check_allocator(host: Host) -> list[str]:
    problems = []
    r = host.run(["systemctl", "is-active", "nitro-enclaves-allocator.service"])
    if r.stdout.strip() != "active":
        problems.append(f"nitro-enclaves-allocator.service is {r.stdout.strip() or 'not active'}")
    path = host.root / "etc/nitro_enclaves/allocator.yaml"
    try:
        text = _read_small(path, "the allocator configuration")
    except Unusable as exc:
        return [*problems, str(exc)]
    values = dict(re.findall(r"^(memory_mib|cpu_count):\s*(\d+)\s*(?:#.*)?$", text, re.M))
    for key, env_key in (("memory_mib", "MEMORY_MIB"), ("cpu_count", "CPU_COUNT")):
        have, want = _int(values.get(key)), _int(host.enclave_env.get(env_key))
        if have is None:
            problems.append(f"{path} sets no {key}")
        elif want is None:
            problems.append(f"enclave.env sets no {env_key}")
        elif have < want:
            problems.append(f"{path} reserves {key} {have}, less than the enclave's {env_key}={want}")
    return problems


def _describe_enclaves(host: Host) -> list[dict[str, Any]]:
    r = host.run(["nitro-cli", "describe-enclaves"])
    if r.returncode != 0:
        raise Unusable(f"nitro-cli describe-enclaves failed: {_first_line(r.stderr)}")
    try:
        found = json.loads(r.stdout)
    except ValueError as exc:
        raise Unusable("nitro-cli describe-enclaves did not print JSON") from exc
    return [e for e in found if isinstance(e, dict)] if isinstance(found, list) else []


def check_enclave(host: Host) -> list[str]:
    ours = [e for e in _describe_enclaves(host) if e.get("EnclaveName") == ENCLAVE_NAME]
    if not ours:
        return [f"no enclave named {ENCLAVE_NAME} is running (systemctl status cloister-enclave)"]
    enclave, problems = ours[0], []
    if enclave.get("State") != "RUNNING":
        problems.append(f"the enclave is {enclave.get('State')}, not RUNNING")
    if "DEBUG" in str(enclave.get("Flags", "")).upper():
        problems.append("the enclave runs in debug mode: it attests all-zero PCRs, which nothing pinned accepts")
    m = re.fullmatch(r"vsock:(\d+):(\d+)", str(host.relay().get("enclave", "")))
    if m is None:
        problems.append(f"the relay's enclave address {host.relay().get('enclave')!r} is not vsock:CID:PORT")
    elif enclave.get("EnclaveCID") != int(m.group(1)):
        problems.append(f"the enclave runs at CID {enclave.get('EnclaveCID')}, the relay dials CID {m.group(1)}")
    return problems


def check_measurements(host: Host) -> list[str]:
    if host.pinned_pcr0 is None:
        raise Unusable("no pinned measurements (--pinned): copy measurements.json from your own rebuild")
    problems = []
    eif = host.enclave_env.get("EIF")
    if not eif:
        problems.append("enclave.env sets no EIF")
    else:
        r = host.run(["nitro-cli", "describe-eif", "--eif-path", eif])
        try:
            built = pcr0_of(json.loads(r.stdout), f"nitro-cli describe-eif {eif}") if r.returncode == 0 else None
        except ValueError:
            built = None
        if built is None:
            problems.append(
                f"cannot measure {eif}: {_first_line(r.stderr) or 'nitro-cli describe-eif printed no PCR0'}"
            )
        elif built != host.pinned_pcr0:
            problems.append(f"the EIF {eif} has PCR0 {built}, not the pinned {host.pinned_pcr0}")
    try:
        _, health = host.http_json("/healthz")
    except Unusable as exc:
        return [*problems, f"cannot see the running enclave's PCR0: {exc}"]
    enclave = health.get("enclave") if isinstance(health.get("enclave"), dict) else None
    if enclave is None:
        problems.append("the relay reports no attested enclave (not started, or its attestation failed)")
    else:
        if enclave.get("mock_nsm"):
            problems.append("the relay's enclave uses a mock NSM: its attestation proves nothing")
        if enclave.get("pcr0") != host.pinned_pcr0:
            problems.append(
                f"the running enclave attests PCR0 {enclave.get('pcr0')}, not the pinned {host.pinned_pcr0}"
            )
    return problems


def check_relay(host: Host) -> list[str]:
    status, _ = host.http_json("/readyz")
    if status == 404:
        status, _ = host.http_json("/healthz")
    if status != 200:
        return [f"the relay is not ready (HTTP {status}): journalctl -u cloister-relay"]
    _, health = host.http_json("/healthz")
    if health.get("granting") is False:
        gate = health.get("witness_gate")
        reason = gate.get("reason") if isinstance(gate, dict) else None
        return [f"the enclave does not grant calls: {reason or 'its witnesses have not cosigned'}"]
    return []


def _storage(host: Host) -> tuple[str, str]:
    storage = str(host.relay().get("storage", ""))
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/?(.*)", storage)
    if m is None:
        raise Unusable(f"the relay's storage {storage!r} is not s3://bucket/prefix")
    return m.group(1), m.group(2).strip("/")


def _aws_error(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return f"{error.get('Code', 'Error')}: {error.get('Message', '')}".strip()
    return _first_line(str(exc))


def check_storage(host: Host) -> list[str]:
    import boto3
    from botocore.config import Config

    bucket, prefix = _storage(host)
    base = f"{prefix}/" if prefix else ""
    endpoint = host.relay().get("s3_endpoint_url") or None
    config = Config(connect_timeout=host.timeout, read_timeout=host.timeout, retries={"max_attempts": 1})
    s3 = boto3.client("s3", endpoint_url=endpoint, config=config)
    steps: list[tuple[str, Callable[[], object]]] = [
        ("list", lambda: s3.list_objects_v2(Bucket=bucket, Prefix=base, MaxKeys=1)),
        ("write", lambda: s3.put_object(Bucket=bucket, Key=f"{base}doctor/probe", Body=b"cloister doctor\n")),
        ("read", lambda: s3.get_object(Bucket=bucket, Key=f"{base}doctor/probe")["Body"].read()),
        ("delete", lambda: s3.delete_object(Bucket=bucket, Key=f"{base}doctor/probe")),
    ]
    for verb, call in steps:
        try:
            call()
        except Exception as exc:  # botocore raises many kinds; each is one line here
            return [f"cannot {verb} s3://{bucket}/{base}: {_aws_error(exc)}"]
    return []


def key_policy_problems(policy: Any, pinned: str | None) -> list[str]:
    """What is wrong with a log key's policy: unseal without attestation, a debug PCR0, the pinned one missing."""
    statements = policy.get("Statement") if isinstance(policy, dict) else None
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list):
        return ["the key policy has no Statement list"]
    problems, allowed = [], set()
    for i, st in enumerate(statements):
        if not isinstance(st, dict) or st.get("Effect") != "Allow":
            continue
        actions = st.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        if not any(re.fullmatch(str(a).lower().replace("*", ".*"), u) for a in actions for u in _UNSEAL_ACTIONS):
            continue
        values = _attested_values(st.get("Condition"))
        name = st.get("Sid", f"Statement[{i}]")
        if values is None:
            problems.append(f"statement {name} allows unsealing without a {_ATTESTED} condition")
            continue
        if any(re.fullmatch(r"0+", v) for v in values):
            problems.append(f"statement {name} pins an all-zero PCR0 (any debug-mode enclave)")
        allowed |= values
    if pinned is not None and pinned not in allowed:
        problems.append(f"the key policy does not pin PCR0 {pinned} (deploy/pin-image.sh); it pins {sorted(allowed)}")
    return problems


def _attested_values(condition: Any) -> set[str] | None:
    if not isinstance(condition, dict):
        return None
    for operator in ("StringEquals", "StringEqualsIgnoreCase"):
        block = condition.get(operator)
        if isinstance(block, dict):
            for key, values in block.items():
                if key.lower() == _ATTESTED:
                    return {str(v).lower() for v in ([values] if isinstance(values, str) else values)}
    return None


def check_kms(host: Host) -> list[str]:
    import boto3
    from botocore.config import Config

    table = host.config.get("kms")
    if not isinstance(table, dict) or not table.get("key_id"):
        raise Unusable("the relay configuration has no [kms] key_id")
    config = Config(connect_timeout=host.timeout, read_timeout=host.timeout, retries={"max_attempts": 1})
    kms = boto3.client("kms", region_name=table.get("region"), endpoint_url=table.get("endpoint_url"), config=config)
    key = str(table["key_id"])
    try:
        meta = kms.describe_key(KeyId=key)["KeyMetadata"]
        policy = json.loads(kms.get_key_policy(KeyId=key, PolicyName="default")["Policy"])
    except Exception as exc:  # botocore raises many kinds; each is one line here
        return [f"cannot read key {key} or its policy: {_aws_error(exc)}"]
    problems = [] if meta.get("KeyState") == "Enabled" else [f"key {key} is {meta.get('KeyState')}, not Enabled"]
    problems += key_policy_problems(policy, host.pinned_pcr0)
    try:
        kms.generate_data_key(KeyId=key, NumberOfBytes=32)
    except Exception as exc:  # the refusal is what this step wants
        if "AccessDenied" not in _aws_error(exc):
            problems.append(f"GenerateDataKey without attestation failed, but not as refused: {_aws_error(exc)}")
    else:
        problems.append("this host got a plaintext data key without attestation: the key policy does not require it")
    return problems


RUNNERS: dict[str, Callable[[Host], list[str]]] = {
    "nitro-cli": check_nitro_cli,
    "devices": check_devices,
    "allocator": check_allocator,
    "enclave": check_enclave,
    "measurements": check_measurements,
    "relay": check_relay,
    "storage": check_storage,
    "kms": check_kms,
}


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _load(args: argparse.Namespace) -> tuple[Host, list[str]]:
    """The host's settings; problems reading them are reported like any other."""
    problems: list[str] = []
    config: dict[str, Any] = {}
    try:
        config = tomllib.loads(_read_small(args.config, "the relay configuration"))
    except Unusable as exc:
        problems.append(f"config: {exc}")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config: {args.config} is not TOML: {exc}")
    env: dict[str, str] = {}
    try:
        env = parse_env(_read_small(args.enclave_env, "the enclave settings"))
    except Unusable as exc:
        problems.append(f"config: {exc}")
    pinned = None
    try:
        pinned = pcr0_of(json.loads(_read_small(args.pinned, "the pinned measurements")), str(args.pinned))
    except Unusable as exc:
        problems.append(f"config: {exc}")
    except ValueError:
        problems.append(f"config: {args.pinned} is not JSON")
    return Host(args.root, config, env, pinned, args.timeout), problems


def diagnose(host: Host, checks: Sequence[str]) -> list[str]:
    problems = []
    for name in checks:
        try:
            found = RUNNERS[name](host)
        except Unusable as exc:
            found = [str(exc)]
        except subprocess.TimeoutExpired as exc:
            found = [f"{exc.cmd[0] if isinstance(exc.cmd, list) else exc.cmd} did not answer in {host.timeout:g}s"]
        except FileNotFoundError as exc:
            found = [f"{exc.filename} is not installed"]
        problems += [f"{name}: {p}" for p in found]
    return problems


def _run(args: argparse.Namespace) -> int:
    host, problems = _load(args)
    checks = [c for c in CHECKS if not args.only or c in args.only]
    problems += diagnose(host, checks)
    for line in problems:
        print(line)
    if problems:
        print(f"cloister doctor: {len(problems)} problem(s) in {len(checks)} check(s)")
        return 1
    print(f"cloister doctor: {len(checks)} check(s) passed")
    return 0
