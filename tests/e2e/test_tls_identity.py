"""A `tls` upstream identity end to end: the relay verifies the HTTPS upstream with a private CA on
the MCP connection, carries its certificate to the enclave, and the enclave checks the pinned SPKI
hash. A server whose key is not the pinned one is quarantined."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp.shared.exceptions import MCPError

from cloister.dev.state import copy_example_bundle, ensure_state, free_port
from cloister.relay.call_path import DENIAL_META_KEY
from tests.e2e.conftest import Stack
from tests.e2e.procs import start_enclave, start_relay, stop, wait_for, write_relay_config
from tests.e2e.test_relay import client

HERE = Path(__file__).parent


def make_ca(tmp: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test internal CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def server_cert(tmp: Path, name: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> str:
    """Writes NAME.pem / NAME.key signed by the CA; returns the hex SHA-256 of the key's SPKI."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca[0], hashes.SHA256())
    )
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = make_ca(tmp)
    pin = server_cert(tmp, "secure", ca)
    server_cert(tmp, "imposter", ca)  # a valid certificate from the same CA, but not the pinned key
    servers = {}
    for name in ("secure", "imposter"):
        port = free_port()
        servers[name] = (
            port,
            subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "tls_server.py"),
                    str(port),
                    str(tmp / f"{name}.pem"),
                    str(tmp / f"{name}.key"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=(tmp / f"{name}.log").open("ab"),
                start_new_session=True,
            ),
        )
    bundle = copy_example_bundle(tmp / "bundle")
    entities = (bundle / "entities.toml").read_text().replace("[roles]\n", "[roles]\ntester = {}\n")
    entities += '\n[agents.test-bot]\nroles = ["tester"]\n'
    for name in ("secure", "imposter"):
        entities += (
            f'\n[servers.{name}]\ncategory = "payments-test"\ntools = ["charge"]\n'
            f'identity = {{ kind = "tls", spki_sha256 = "{pin}" }}\n'
        )
    (bundle / "entities.toml").write_text(entities)
    (bundle / "policies" / "test.cedar").write_text(
        '@id("tester-all")\npermit (principal in Cloister::Role::"tester", action, resource);\n'
    )
    state = ensure_state(tmp / "state", bundle_source=bundle, witnessed=False)
    sock = tmp / "enclave.vsock"
    enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp / "enclave.log")
    port = free_port()
    upstreams = "".join(
        f'\n[[upstreams]]\nname = "{name}"\nurl = "https://127.0.0.1:{p}/mcp"\nca_file = "ca.pem"\ntimeout_s = 5\n'
        for name, (p, _) in servers.items()
    )
    relay = start_relay(
        write_relay_config(tmp / "relay.toml", port=port, sock=sock, upstreams=upstreams), tmp / "relay.log"
    )
    s = Stack(
        state=state,
        relay_url=f"http://127.0.0.1:{port}",
        calls_file=tmp / "calls",
        enclave=enclave,
        relay=relay,
        sock=sock,
        tmp=tmp,
    )
    try:
        wait_for(
            lambda: all(s.health().get("upstreams", {}).get(n, {}).get("state") == "up" for n in servers),
            60,
            "both TLS upstreams",
        )
        yield s
    finally:
        stop(relay)
        stop(enclave)
        for _, proc in servers.values():
            stop(proc)


def call(s: Stack, tool: str) -> object:
    async def go() -> object:
        async with client(s, s.token("test-bot", ["tester"])) as c:
            try:
                result = await c.call_tool(tool, {"amount": 5})
            except MCPError as exc:
                return exc
            denial = (result.meta or {}).get(DENIAL_META_KEY)
            if result.is_error and isinstance(denial, dict):  # a denial result (decision 0018), as an error
                return MCPError(denial["error_code"], str(getattr(result.content[0], "text", "")), data=denial)
            return result

    return anyio.run(go)


def test_pinned_tls_server_is_verified_and_served(stack: Stack) -> None:
    assert stack.health()["upstreams"]["secure"]["identity"] == "tls verified"
    assert call(stack, "secure___charge").content[0].text == "charged 5"  # type: ignore[attr-defined]


def test_a_server_with_another_key_is_quarantined(stack: Stack) -> None:
    assert stack.health()["upstreams"]["imposter"]["identity"] == "tls failed"
    err = call(stack, "imposter___charge")
    assert isinstance(err, MCPError) and "quarantined" in err.message and "SPKI" in err.message
