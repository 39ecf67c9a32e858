"""Stored bodies and the relay's own credentials, with real processes (issue 9, items 2 and 4).

The relay here is configured as `cloister up` configures it: an admin token, a distinct auditor
token, and the auditor's X25519 public key, so bodies are stored sealed. Each test is named
after the attack it shows failing.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx2
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from cloister.dev.state import copy_example_bundle, ensure_state, free_port
from cloister.verify.canonical import canonical_sha256
from tests.audit.clirun import cli
from tests.e2e.conftest import Stack
from tests.e2e.procs import start_enclave, start_relay, stop, wait_for, write_relay_config
from tests.e2e.test_relay import call, denied, entry_at

HERE = Path(__file__).parent
SECRET = "4242-4242-4242-4242"  # what an agent sends; it must not be readable from storage
SEALED = b"CLS2"  # the magic of the bodies the relay seals (cloister.audit.sealed.BodySealer)


@dataclass
class Credentials:
    admin: Path
    auditor: Path
    body_key: Path  # the auditor's X25519 private key; the relay has only body.pub


def _credentials(tmp: Path) -> Credentials:
    c = Credentials(tmp / "admin.token", tmp / "auditor.token", tmp / "body.key")
    c.admin.write_text(secrets.token_urlsafe(32))
    c.auditor.write_text(secrets.token_urlsafe(32))
    write_x25519(c.body_key)
    return c


def write_x25519(path: Path) -> None:
    key = X25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


def _bundle(dst: Path) -> Path:
    copy_example_bundle(dst)
    entities = dst / "entities.toml"
    entities.write_text(
        entities.read_text().replace("[roles]\n", "[roles]\ntester = {}\n")
        + '\n[agents.test-bot]\nroles = ["tester"]\n\n[servers.slow]\ntools = ["echo", "sleep", "crash"]\n'
    )
    (dst / "policies" / "test.cedar").write_text(
        '@id("tester-slow")\npermit (principal in Cloister::Role::"tester", action == Cloister::Action::"slow___echo", '
        'resource == Cloister::Server::"slow");\n'
    )
    return dst


CREDS: dict[str, Credentials] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("bodies")
    CREDS["stack"] = _credentials(tmp)
    state = ensure_state(tmp / "state", bundle_source=_bundle(tmp / "bundle"), witnessed=False)
    sock = tmp / "enclave.vsock"
    enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp / "enclave.log")
    port = free_port()
    calls = tmp / "calls.jsonl"
    config = write_relay_config(
        tmp / "relay.toml",
        port=port,
        sock=sock,
        extra='admin_token_file = "admin.token"\nauditor_token_file = "auditor.token"\n'
        'body_encryption_public_key = "body.pub"\n',
        upstreams=f"""
