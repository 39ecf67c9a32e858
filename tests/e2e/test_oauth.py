"""MCP authorization end to end (issue 11, part 1; decision 0019): a real OpenID provider (npm
`oidc-provider`, tests/e2e/oidc/provider.mjs) with dynamic client registration, PKCE and resource
indicators; the relay's RFC 9728 metadata; real OAuth clients (the Python SDK's
`OAuthClientProvider`, and `mcp-remote` as Claude Desktop and Cursor run it) signing in and calling
tools with the token the enclave verified; and every bad token answered 401 before a session."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from cloister.dev.state import DevState, copy_example_bundle, ensure_state, free_port
from cloister.relay.config import ConfigError, load_relay_config
from cloister.relay.enclave_client import EnclaveRefused, EnclaveUnavailable
from cloister.relay.oauth import (
    CACHE_SIZE,
    CACHE_TTL_S,
    REFRESH_S,
    BundleSettings,
    Refusal,
    ResourceMetadata,
    TokenCheck,
    TokenGate,
    issuer_urls,
)
from cloister.verify.entries import DecisionEntry, parse_entry
from cloister.verify.jwt import MAX_TOKEN_BYTES, encode_jwt
from cloister.verify.tiles import parse_entry_bundle
from tests.e2e.procs import start_enclave, start_relay, stop, wait_for, write_relay_config

HERE = Path(__file__).parent
NODE_MODULES = Path(os.environ.get("CLOISTER_NODE_MODULES", HERE.parent / "node" / "node_modules"))
AGENT = "oauth-bot"
ADMIN_TOKEN = "oauth-test-admin-token-0123456789"
HAS_NODE = shutil.which("node") is not None and (NODE_MODULES / "oidc-provider").is_dir()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class OAuthStack:
    state: DevState
    relay_url: str
    issuer: str
    key: ec.EllipticCurvePrivateKey  # the provider's signing key (its public half is in the bundle)
    calls_file: Path
    tmp: Path

    @property
    def mcp_url(self) -> str:
        return f"{self.relay_url}/mcp"

    def mint(self, **overrides: Any) -> str:
        """A token as the provider would issue it, signed with its key (or as overridden)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": AGENT,
            "aud": self.mcp_url,
            "iat": now,
            "exp": now + 300,
            "roles": ["tester"],
            "scope": "mcp",
        }
        key = overrides.pop("key", self.key)
        claims.update(overrides)
        return encode_jwt({k: v for k, v in claims.items() if v is not None}, key, kid="k1")

    def forwarded(self) -> list[dict[str, Any]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def log_size(self) -> int:
        att = httpx2.get(f"{self.relay_url}/log/attestation", params={"nonce": "00" * 16}).json()
        return int(att["checkpoint"].splitlines()[1])

    def entry(self, index: int) -> Any:
        size = self.log_size()
        n, width = index // 256, min(256, size - index // 256 * 256)
        path = f"tile/entries/{n:03d}" + (f".p/{width}" if width < 256 else "")
        return parse_entry(parse_entry_bundle(httpx2.get(f"{self.relay_url}/log/{path}").content)[index % 256])


def _bundle(dst: Path, issuer: str, resource: str, key: ec.EllipticCurvePrivateKey) -> Path:
    """The example bundle plus the provider as a second issuer (its tokens' audience: the /mcp URL),
    an agent only it may sign in, and a policy letting that agent's role call the test upstream."""
    copy_example_bundle(dst)
    (dst / "issuers").mkdir(exist_ok=True)
    (dst / "issuers" / "oidc.pem").write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    with (dst / "issuers.toml").open("a") as f:
        f.write(f'\n[issuers.oidc]\nissuer = "{issuer}"\naudience = "{resource}"\nkeys = ["issuers/oidc.pem"]\n')
    entities = (dst / "entities.toml").read_text()
    (dst / "entities.toml").write_text(
        entities.replace("[roles]\n", "[roles]\ntester = {}\n")
        + f'\n[agents.{AGENT}]\nroles = ["tester"]\nregion = "eu"\nissuers = ["{issuer}"]\n\n'
        '[servers.slow]\nregion = "eu"\ntools = ["echo", "sleep", "crash"]\n'
    )
    (dst / "policies" / "test.cedar").write_text(
        '@id("tester-slow")\npermit (principal in Cloister::Role::"tester", action, '
        'resource == Cloister::Server::"slow");\n'
    )
    return dst


def start_provider(tmp: Path, port: int, resource: str, key: ec.EllipticCurvePrivateKey) -> subprocess.Popen[bytes]:
    nums = key.private_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "kid": "k1",
        "alg": "ES256",
        "use": "sig",
        "x": _b64(nums.public_numbers.x.to_bytes(32, "big")),
        "y": _b64(nums.public_numbers.y.to_bytes(32, "big")),
        "d": _b64(nums.private_value.to_bytes(32, "big")),
    }
    key_file = tmp / "oidc-key.json"
    key_file.write_text(json.dumps(jwk))
    key_file.chmod(0o600)
    env = {
        **os.environ,
        "CLOISTER_NODE_MODULES": str(NODE_MODULES),
        "OIDC_PORT": str(port),
        "OIDC_KEY": str(key_file),
        "OIDC_RESOURCE": resource,
        "OIDC_ACCOUNT": AGENT,
        "OIDC_ROLES": "tester",
        "OIDC_TTL": "600",
    }
    proc = subprocess.Popen(
        ["node", str(HERE / "oidc" / "provider.mjs")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp / "oidc.log").open("ab"),
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"oidc-provider did not start: {(tmp / 'oidc.log').read_text()[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def oauth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthStack]:
    if not HAS_NODE:
        pytest.skip("needs node and tests/node/node_modules (scripts/test installs them)")
    tmp = tmp_path_factory.mktemp("oauth")
    relay_port, oidc_port = free_port(), free_port()
    issuer, resource = f"http://127.0.0.1:{oidc_port}", f"http://127.0.0.1:{relay_port}/mcp"
    key = ec.generate_private_key(ec.SECP256R1())
    state = ensure_state(tmp / "state", bundle_source=_bundle(tmp / "bundle", issuer, resource, key), witnessed=False)
    provider = start_provider(tmp, oidc_port, resource, key)
    sock = tmp / "enclave.vsock"
    enclave, _ = start_enclave(state.root, f"unix:{sock}", log=tmp / "enclave.log")
    calls = tmp / "calls.jsonl"
    (tmp / "admin.token").write_text(ADMIN_TOKEN)
    py = json.dumps(sys.executable)
    config = write_relay_config(
        tmp / "relay.toml",
        port=relay_port,
        sock=sock,
        extra='oauth_scopes = ["mcp"]\nenclave_timeout_s = 3\nadmin_token_file = "admin.token"\n',
        upstreams=f"""
[[upstreams]]
name = "slow"
command = [{py}, "{HERE / "slow_server.py"}"]
env = {{ CALLS_FILE = "{calls}" }}
timeout_s = 5
""",
    )
    relay = start_relay(config, tmp / "relay.log")
    stack = OAuthStack(state, f"http://127.0.0.1:{relay_port}", issuer, key, calls, tmp)

    def up() -> bool:
        try:
            health = httpx2.get(f"{stack.relay_url}/healthz", timeout=2).json()
        except (httpx2.HTTPError, ValueError):
            return relay.poll() is not None
        return relay.poll() is not None or health.get("upstreams", {}).get("slow", {}).get("state") == "up"

    try:
        wait_for(up, 60, "the relay and its upstream")
        if relay.poll() is not None:
            raise RuntimeError((tmp / "relay.log").read_text()[-3000:])
        yield stack
    finally:
        for proc in (relay, enclave, provider):
            stop(proc)


# ---- the door, in process: what it caches, what it never lets through ---------------------------


class FakeEnclave:
    """Stands for the enclave's FilterTools: accepts the tokens in `accepted`, refuses the rest
    (UNAUTHENTICATED, the enclave's "reason: message"), or is down."""

    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.asked: list[str] = []
        self.down = False
        self.reason = "bad-signature"
        self.code = grpc.StatusCode.UNAUTHENTICATED

    async def filter_tools(self, token: str, candidates: list[tuple[str, str]]) -> None:
        self.asked.append(token)
        assert candidates == []
        if self.down:
            raise EnclaveUnavailable("enclave unavailable (UNAVAILABLE): connection refused")
        if token not in self.accepted:
            raise EnclaveRefused(self.code, f"{self.reason}: token signature does not verify")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _unsigned(claims: dict[str, Any]) -> str:
    return f"{_b64(b'{}')}.{_b64(json.dumps(claims).encode())}.{_b64(b'sig')}"


def _door(enclave: FakeEnclave, clock: Clock) -> tuple[TokenCheck, TokenGate, list[str]]:
    passed: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        passed.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    check = TokenCheck(enclave, clock=clock)  # type: ignore[arg-type]
    meta = ResourceMetadata(resource="https://mcp.example/mcp", authorization_servers=("https://id.example",))
    return check, TokenGate(app, lambda: (meta, True), check), passed


async def _knock(
    gate: TokenGate, authorization: bytes | None, path: str = "/mcp"
) -> tuple[int, dict[bytes, bytes], Any]:
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    headers = [(b"authorization", authorization)] if authorization is not None else []
    await gate({"type": "http", "method": "POST", "path": path, "headers": headers}, receive, send)
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(body)


def test_a_yes_is_cached_briefly_never_past_exp_and_a_no_never() -> None:
    enclave, clock = FakeEnclave(), Clock(1_000_000.0)
    check, _, _ = _door(enclave, clock)
    good, short = _unsigned({"exp": 1_000_600}), _unsigned({"exp": 1_000_005})
    enclave.accepted |= {good, short}

    async def scenario() -> None:
        await check.check(good)
        await check.check(good)
        assert enclave.asked == [good]  # the second is the cache's
        clock.now += CACHE_TTL_S + 1
        await check.check(good)
        assert enclave.asked == [good, good]  # asked again after CACHE_TTL_S
        await check.check(short)
        clock.now += 6  # past the token's exp: the enclave is the one to say whether leeway applies
        await check.check(short)
        assert enclave.asked.count(short) == 2
        enclave.accepted.clear()
        for _ in range(2):
            with pytest.raises(Refusal):
                await check.check(short)
        assert enclave.asked.count(short) == 4  # refusals are never remembered

    anyio.run(scenario)


def test_the_cache_is_bounded() -> None:
    enclave, clock = FakeEnclave(), Clock(1_000_000.0)
    check, _, _ = _door(enclave, clock)
    tokens = [_unsigned({"exp": 1_000_600, "n": i}) for i in range(CACHE_SIZE + 10)]
    enclave.accepted |= set(tokens)

    async def scenario() -> None:
        for t in tokens:
            await check.check(t)
        assert len(check._accepted) == CACHE_SIZE
        await check.check(tokens[0])  # the oldest went first: asked again
        assert enclave.asked.count(tokens[0]) == 2

    anyio.run(scenario)


def test_the_door_fails_closed_and_says_only_fixed_words() -> None:
    enclave, clock = FakeEnclave(), Clock(1_000_000.0)
    _, gate, passed = _door(enclave, clock)

    async def scenario() -> None:
        status, headers, body = await _knock(gate, None)
        assert status == 401 and body["error"]["code"] == -32003
        assert headers[b"www-authenticate"] == (
            b'Bearer resource_metadata="https://mcp.example/.well-known/oauth-protected-resource/mcp"'
        )
        status, headers, _ = await _knock(gate, b"Basic dXNlcjpwYXNz")
        assert status == 401 and b'error="invalid_request"' in headers[b"www-authenticate"]
        # A refusal class the door does not know (a hostile or newer enclave answer) is not repeated.
        enclave.reason = 'x", error="evil'
        status, headers, body = await _knock(gate, b"Bearer \xff\xfe\r")
        assert status == 401 and body["error"]["data"]["reason"] == "refused"
        assert headers[b"www-authenticate"].count(b"error=") == 1 and b"evil" not in headers[b"www-authenticate"]
        # Too long for any JWT: refused without asking the enclave.
        asked = len(enclave.asked)
        status, _, body = await _knock(gate, b"Bearer " + b"a" * (MAX_TOKEN_BYTES + 1))
        assert status == 401 and body["error"]["data"]["reason"] == "malformed" and len(enclave.asked) == asked
        # A token the enclave cannot read at all is refused too; an enclave fault is no refusal.
        bad = b"Bearer " + _unsigned({"exp": 1_000_600}).encode()
        enclave.code = grpc.StatusCode.INVALID_ARGUMENT
        status, _, body = await _knock(gate, bad)
        assert status == 401 and body["error"]["data"]["reason"] == "malformed"
        enclave.code = grpc.StatusCode.INTERNAL
        assert (await _knock(gate, bad))[0] == 503
        # The enclave down: 503, nothing reaches MCP.
        enclave.down = True
        status, headers, body = await _knock(gate, b"Bearer " + _unsigned({"exp": 1_000_600}).encode())
        assert status == 503 and body["error"]["code"] == -32004 and headers[b"retry-after"] == b"2"
        # Other paths are not the door's: the metadata and the log stay public.
        assert (await _knock(gate, None, "/log/checkpoint"))[0] == 200
        assert passed == ["/log/checkpoint"]

    anyio.run(scenario)


def test_metadata_url_is_path_suffixed_per_rfc_9728() -> None:
    meta = ResourceMetadata(resource="https://gw.example:8443/tenant/mcp", authorization_servers=(), scopes=("mcp",))
    assert meta.metadata_url == "https://gw.example:8443/.well-known/oauth-protected-resource/tenant/mcp"
    assert meta.challenge("invalid_token", "the token has expired") == (
        'Bearer resource_metadata="https://gw.example:8443/.well-known/oauth-protected-resource/tenant/mcp", '
        'scope="mcp", error="invalid_token", error_description="the token has expired"'
    )


def test_issuer_urls_come_from_the_bundle_and_garbage_gives_none(tmp_path: Path) -> None:
    from cloister.verify.bundle import sign_bundle

    issuers = b'[issuers.a]\nissuer = "cloister-dev"\n[issuers.b]\nissuer = "https://id.example/r"\n[issuers.c]\n'
    signed = sign_bundle(
        {"issuers.toml": issuers}, 1, ed25519.Ed25519PrivateKey.generate(), origin="o.example/x", not_after=2**31
    )
    assert issuer_urls(signed) == ("https://id.example/r",)  # a label is no URL; a non-URL issuer is none
    for garbage in (None, b"", b"\x00" * 64, signed[:-10]):
        assert issuer_urls(garbage) == ()


def _signed(issuers: bytes, version: int = 1) -> bytes:
    from cloister.verify.bundle import sign_bundle

    key = ed25519.Ed25519PrivateKey.from_private_bytes(b"k" * 32)
    return sign_bundle({"issuers.toml": issuers}, version, key, origin="o.example/x", not_after=2**31)


def test_settings_follow_the_bundle_the_relay_holds() -> None:
    held = {"bundle": _signed(b'[issuers.dev]\nissuer = "cloister-dev"\n'), "stamp": 1}
    reads: list[int] = []

    def bundle() -> bytes:
        reads.append(1)
        return held["bundle"]  # type: ignore[return-value]

    clock = Clock(100.0)
    settings = BundleSettings(
        "https://mcp.example/mcp", None, (), None, bundle=bundle, stamp=lambda: held["stamp"], clock=clock
    )
    meta, gate = settings()
    assert meta.authorization_servers == () and gate is False  # static tokens only: no sign-in, no door
    # A pushed bundle trusts an OIDC issuer: seen within REFRESH_S, without a restart.
    held["bundle"], held["stamp"] = _signed(b'[issuers.idp]\nissuer = "https://id.example"\n', 2), 2
    assert settings() == (meta, False) and len(reads) == 1  # not looked at again yet
    clock.now += REFRESH_S
    meta, gate = settings()
    assert meta.authorization_servers == ("https://id.example",) and gate is True and len(reads) == 2
    clock.now += REFRESH_S
    settings()
    assert len(reads) == 2  # same stamp: not read again
    # Configured servers and an explicit token_gate win; the bundle is then never read.
    fixed = BundleSettings(
        "https://mcp.example/mcp", ("https://as.example",), ("mcp",), False, bundle=bundle, stamp=lambda: 0
    )
    assert fixed()[0].authorization_servers == ("https://as.example",) and fixed()[1] is False and len(reads) == 2


@pytest.mark.parametrize(
    ("line", "text"),
    [
        ('resource_url = "ftp://x/mcp"', "resource_url"),
        ('resource_url = "https://x/mcp#frag"', "resource_url"),
        ('authorization_servers = ["https://ok.example", "id.example"]', "authorization_servers"),
        ('authorization_servers = ["https://a.example/\\"evil"]', "authorization_servers"),
        ('oauth_scopes = ["mcp", "a\\"b"]', "oauth_scopes"),
        ("token_gate = 1", "token_gate"),
    ],
)
def test_oauth_config_keys_are_checked(tmp_path: Path, line: str, text: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f'[relay]\nenclave = "unix:/x"\n{line}\n')
    with pytest.raises(ConfigError, match=text):
        load_relay_config(path)


def test_oauth_config_defaults(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[relay]\nenclave = "unix:/x"\npublic_url = "https://gw.example/"\n')
    c = load_relay_config(path)
    assert c.mcp_resource == "https://gw.example/mcp" and c.authorization_servers is None and c.token_gate is None


# ---- RFC 9728 metadata and the 401 challenge ----------------------------------------------------


def test_protected_resource_metadata_names_the_mcp_url_and_the_bundles_issuer(oauth: OAuthStack) -> None:
    for path in ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"):
        r = httpx2.get(oauth.relay_url + path)
        assert r.status_code == 200, (path, r.text)
        doc = r.json()
        # The bundle's URL issuer only: "cloister-dev" is no authorization server.
        assert doc["resource"] == oauth.mcp_url and doc["authorization_servers"] == [oauth.issuer], doc
        assert doc["scopes_supported"] == ["mcp"] and doc["bearer_methods_supported"] == ["header"]


def test_no_token_is_challenged_with_the_metadata_url(oauth: OAuthStack) -> None:
    r = httpx2.post(oauth.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize"})
    assert r.status_code == 401 and "mcp-session-id" not in r.headers
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{oauth.relay_url}/.well-known/oauth-protected-resource/mcp"' in challenge
    assert "error=" not in challenge  # RFC 6750 §3.1: no error code when no credentials were sent


def post(url: str, token: str, body: dict[str, Any], session: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    if session:
        headers["Mcp-Session-Id"] = session
    return httpx2.post(url, json=body, headers=headers, timeout=10)


def initialize(url: str, token: str, version: str = "2025-06-18") -> httpx2.Response:
    params = {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    return post(url, token, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params})


def rpc_result(r: httpx2.Response) -> Any:
    """The JSON-RPC message of a streamable HTTP answer (JSON, or one SSE event)."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1])
    return r.json()


def _bad_tokens(s: OAuthStack) -> dict[str, tuple[str, str]]:
    now = int(time.time())
    other = ec.generate_private_key(ec.SECP256R1())
    signed = s.mint()
    return {
        "garbage": ("not-a-jwt", "malformed"),
        "not json": ("e30.bm90IGpzb24.c2ln", "malformed"),  # "{}", "not json", "sig"
        "forged": (s.mint(key=other), "bad-signature"),
        "tampered": (signed.rsplit(".", 1)[0] + "." + _b64(b"x" * 64), "bad-signature"),
        "expired": (s.mint(iat=now - 3600, exp=now - 600), "expired"),
        "wrong audience": (s.mint(aud="http://elsewhere.example/mcp"), "wrong-audience"),
        "unknown issuer": (s.mint(iss="https://id.evil.example"), "unknown-issuer"),
        "dev issuer for an oauth agent": (s.state.mint_token(AGENT, ["tester"], 300), "issuer-not-bound"),
        "unregistered agent": (s.mint(sub="mallory"), "unknown-agent"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "garbage",
        "not json",
        "forged",
        "tampered",
        "expired",
        "wrong audience",
        "unknown issuer",
        "dev issuer for an oauth agent",
        "unregistered agent",
    ],
)
def test_bad_tokens_get_401_before_any_session(oauth: OAuthStack, case: str) -> None:
    token, reason = _bad_tokens(oauth)[case]
    size = oauth.log_size()
    r = initialize(oauth.mcp_url, token)
    assert r.status_code == 401, (case, r.status_code, r.text)
    assert "mcp-session-id" not in r.headers, "a session was opened for a refused token"
    challenge = r.headers["www-authenticate"]
    assert 'error="invalid_token"' in challenge and "resource_metadata=" in challenge, challenge
    error = r.json()["error"]
    assert error["code"] == -32003 and error["data"]["reason"] == reason, (case, error)
    # Clean words: no parser's message, no Python exception, nothing the token said.
    text = r.text + challenge
    for word in ("Expecting", "Traceback", "Error(", "column", "mallory", "evil", "elsewhere"):
        assert word not in text, (case, word, text)
    assert oauth.log_size() == size  # refused at the door: no decision to log


def test_a_token_that_expires_mid_session_gets_401_on_the_next_request(oauth: OAuthStack) -> None:
    # Past its `exp` but inside the enclave's 30 s leeway for clock skew: accepted for ~3 s more.
    now = int(time.time())
    token = oauth.mint(iat=now - 60, exp=now - 27)
    r = initialize(oauth.mcp_url, token)
    assert r.status_code == 200 and rpc_result(r)["result"]["protocolVersion"] == "2025-06-18", r.text
    sid = r.headers["mcp-session-id"]
    post(oauth.mcp_url, token, {"jsonrpc": "2.0", "method": "notifications/initialized"}, sid)
    listing = post(oauth.mcp_url, token, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, sid)
    assert sorted(t["name"] for t in rpc_result(listing)["result"]["tools"]) == [
        "slow___crash",
        "slow___echo",
        "slow___sleep",
    ]
    time.sleep(max(0.0, now + 4 - time.time()))
    # The same session's next request: the standard challenge, so the client signs in again.
    r = post(oauth.mcp_url, token, {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, sid)
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"], (r.status_code, r.text)
    assert r.json()["error"]["data"]["reason"] == "expired"
    # A new token from the provider carries on in the same session.
    again = post(oauth.mcp_url, oauth.mint(), {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, sid)
    assert again.status_code == 200 and len(rpc_result(again)["result"]["tools"]) == 3


# ---- real clients signing in ------------------------------------------------------------------


class _Memory:
    """The Python SDK's token storage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


async def browse(url: str, stop_at: str) -> str:
    """The user's browser: follow the provider's redirects (with its cookies) through the
    automated login and consent, until the redirect back to the client (`stop_at`)."""
    async with httpx2.AsyncClient(timeout=10) as browser:
        for _ in range(20):
            r = await browser.get(url)
            location = r.headers.get("location")
            assert r.is_redirect and location, (r.status_code, r.text[:500])
            url = urllib.parse.urljoin(str(r.url), location)
            if url.startswith(stop_at):
                return url
    raise AssertionError("the provider kept redirecting")


def test_python_sdk_signs_in_with_dcr_and_pkce_then_calls_a_tool(oauth: OAuthStack) -> None:
    redirect = "http://127.0.0.1:1/callback"  # never dialled: the browser stops at the redirect
    storage = _Memory()
    landed: list[str] = []

    async def redirect_handler(url: str) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
        assert query["code_challenge_method"] == ["S256"] and query["resource"] == [oauth.mcp_url], query
        landed.append(await browse(url, redirect))

    async def callback_handler() -> AuthorizationCodeResult:
        query = urllib.parse.parse_qs(urllib.parse.urlparse(landed[-1]).query)
        assert "error" not in query, query
        return AuthorizationCodeResult(code=query["code"][0], state=query["state"][0], iss=query.get("iss", [None])[0])

    auth = OAuthClientProvider(
        server_url=oauth.mcp_url,
        client_metadata=OAuthClientMetadata(
            client_name="cloister-test",
            redirect_uris=[redirect],  # type: ignore[list-item]
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        storage=storage,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )

    async def run() -> Any:
        http = httpx2.AsyncClient(auth=auth, timeout=20)
        async with http, Client(streamable_http_client(oauth.mcp_url, http_client=http), cache=None) as c:
            names = sorted(t.name for t in (await c.list_tools()).tools)
            return names, await c.call_tool("slow___echo", {"text": "signed in"})

    try:
        names, result = anyio.run(run)
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    assert storage.client is not None and storage.client.client_id, "no dynamic client registration"
    assert storage.tokens is not None and len(landed) == 1
    # The provider's token is a JWT for this resource, naming the agent the bundle registers.
    claims = json.loads(base64.urlsafe_b64decode(storage.tokens.access_token.split(".")[1] + "=="))
    assert claims["iss"] == oauth.issuer and claims["aud"] == oauth.mcp_url and claims["sub"] == AGENT, claims
    assert names == ["slow___crash", "slow___echo", "slow___sleep"]
    assert not result.is_error and result.content[0].text == "signed in"
    decision = oauth.entry(result.meta["dev.cloister/log"]["decision"])
    assert isinstance(decision, DecisionEntry) and decision.decision == "allow" and decision.agent == AGENT
    assert oauth.forwarded()[-1] == {"tool": "echo", "args": {"text": "signed in"}}


MCP_REMOTE = NODE_MODULES / "mcp-remote" / "dist" / "proxy.js"


@pytest.mark.skipif(not MCP_REMOTE.exists(), reason="needs mcp-remote in tests/node")
def test_mcp_remote_signs_in_without_a_header_then_calls_a_tool(oauth: OAuthStack, tmp_path: Path) -> None:
    """`mcp-remote <url>` as Claude Desktop and Cursor run it: no header, so it discovers the
    provider from the 401, registers, and sends the user to the provider; our 'browser' follows."""
    from mcp.client.stdio import stdio_client

    from tests.e2e.test_clients import guide_block, mcp_remote_params

    callback_port = free_port()
    errlog = tmp_path / "mcp-remote.log"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "MCP_REMOTE_CONFIG_DIR": str(tmp_path / "mcp-auth"),
        "BROWSER": "false",  # no browser here: the test reads the URL mcp-remote prints
    }
    # The guide's OAuth entry for Claude Desktop and Cursor, with the test's callback port.
    block = guide_block("mcp-remote-oauth")
    params = mcp_remote_params(block, oauth.mcp_url, env, str(callback_port), "--host", "127.0.0.1")
    assert not any("header" in a for a in params.args)

    async def login() -> None:
        # mcp-remote prints the authorization URL on stderr; be the user's browser for it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = errlog.read_text() if errlog.exists() else ""
            found = re.search(r"(http://127\.0\.0\.1:\d+/auth\?\S+)", text)
            if found:
                url = found.group(1)
                async with httpx2.AsyncClient(timeout=10, follow_redirects=True) as browser:
                    r = await browser.get(url)  # ends at mcp-remote's own callback page
                    assert r.status_code == 200, (r.status_code, r.text[:300])
                return
            await anyio.sleep(0.2)
        raise AssertionError(f"mcp-remote printed no authorization URL: {errlog.read_text()[-2000:]}")

    async def run() -> Any:
        with errlog.open("w") as err, anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(login)
                async with Client(stdio_client(params, errlog=err), cache=None) as c:
                    names = sorted(t.name for t in (await c.list_tools()).tools)
                    result = await c.call_tool("slow___echo", {"text": "via mcp-remote"})
                return names, result

    try:
        names, result = anyio.run(run)
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    assert names == ["slow___crash", "slow___echo", "slow___sleep"], errlog.read_text()[-2000:]
    assert not result.is_error and result.content[0].text == "via mcp-remote"
    decision = oauth.entry(result.meta["dev.cloister/log"]["decision"])
    assert isinstance(decision, DecisionEntry) and decision.agent == AGENT


def test_a_cached_yes_at_the_door_grants_nothing_after_the_agent_is_removed(oauth: OAuthStack) -> None:
    """The door's cache decides only when a 401 comes. Last in this module: it removes the agent."""
    from cloister.enclave.bundle import read_bundle_dir
    from cloister.verify.bundle import read_bundle_header, sign_bundle

    token = oauth.mint()
    r = initialize(oauth.mcp_url, token)  # the door asks the enclave, and remembers the yes
    assert r.status_code == 200
    sid = r.headers["mcp-session-id"]
    post(oauth.mcp_url, token, {"jsonrpc": "2.0", "method": "notifications/initialized"}, sid)
    # A policy push (admin-signed) that no longer registers the agent.
    edited = oauth.tmp / "bundle-v2"
    shutil.copytree(oauth.state.bundle_dir, edited)
    entities = (edited / "entities.toml").read_text()
    (edited / "entities.toml").write_text(re.sub(rf"\n\[agents\.{AGENT}\]\n(?:[^\[\n][^\n]*\n)*", "\n", entities))
    assert f"agents.{AGENT}" not in (edited / "entities.toml").read_text()
    version = read_bundle_header(oauth.state.signed_bundle.read_bytes())[0] + 1
    signed = sign_bundle(
        read_bundle_dir(edited),
        version,
        oauth.state.admin_key(),
        origin=oauth.state.origin(),
        not_after=int(time.time()) + 30 * 86400,
    )
    pushed = httpx2.post(
        f"{oauth.relay_url}/admin/policy", content=signed, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert pushed.status_code == 200, pushed.text
    # Within the cache's 30 s the door lets the request in; the enclave refuses the call itself.
    before = len(oauth.forwarded())
    call = {"name": "slow___echo", "arguments": {"text": "after removal"}}
    answer = post(oauth.mcp_url, token, {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": call}, sid)
    assert answer.status_code == 200, answer.text
    error = rpc_result(answer)["error"]
    assert error["code"] in (-32001, -32003) and "not registered" in error["message"], error
    assert len(oauth.forwarded()) == before, "a call was forwarded for a removed agent"
    listing = post(oauth.mcp_url, token, {"jsonrpc": "2.0", "id": 6, "method": "tools/list"}, sid)
    assert "error" in rpc_result(listing), listing.text
