"""An in-process Cloister enclave for tests: mock NSM, dev keys, the example bundle, a fake clock.

Nothing here is mocked but the Nitro hardware (MockNsm) and the passage of time (a settable
clock), so the code under test is exactly what `cloister enclave` runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.dev.measure import mock_pcrs
from cloister.dev.mock_nsm import MockNsm
from cloister.dev.state import copy_example_bundle
from cloister.enclave.bundle import read_bundle_dir
from cloister.enclave.config import load_config
from cloister.enclave.core import EnclaveCore, LogAppend
from cloister.enclave.sealing import derive_log_key
from cloister.verify.bundle import sign_bundle
from cloister.verify.jwt import encode_jwt

# The test world's epoch: a fixed instant, not the wall clock, so in-process tests give the same
# answers on any date and at any hour (a Monday, inside the example's business hours).
EPOCH = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)
ORIGIN = "cloister.test/log"  # the world enclave's log origin (enclave.toml)
BUNDLE_VALIDITY_S = 90 * 86400  # how long World.sign_bundle's bundles stay loadable by default


def epoch_ms(at: datetime = EPOCH) -> int:
    return int(at.timestamp() * 1000)


@dataclass
class Clock:
    """The one injectable clock of a test world: the enclave, the mock NSM's certificates and
    documents, tokens and grants all read it, so moving it moves everything together."""

    ms: int = field(default_factory=epoch_ms)

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.ms / 1000, UTC)

    def seconds(self) -> int:
        return self.ms // 1000


@dataclass
class World:
    root: Path
    admin: ed25519.Ed25519PrivateKey
    issuer: ed25519.Ed25519PrivateKey
    clock: Clock
    core: EnclaveCore
    config_path: Path
    bundle_dir: Path
    log: list[bytes] = field(default_factory=list)
    checkpoints: list[bytes] = field(default_factory=list)
    # The log key's seed, as KMS would keep it sealed: every core of this world derives the same
    # log key from it (tests/enclave/test_sealed_start.py runs the real exchange instead).
    seed: bytes = field(default_factory=lambda: os.urandom(32))

    def persist(self, a: LogAppend) -> None:
        """Store entries like the parent does (in order, exactly once)."""
        for i, data in enumerate(a.entries):
            index = a.first_index + i
            if index < len(self.log):
                assert self.log[index] == data
            else:
                assert index == len(self.log), f"gap: got {index}, have {len(self.log)}"
                self.log.append(data)
        self.checkpoints.append(a.checkpoint.note)

    def token(self, agent: str, roles: list[str], ttl: int = 600, **over: object) -> str:
        now = self.clock.seconds()
        claims: dict[str, object] = {
            "iss": "cloister-dev",
            "aud": ORIGIN,  # the example issuer's audience: the log origin
            "sub": agent,
            "roles": roles,
            "iat": now,
            "exp": now + ttl,
        }
        claims.update(over)
        return encode_jwt(claims, self.issuer)

    def sign_bundle(
        self,
        version: int,
        edit: dict[str, str | None] | None = None,
        key: ed25519.Ed25519PrivateKey | None = None,
        *,
        origin: str = ORIGIN,
        not_after: int | None = None,
    ) -> bytes:
        """The world's bundle (with `edit`s), signed for `origin` (the world's log by default),
        loadable until `not_after` (Unix seconds; default 90 days from the world's clock)."""
        files = read_bundle_dir(self.bundle_dir)
        for path, text in (edit or {}).items():
            if text is None:
                files.pop(path, None)
            else:
                files[path] = text.encode()
        if not_after is None:
            not_after = self.clock.seconds() + BUNDLE_VALIDITY_S
        return sign_bundle(files, version, key or self.admin, origin=origin, not_after=not_after)

    def new_core(self, *, sealed: bool = False) -> EnclaveCore:
        """A new enclave of this world: holding the world's log key (as after the sealed-key
        exchange), or, with `sealed`, still waiting for it (AWAITING_KEY)."""
        config = load_config(self.config_path, mock_nsm=True)
        pcrs = mock_pcrs(config.raw)
        log_key = None if sealed else derive_log_key(self.seed, config.origin)
        return EnclaveCore(config, self.mock_nsm(pcrs), pcrs=pcrs, clock_ms=self.clock, mock_nsm=True, log_key=log_key)

    def mock_nsm(self, pcrs: dict[int, bytes]) -> MockNsm:
        """A mock NSM on this world's CA and clock (an upstream's, or the enclave's)."""
        return MockNsm(self.root / "mock-nsm", pcrs, clock=self.clock.datetime)


def decision_bundle(dst: Path) -> Path:
    """The example bundle without upstream identities, pins or the cross-server guards.

    Most tests are about decisions, not upstream identity (tests/enclave/test_servers.py); with
    identities, every refunds call would be quarantined until a mock attestation is reported.
    """
    copy_example_bundle(dst)
    entities = dst / "entities.toml"
    text = re.sub(r"^identity = .*$", 'identity = { kind = "none" }', entities.read_text(), flags=re.M)
    entities.write_text(re.sub(r"^pins = .*\n", "", text, flags=re.M))
    (dst / "policies" / "guards.cedar").unlink()
    return dst


def make_world(
    root: Path,
    *,
    start: bool = True,
    policy: bool = True,
    identities: bool = False,
    clock: Clock | None = None,
    witnessing: str = "unsafe_unwitnessed = true\n",
) -> World:
    """`witnessing`: the enclave config's witness lines (decision 0015); by default none (unsafe mode),
    since most tests are about other things (tests/enclave/test_freshness.py sets witnesses)."""
    clock = clock or Clock()
    admin = ed25519.Ed25519PrivateKey.generate()
    issuer = ed25519.Ed25519PrivateKey.generate()
    bundle_dir = root / "bundle"
    if identities:
        copy_example_bundle(bundle_dir)
    else:
        decision_bundle(bundle_dir)
    (bundle_dir / "issuers").mkdir(exist_ok=True)
    (bundle_dir / "issuers" / "cloister-dev.pem").write_bytes(
        issuer.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    MockNsm(root / "mock-nsm", {}, clock=clock.datetime).root_pem()  # the CA is born on the world's clock
    config_path = root / "enclave.toml"
    raw = admin.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    config_path.write_text(
        f'origin = "{ORIGIN}"\nadmin_keys = ["{raw}"]\ntrust_root = "mock:mock-nsm/root.pem"\n{witnessing}'
    )
    w = World(
        root=root,
        admin=admin,
        issuer=issuer,
        clock=clock,
        core=None,  # type: ignore[arg-type]
        config_path=config_path,
        bundle_dir=bundle_dir,
    )
    w.core = w.new_core()
    if start:
        w.persist(w.core.start_new_log())
        if policy:
            w.persist(w.core.load_policy(w.sign_bundle(1))[2])
    return w
