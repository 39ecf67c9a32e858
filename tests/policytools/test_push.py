"""`cloister policy sign` and `push` against a real relay and enclave (processes, sockets).

Every bad bundle is refused with the enclave's reason and leaves the running bundle in force.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.dev.state import DevState, ensure_state, free_port
from cloister.enclave.bundle import read_bundle_dir
from cloister.policytools.signing import push
from cloister.verify.bundle import ALG_EDDSA, FORMAT, admin_key_id
from cloister.verify.bundle import sign_bundle as sign
from cloister.verify.cose import encode_cose_sign1
from tests.e2e.procs import start_enclave, start_relay, stop, wait_for, write_relay_config
from tests.policytools.conftest import cli, make_bundle, sign_local


@dataclass
class Relay:
    url: str
    state: DevState
    tmp: Path

    def health(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                body: dict[str, Any] = json.loads(r.read())
                return body
        except OSError:
            return {}

    @property
    def version(self) -> int:
        return int(self.health()["enclave"]["policy_version"])


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    tmp = tmp_path_factory.mktemp("push")
    state = ensure_state(tmp / "state", bundle_source=make_bundle(tmp / "source"), witnessed=False)
    sock = tmp / "enclave.vsock"
    enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp / "enclave.log")
    port = free_port()
    extra = f'enclave_timeout_s = 5\nadmin_token_file = "{state.admin_token_file}"\n'
    config = write_relay_config(tmp / "relay.toml", port=port, sock=sock, extra=extra)
    proc = start_relay(config, tmp / "relay.log")
    r = Relay(url=f"http://127.0.0.1:{port}", state=state, tmp=tmp)
    try:
        wait_for(lambda: proc.poll() is not None or r.health().get("ready") is True, 60, "the relay to be ready")
        if proc.poll() is not None:
            raise RuntimeError((tmp / "relay.log").read_text()[-3000:])
        yield r
    finally:
        stop(proc)
        stop(enclave)


def test_sign_then_push_then_every_bad_bundle_is_refused(relay: Relay, tmp_path: Path) -> None:
    admin_key = relay.state.root / "keys" / "admin.key"
    origin = relay.state.origin()
    assert relay.version == 1
    signed = tmp_path / "v2.bundle"
    s = cli(
        "sign",
        str(relay.state.bundle_dir),
        *("--key", str(admin_key), "--version", "2", "--origin", origin, "--out", str(signed)),
    )
    assert s.returncode == 0, s.stderr
    sha = s.stdout.split("sha256:")[1].split()[0]

    token = ("--admin-token-file", str(relay.state.admin_token_file))
    # Without the relay's admin token the push does not reach the enclave.
    anonymous = cli("push", str(signed), "--relay", relay.url)
    assert anonymous.returncode == 1 and "needs the admin token" in anonymous.stderr, anonymous.stderr
    assert relay.version == 1
    ok = cli("push", str(signed), "--relay", relay.url, *token)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"in force: version 2, sha256 {sha}"
    assert relay.version == 2

    def refused(data: bytes, name: str) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        r = cli("push", str(path), "--relay", relay.url, *token)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stderr.startswith("cloister policy push: refused: the enclave refused the bundle: "), r.stderr
        assert relay.version == 2  # the running bundle is untouched
        return r.stderr

    files = read_bundle_dir(relay.state.bundle_dir)
    admin = relay.state.admin_key()

    def sign_bundle(
        files: dict[str, bytes], version: int, key: ed25519.Ed25519PrivateKey, *, for_origin: str = origin
    ) -> bytes:
        # The relay's enclave runs on the real clock, as this test process does.
        return sign(files, version, key, origin=for_origin, not_after=int(time.time()) + 86400)

    # A stale version (a replay of the one in force) and a rollback.
    assert refused(signed.read_bytes(), "replay") == (
        "cloister policy push: refused: the enclave refused the bundle: bundle version 2 is not above the version in "
        "force (2); rollbacks and replays are refused\n"
    )
    assert "bundle version 1 is not above" in refused(sign_bundle(files, 1, admin), "rollback")
    # Signed by a key the enclave does not pin.
    stranger = ed25519.Ed25519PrivateKey.generate()
    assert "which is not a pinned admin key" in refused(sign_bundle(files, 3, stranger), "stranger")
    # A flipped bit in the signature.
    good = bytearray(sign_bundle(files, 3, admin))
    good[-1] ^= 1
    assert f"bundle signature by admin key '{admin_key_id(admin.public_key())}' does not verify" in refused(
        bytes(good), "tampered"
    )
    # Content the enclave's parser refuses, signed by the real key (bypassing `policy sign`).
    bad_cedar = {**files, "policies/x.cedar": b'@id("x") permit (principal, action, resource) when { 1 + };'}
    assert "policies/x.cedar: invalid Cedar" in refused(sign_bundle(bad_cedar, 3, admin), "cedar")
    negative = {**files, "limits.toml": b'[[limits]]\nid = "n"\nkind = "rate"\nmax = "-1"\nwindow = "1h"\n'}
    assert "limits.toml: limit 'n': max: '-1' is negative or absurdly large" in refused(
        sign_bundle(negative, 3, admin), "negative"
    )
    unknown = {
        **files,
        "limits.toml": b'[[limits]]\nid = "u"\nkind = "rate"\nagents = ["ghost"]\nmax = "1"\nwindow = "1h"\n',
    }
    assert "limits.toml: limit 'u': unknown agent 'ghost'" in refused(sign_bundle(unknown, 3, admin), "unknown")
    # Signed by the real key for another deployment (a staging log), or past its not-after.
    staging = sign_bundle(files, 3, admin, for_origin="cloister.example/staging")
    assert f"bundle is for the log 'cloister.example/staging', not this one ('{origin}')" in refused(staging, "staging")
    expired = sign(files, 3, admin, origin=origin, not_after=int(time.time()) - 60)
    assert "bundle expired: not after " in refused(expired, "expired")

    # The next version, validated and signed by the CLI, is accepted.
    v3 = tmp_path / "v3.bundle"
    v3_args = ("--key", str(admin_key), "--version", "3", "--origin", origin, "--out", str(v3))
    assert cli("sign", str(relay.state.bundle_dir), *v3_args).returncode == 0
    result = push(v3, relay.url, admin_token=relay.state.admin_token_file.read_text().strip())
    assert (result.outcome, result.version, result.exit_code) == ("in-force", 3, 0)


def test_an_oversize_bundle_is_refused(relay: Relay, tmp_path: Path) -> None:
    import cbor2

    admin = relay.state.admin_key()
    files = read_bundle_dir(relay.state.bundle_dir)
    before = relay.version
    # `sign_bundle` refuses to make one, so build the COSE_Sign1 by hand.
    payload = cbor2.dumps(
        {
            "format": FORMAT,
            "version": before + 1,
            "origin": relay.state.origin(),
            "not_after": int(time.time()) + 86400,
            "files": {**files, "big.txt": b"x" * ((8 << 20) + (64 << 10))},
        },
        canonical=True,
    )
    kid = admin_key_id(admin.public_key()).encode()
    path = tmp_path / "big.bundle"
    path.write_bytes(encode_cose_sign1({1: ALG_EDDSA, 4: kid}, {}, payload, admin.sign, tagged=True))
    # The CLI does not even send it.
    r = cli("push", str(path), "--relay", relay.url)
    assert r.returncode == 1 and "more than a bundle may have" in r.stderr, r.stderr
    # Sent anyway, the enclave refuses it with the reason.
    req = urllib.request.Request(
        f"{relay.url}/admin/policy",
        data=path.read_bytes(),
        method="POST",
        headers={
            "Content-Type": "application/octet-stream",
            "Authorization": f"Bearer {relay.state.admin_token_file.read_text().strip()}",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(req, timeout=30)
    assert answer.value.code in (409, 413)
    assert "exceeds the limit" in json.loads(answer.value.read())["error"]
    assert relay.version == before


def test_push_network_and_input_errors(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    key = ed25519.Ed25519PrivateKey.generate()
    signed = tmp_path / "x.bundle"
    signed.write_bytes(sign_local(read_bundle_dir(bundle), 1, key))
    port = free_port()  # nothing listens there
    down = cli("push", str(signed), "--relay", f"http://127.0.0.1:{port}", "--timeout", "5")
    assert down.returncode == 3 and "cannot reach" in down.stderr
    assert cli("push", str(tmp_path / "missing"), "--relay", "http://127.0.0.1:1").returncode == 2
    no_token = cli("push", str(signed), "--relay", "http://127.0.0.1:1", "--admin-token-file", str(tmp_path / "none"))
    assert no_token.returncode == 2 and "--admin-token-file: cannot read" in no_token.stderr
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00" * 64)
    not_bundle = cli("push", str(garbage), "--relay", f"http://127.0.0.1:{port}")
    assert not_bundle.returncode == 1 and "not a signed bundle" in not_bundle.stderr
    assert cli("push", str(signed), "--relay", "ftp://x").returncode == 2
