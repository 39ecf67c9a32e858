"""The embedded default's state directory (`.cloister` unless --state or $CLOISTER_STATE).

    mock-nsm/root.pem        the mock NSM's root certificate: auditors pin it (--trust-root mock)
    keys/admin.key           dev admin key: signs policy bundles (pinned in enclave.toml)
    keys/issuer.key          dev token issuer key (cloister token issue)
    keys/body.key, body.pub  the auditor's X25519 key pair: the relay seals stored bodies to body.pub
    admin.token              the relay's admin token (/admin/*: policy push, pins, redaction)
    auditor.token            the relay's auditor token (GET /log/body/...)
    enclave.toml             the enclave's measured config (origin, admin key, trust root)
    bundle/                  the example bundle, with the dev issuer's public key added
    bundle.signed            that bundle, signed by the admin key for this state's origin, valid for
                             90 days (re-signed, with a higher version, when it changes, names
                             another origin, or has less than 30 days left)
    relay.toml               the relay's config
    log/                     the log's storage (C2SP tlog-tiles layout)
    witnesses/w1, w2         two local C2SP witnesses' state (keys, what they cosigned): outside log/,
                             as separate machines would keep it; witnesses/logs.toml: the log they follow
    run/                     sockets

Everything here is for development: private keys sit on disk in plain PEM (mode 0600).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from cloister.verify.bundle import read_bundle_header, read_bundle_scope, sign_bundle, unsigned_files
from cloister.verify.errors import DecodeError
from cloister.verify.jwt import encode_jwt

DEV_ISSUER = "cloister-dev"


def default_state_dir() -> Path:
    return Path(os.environ.get("CLOISTER_STATE", ".cloister"))


def _private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    if path.exists():
        key = load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise DecodeError(f"{path}: not an Ed25519 private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return key


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _public_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _raw_hex(key: ed25519.Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class DevState:
    root: Path

    @property
    def mock_nsm_dir(self) -> Path:
        return self.root / "mock-nsm"

    @property
    def mock_root(self) -> Path:
        return self.mock_nsm_dir / "root.pem"

    @property
    def enclave_config(self) -> Path:
        return self.root / "enclave.toml"

    @property
    def bundle_dir(self) -> Path:
        return self.root / "bundle"

    @property
    def signed_bundle(self) -> Path:
        return self.root / "bundle.signed"

    @property
    def relay_config(self) -> Path:
        return self.root / "relay.toml"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def witnesses_dir(self) -> Path:
        return self.root / "witnesses"

    def ensure_witnesses(self, count: int = 2) -> list[tuple[str, Path, str]]:
        """(name, state directory, vkey) of the local dev witnesses, created once each."""
        from cloister.witness.state import KEY_FILE, init_state, load_key

        out = []
        for i in range(1, count + 1):
            name, directory = f"cloister.local/witness-{i}", self.witnesses_dir / f"w{i}"
            cosigner = load_key(directory) if (directory / KEY_FILE).exists() else init_state(directory, name)
            out.append((cosigner.name, directory, cosigner.vkey))
        return out

    def admin_key(self) -> ed25519.Ed25519PrivateKey:
        return _private_key(self.root / "keys" / "admin.key")

    @property
    def admin_token_file(self) -> Path:
        return self.root / "admin.token"

    @property
    def auditor_token_file(self) -> Path:
        return self.root / "auditor.token"

    @property
    def body_key_file(self) -> Path:
        return self.root / "keys" / "body.key"

    @property
    def body_public_key_file(self) -> Path:
        return self.root / "keys" / "body.pub"

    def relay_secrets(self) -> None:
        """The relay's admin and auditor tokens (two different random secrets) and the auditor's
        X25519 key pair for sealed bodies; created once, private files (0600)."""
        from cryptography.hazmat.primitives.asymmetric import x25519

        for path in (self.admin_token_file, self.auditor_token_file):
            if not path.exists():
                _write_private(path, (secrets.token_urlsafe(32) + "\n").encode())
        if not self.body_key_file.exists():
            key = x25519.X25519PrivateKey.generate()
            _write_private(self.body_key_file, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
            pub = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            self.body_public_key_file.write_bytes(pub)

    def issuer_key(self) -> ed25519.Ed25519PrivateKey:
        return _private_key(self.root / "keys" / "issuer.key")

    def origin(self) -> str:
        path = self.root / "origin"
        if not path.exists():
            host = "".join(c for c in socket.gethostname().lower() if c.isalnum() or c in "-.")[:40] or "localhost"
            path.write_text(f"cloister.local/{host}/{secrets.token_hex(4)}\n")
        return path.read_text().strip()

    def mint_token(self, agent: str, roles: list[str], ttl_s: int = 3600) -> str:
        # The audience is this state's log origin, the example issuer's (default) audience: a token
        # minted for one deployment is refused by another.
        now = int(time.time())
        claims = {"iss": DEV_ISSUER, "aud": self.origin(), "sub": agent, "roles": roles, "iat": now, "exp": now + ttl_s}
        return encode_jwt(claims, self.issuer_key())


def ensure_state(
    root: Path,
    *,
    bundle_source: Path | None = None,
    clock: Callable[[], float] = time.time,
    witnessed: bool = True,
) -> DevState:
    """Create (or refresh) the dev state: keys, mock CA, enclave config, signed example bundle.

    `clock` (Unix seconds) dates the bundle's not-after. `witnessed`: the enclave config pins the
    two local witnesses (quorum 2), as `cloister up` runs them; False writes
    `unsafe_unwitnessed = true`, for tests of other things that start no witnesses."""
    from cloister.dev.mock_nsm import MockNsm

    st = DevState(root.resolve())
    for d in (st.root, st.run_dir, st.log_dir):
        d.mkdir(parents=True, exist_ok=True)
    st.root.chmod(0o700)
    # The mock NSM's CA is created on first use; the enclave config pins its root.
    MockNsm(st.mock_nsm_dir, {}).root_pem()
    admin = st.admin_key()
    st.relay_secrets()
    # Every image that has run this state's log may have signed it: pin the earlier ones as
    # predecessors, as an operator does when upgrading the EIF, so changing enclave code does not
    # strand the log. A new predecessor is added only when the measured code changed, so the
    # config, and PCR0, stay the same from run to run otherwise.
    from cloister.dev.measure import code_digest, mock_pcrs, runtime_digest

    history_file = st.root / "pcr0-history.json"
    history: list[dict[str, str]] = json.loads(history_file.read_text()) if history_file.exists() else []
    if witnessed:
        vkeys = [vkey for _name, _dir, vkey in st.ensure_witnesses()]
        witnessing = f"witnesses = {json.dumps(vkeys)}\nwitness_quorum = {len(vkeys)}\n"
    else:
        witnessing = "unsafe_unwitnessed = true\n"
    # The witness settings are measured like code: switching them is an upgrade too.
    code = hashlib.sha384(code_digest() + runtime_digest() + witnessing.encode()).hexdigest()
    same_code = bool(history) and history[-1]["code"] == code
    predecessors = [h["pcr0"] for h in (history[:-1] if same_code else history)]

    def render(preds: list[str]) -> str:
        return (
            "# The enclave's measured configuration (mock mode). Changing it changes PCR0.\n"
            f'origin = "{st.origin()}"\n'
            f'admin_keys = ["{_raw_hex(admin)}"]\n'
            'trust_root = "mock:mock-nsm/root.pem"\n'
            + witnessing
            + (f"predecessor_pcr0 = {json.dumps(preds)}\n" if preds else "")
        )

    config = render(predecessors)
    if not st.enclave_config.exists() or st.enclave_config.read_text() != config:
        st.enclave_config.write_text(config)
    if not same_code:
        pcr0 = mock_pcrs(config.encode())[0].hex()
        history_file.write_text(json.dumps([*history, {"code": code, "pcr0": pcr0}], indent=1) + "\n")
    _refresh_bundle(st, bundle_source, int(clock()))
    return st


def example_bundle_dir() -> Path:
    """The example bundle as shipped: entities.toml has placeholders; see copy_example_bundle."""
    return Path(str(resources.files("cloister.dev.examples").joinpath("bundle")))


def example_pins() -> dict[str, str]:
    """Values for the example bundle's placeholders: the mock PCR0 of the refunds server's code,
    the SHA-256 of the research server's file, and the research tools' definition pins."""
    import hashlib

    import anyio

    from cloister.dev.examples import refunds, research
    from cloister.verify.tools import tool_definition_hash

    async def research_tools() -> list[dict[str, object]]:
        return [
            t.model_dump(mode="json", by_alias=True, exclude_none=True)
            for t in await research.build_server().list_tools()
        ]

    values = {
        "@REFUNDS_PCR0@": refunds.expected_pcr0().hex(),
        "@RESEARCH_SHA256@": hashlib.sha256(research_artifact().read_bytes()).hexdigest(),
    }
    for tool in anyio.run(research_tools):
        values[f"@PIN:research:{tool['name']}@"] = tool_definition_hash(tool)
    return values


def research_artifact() -> Path:
    from cloister.dev.examples import research

    return Path(research.__file__).resolve()


def copy_example_bundle(dst: Path, source: Path | None = None) -> Path:
    """Copy a bundle directory, filling in the example's placeholders."""
    shutil.copytree(source or example_bundle_dir(), dst)
    entities = dst / "entities.toml"
    text = entities.read_text()
    if "@" in text:
        for key, value in example_pins().items():
            text = text.replace(key, value)
        entities.write_text(text)
    return dst