[[upstreams]]
name = "slow"
command = [{json.dumps(sys.executable)}, "{HERE / "slow_server.py"}"]
env = {{ CALLS_FILE = "{calls}" }}
""",
    )
    relay = start_relay(config, tmp / "relay.log")
    s = Stack(state, f"http://127.0.0.1:{port}", calls, enclave, relay, sock, tmp)
    try:
        wait_for(lambda: relay.poll() is not None or s.health().get("ready") is True, 60, "the relay to be ready")
        if relay.poll() is not None:
            raise RuntimeError((tmp / "relay.log").read_text()[-3000:])
        wait_for(lambda: s.health()["upstreams"].get("slow", {}).get("state") == "up", 30, "the slow upstream")
        yield s
    finally:
        stop(relay)
        stop(s.enclave)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def auditor(s: Stack) -> dict[str, str]:
    return bearer(CREDS["stack"].auditor.read_text().strip())


def admin(s: Stack) -> dict[str, str]:
    return bearer(CREDS["stack"].admin.read_text().strip())


def a_call(s: Stack, text: str = SECRET) -> dict[str, int]:
    meta: dict[str, int] = call(s, s.token(), "slow___echo", {"text": text}).meta["dev.cloister/log"]
    return meta


def body_urls(s: Stack, meta: dict[str, int]) -> list[str]:
    return [f"{s.relay_url}/log/body/{meta['decision']}/args", f"{s.relay_url}/log/body/{meta['outcome']}/result"]


def test_anonymous_client_cannot_read_bodies(stack: Stack) -> None:
    meta = a_call(stack)
    for url in body_urls(stack, meta):
        r = httpx2.get(url)
        assert r.status_code == 401, (url, r.status_code, r.text)
        assert SECRET not in r.text and "auditor token" in r.json()["error"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert httpx2.get(url, headers={"Authorization": "Basic YXVkaXRvcjp4"}).status_code == 401
    # What stays public holds hashes only: checkpoints, tiles, proofs.
    assert httpx2.get(f"{stack.relay_url}/log/attestation", params={"nonce": "00" * 16}).status_code == 200
    assert isinstance(entry_at(stack, meta["decision"]).args_sha256, bytes)
    r = httpx2.get(f"{stack.relay_url}/log/proof/inclusion", params={"index": meta["decision"]})
    assert r.status_code == 200, r.text


def test_agent_token_cannot_read_bodies(stack: Stack) -> None:
    meta = a_call(stack)
    # The agent that made the call, and another one: an agent's JWT is not an auditor credential.
    for token in (stack.token(), stack.token("refund-bot", ["refund-agent"])):
        for url in body_urls(stack, meta):
            r = httpx2.get(url, headers=bearer(token))
            assert r.status_code == 401 and SECRET not in r.text, (url, r.status_code)


def test_admin_token_is_not_an_auditor_credential(stack: Stack) -> None:
    meta = a_call(stack)
    for url in body_urls(stack, meta):
        r = httpx2.get(url, headers=admin(stack))
        assert r.status_code == 401 and SECRET not in r.text, (url, r.status_code)
    # ... and the auditor token is no admin credential either.
    r = httpx2.post(f"{stack.relay_url}/admin/redact/{meta['decision']}/args", headers=auditor(stack))
    assert r.status_code == 401
    # The auditor gets exactly what is stored.
    r = httpx2.get(body_urls(stack, meta)[0], headers=auditor(stack))
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store" and r.content.startswith(SEALED)


def test_stored_bodies_are_ciphertext_and_verify_after_decryption(stack: Stack, tmp_path: Path) -> None:
    meta = a_call(stack, f"card {SECRET}")
    served = httpx2.get(body_urls(stack, meta)[0], headers=auditor(stack))
    assert served.status_code == 200 and served.content.startswith(SEALED) and SECRET.encode() not in served.content
    # Nothing in storage (tiles, WAL, bodies) holds the arguments or the result in clear.
    wait_for(lambda: any(stack.state.log_dir.rglob("*.args")), 10, "the body to be stored")
    leaks = [p for p in stack.state.log_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    # The auditor opens them with the private key and checks them against the entries' commitments.
    common = ["--log", stack.relay_url, "--trust-root", str(stack.state.mock_root), "--state", str(tmp_path)]
    c = CREDS["stack"]
    creds = ["--auditor-token-file", str(c.auditor), "--key", str(c.body_key)]
    r = cli("audit", "body", *common, "--index", str(meta["decision"]), *creds)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["body"] == {"text": f"card {SECRET}"} and out["sealed"] is True and out["kind"] == "args"
    assert bytes.fromhex(out["commitment"]) == entry_at(stack, meta["decision"]).args_sha256
    r = cli("audit", "body", *common, "--index", str(meta["outcome"]), *creds)
    assert r.code == 0, r.err
    result = json.loads(r.out)["body"]
    assert canonical_sha256(result) == entry_at(stack, meta["outcome"]).result_sha256
    r = cli(
        *("audit", "inclusion", *common, "--index", str(meta["outcome"]), "--bodies"),
        *("--auditor-token-file", str(c.auditor), "--body-key", str(c.body_key)),
    )
    assert r.code == 0, r.err
    assert json.loads(r.out)["bodies"]["result"] == {
        "status": "verified",
        "sealed": True,
        **{"sealed_to": ANY},
        "body": result,
    }
    # Without the key, or with another one, it does not open; without the token it is not served.
    r = cli("audit", "body", *common, "--index", str(meta["decision"]), *creds[:2])
    assert r.code == 1 and "is sealed to auditor key" in r.err
    write_x25519(tmp_path / "other.key")
    r = cli(
        "audit", "body", *common, "--index", str(meta["decision"]), *creds[:2], "--key", str(tmp_path / "other.key")
    )
    assert r.code == 1 and "is sealed to auditor key" in r.err and "4242" not in r.out
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-auditor-token-0123456789")
    r = cli("audit", "body", *common, "--index", str(meta["decision"]), "--auditor-token-file", str(wrong))
    assert r.code == 3 and "HTTP 401" in r.err


def test_redacted_bodies_are_gone_and_their_entries_untouched(stack: Stack) -> None:
    meta = a_call(stack)
    url = body_urls(stack, meta)[0]
    decision = entry_at(stack, meta["decision"])
    assert httpx2.get(url, headers=auditor(stack)).status_code == 200
    r = httpx2.post(f"{stack.relay_url}/admin/redact/{meta['decision']}/args", headers=admin(stack))
    assert r.status_code == 200 and r.json()["redacted"] is True
    gone = httpx2.get(url, headers=auditor(stack))
    assert gone.status_code == 410 and "redacted" in gone.json()["error"]
    assert entry_at(stack, meta["decision"]) == decision


def test_denied_arguments_are_not_kept_by_default(stack: Stack) -> None:
    err = denied(stack, stack.token(), "slow___sleep", {"seconds": 0})
    index = err.error.data["log_index"]
    assert err.error.data["source"] == "cloister"
    assert httpx2.get(f"{stack.relay_url}/log/body/{index}/args", headers=auditor(stack)).status_code == 404


@pytest.mark.parametrize(
    "index",
    [str(10**40), str(1 << 64), "-1", "1e3", "0x10", "007", "%C2%B2", "%D9%A1", "1%20", "+1", "9" * 5000],
)
def test_huge_body_index_is_400_not_500(stack: Stack, index: str) -> None:
    for kind in ("args", "result"):
        r = httpx2.get(f"{stack.relay_url}/log/body/{index}/{kind}", headers=auditor(stack))
        assert r.status_code == 400, (index, r.status_code, r.text[:200])
        assert "decimal integer" in r.json()["error"] or "below 2**64" in r.json()["error"]
        r = httpx2.post(f"{stack.relay_url}/admin/redact/{index}/{kind}", headers=admin(stack))
        assert r.status_code == 400, (index, r.status_code)
    for query in ({"index": index}, {"index": "0", "size": index}):
        assert httpx2.get(f"{stack.relay_url}/log/proof/inclusion", params=query).status_code == 400
    for query in ({"from": index}, {"from": "0", "to": index}):
        assert httpx2.get(f"{stack.relay_url}/log/proof/consistency", params=query).status_code == 400


def test_policy_push_without_admin_token_is_refused(stack: Stack) -> None:
    # An admin-signed bundle (the one in force): without the admin token the relay does not even
    # hand it to the enclave; with it, the enclave judges it (and refuses it: not newer).
    bundle = stack.state.signed_bundle.read_bytes()
    url = f"{stack.relay_url}/admin/policy"
    for headers in ({}, auditor(stack), bearer(stack.token()), bearer("x" * 40)):
        r = httpx2.post(url, content=bundle, headers=headers)
        assert r.status_code == 401 and "admin token" in r.json()["error"], (headers, r.status_code, r.text)
    for path in ("/admin/pins?server=slow", "/admin/redact/0/args"):
        method: Any = httpx2.get if "pins" in path else httpx2.post
        assert method(f"{stack.relay_url}{path}").status_code == 401
    r = httpx2.post(url, content=bundle, headers=admin(stack))
    assert r.status_code == 409 and "not above the version in force" in r.json()["error"], r.text
    r = httpx2.get(f"{stack.relay_url}/admin/pins", params={"server": "slow"}, headers=admin(stack))
    assert r.status_code == 200 and "echo" in r.json()["pins"]