DEV_BUNDLE_VALIDITY_S = 90 * 86400
DEV_BUNDLE_RESIGN_S = 30 * 86400  # re-sign a bundle with less than this left


def _refresh_bundle(st: DevState, source: Path | None, now_s: int) -> None:
    """Copy the bundle, add the dev issuer key, and sign it for this state's origin when its
    content changed, it names another origin or none, or it expires within 30 days."""
    if st.bundle_dir.exists():
        shutil.rmtree(st.bundle_dir)
    copy_example_bundle(st.bundle_dir, source)
    (st.bundle_dir / "issuers").mkdir(exist_ok=True)
    (st.bundle_dir / "issuers" / f"{DEV_ISSUER}.pem").write_bytes(_public_pem(st.issuer_key()))
    from cloister.enclave.bundle import read_bundle_dir

    files = read_bundle_dir(st.bundle_dir)
    origin = st.origin()
    version = 1
    if st.signed_bundle.exists():
        old = st.signed_bundle.read_bytes()
        old_origin, old_not_after = read_bundle_scope(old)
        fresh = old_not_after is not None and old_not_after - now_s >= DEV_BUNDLE_RESIGN_S
        if unsigned_files(old) == files and old_origin == origin and fresh:
            return
        version = read_bundle_header(old)[0] + 1
    not_after = now_s + DEV_BUNDLE_VALIDITY_S
    st.signed_bundle.write_bytes(sign_bundle(files, version, st.admin_key(), origin=origin, not_after=not_after))
