"""The relay's configuration file (TOML).

    [relay]
    listen = "127.0.0.1:8440"                 # agents' MCP endpoint is http://<listen>/mcp
    public_url = "http://127.0.0.1:8440"      # how agents and auditors reach it (printed, documented)
    enclave = "vsock:16:5005"                 # or unix:PATH / tcp:HOST:PORT in mock mode
    bundle = "bundle.signed"                  # admin-signed policy bundle pushed at start
    storage = "log"                           # a directory, or s3://bucket/prefix
    s3_endpoint_url = ""                      # for S3-compatible servers
    run_dir = "run"                           # private sockets (the parent-side bridge)
    trust_root = "aws"                        # or "mock:<root.pem>": to check the enclave's attestation
    max_argument_bytes = 1048576              # the relay refuses larger arguments outright
    enclave_timeout_s = 5
    admin_token_file = "admin.token"          # enables /admin/* for holders of this bearer token
    auditor_token_file = "auditor.token"      # enables GET /log/body/... for holders of this one
    body_encryption_public_key = "body.pub"   # X25519 (PEM): bodies are stored sealed to it
    keep_denied_arguments = false             # also keep the arguments of denied calls
    # Pacing of background work (decision 0025): whichever bound comes first.
    publish_interval_ms = 1000                # tiles and the public checkpoint: at most this old...
    publish_every = 4096                      # ... or this many entries behind the durable log
    witness_interval_ms = 250                 # a witness gets a new checkpoint at most this often...
    witness_every = 256                       # ... or once this many entries accumulated; keep both
                                              # far below the enclave's max_unwitnessed_s/_entries
    # MCP authorization (docs/guides/oauth.md, decision 0019):
    resource_url = "https://mcp.example/mcp"  # the audience of agents' tokens; default <public_url>/mcp
    authorization_servers = ["https://id.example/realms/agents"]  # default: the bundle's issuers that are URLs
    oauth_scopes = ["mcp"]                    # scopes clients ask for (RFC 9728 scopes_supported)
    token_gate = true                         # 401 for a token the enclave refuses, before any MCP session;
                                              # default: on when there are authorization servers

    [[upstreams]]
    name = "refunds"
    url = "http://127.0.0.1:8441/mcp"         # streamable HTTP
    timeout_s = 30

    reattest_s = 300                          # re-prove the server's identity this often
    reproof_min_interval_s = 5                # tools/list_changed re-proves at most this often
    wait_for_witness = false                  # forward only once the witnesses cosigned the decision
    witness_wait_s = 10                       # ... waiting at most this long (then not forwarded)
    # ca_file = "internal-ca.pem"             # for https:// upstreams signed by a private CA

    [[upstreams]]
    name = "research"
    command = ["python", "-m", "cloister.dev.examples.research"]   # stdio; launched by the relay
    env = { KEY = "value" }
    artifact = "research.py"                  # checksum identity: hashed (by the enclave) before launch

    [[witnesses]]                             # C2SP tlog-witnesses the relay sends checkpoints to
    name = "witness.example/w1"
    url = "http://127.0.0.1:7380"             # submission prefix: POST <url>/add-checkpoint
    vkey = "witness.example/w1+1234abcd+BB..."  # its cosignature key: returned cosignatures must verify

    # in [relay]: witness_quorum = 1          # cosignatures an auditor is told to expect (default: all)

    [kms]                                     # the sealed log key (docs/decisions/0014)
    key_id = "arn:aws:kms:...:key/..."        # the KMS key whose policy names the image's PCR0s
    region = "us-east-1"
    endpoint_url = "http://127.0.0.1:7390"    # mock mode only: the local stand-in (cloister.dev.kms)

Relative paths are relative to the config file. Errors name the file and the key. The admin
and auditor tokens are bearer secrets of at least 16 characters, and must differ.
"""

from __future__ import annotations

import hmac
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from cloister.audit.sealed import load_public_key
from cloister.verify.errors import DecodeError

_UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_URL = re.compile(r"https?://[!#-\[\]-~]{1,500}")  # printable ASCII: no space, quote or backslash
_SCOPE = re.compile(r"[!#-\[\]-~]{1,100}")  # RFC 6749 §3.3 scope-token


class ConfigError(DecodeError):
    """The relay configuration is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str | None = None
    command: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    timeout_s: float = 30.0
    artifact: Path | None = None  # checksum identity: the file to hash before launching
    reattest_s: float = 300.0
    ca_file: Path | None = None  # PEM CA certificates that verify an https:// upstream
    reproof_min_interval_s: float = 5.0  # tools/list_changed bursts coalesce into one re-proof per interval
    # Forward a call only once a quorum of witnesses cosigned its decision, with the evidence in
    # _meta (decision 0015): an upstream's GrantGuard(witnessed_decisions=True) demands it.
    wait_for_witness: bool = False
    witness_wait_s: float = 10.0


@dataclass(frozen=True)
class WitnessConfig:
    """A C2SP tlog-witness: the relay sends it checkpoints (cloister.relay.witnessing)."""

    name: str
    url: str  # the submission prefix: POST <url>/add-checkpoint
    vkey: str  # its cosignature verifier key (type 0x04)


@dataclass(frozen=True)
class KmsConfig:
    """Where the log key's seed is sealed: the relay calls KMS with the enclave's Recipient document."""

    key_id: str
    region: str = "us-east-1"
    endpoint_url: str | None = None  # the local stand-in (mock mode); None: AWS KMS, boto3's credentials


@dataclass(frozen=True)
class RelayConfig:
    path: Path
    host: str
    port: int
    public_url: str
    enclave: str
    bundle: Path | None
    storage: str
    s3_endpoint_url: str | None
    run_dir: Path
    trust_root: str
    max_argument_bytes: int
    enclave_timeout_s: float
    upstreams: tuple[UpstreamConfig, ...]
    body_retention_days: int | None = None
    attestation_refresh_s: float = 3600.0
    admin_token: str | None = None  # required by every /admin endpoint; None disables them
    auditor_token: str | None = None  # required by GET /log/body; None disables it
    body_public_key: X25519PublicKey | None = None  # bodies are stored sealed to this auditor key
    keep_denied_arguments: bool = False  # store the arguments of denied calls too
    witnesses: tuple[WitnessConfig, ...] = ()
    witness_quorum: int = 0  # cosignatures a checkpoint needs to count as witnessed (0: no witnesses)
    kms: KmsConfig | None = None  # required to start an enclave that waits for its sealed log key
    resource_url: str = ""  # the /mcp URL, agents' tokens' audience (RFC 8707); "" means <public_url>/mcp
    authorization_servers: tuple[str, ...] | None = None  # None: the bundle's issuers that are URLs
    oauth_scopes: tuple[str, ...] = ()
    token_gate: bool | None = None  # None: on when there are authorization servers
    publish_interval_ms: int = 1000  # LogWriter materialize_interval_ms
    publish_every: int = 4096  # LogWriter materialize_every
    witness_interval_ms: int = 250  # WitnessPacing interval_s (in ms)
    witness_every: int = 256  # WitnessPacing max_entries

    @property
    def mcp_resource(self) -> str:
        return self.resource_url or self.public_url.rstrip("/") + "/mcp"


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: missing required key {key!r}")
        return default
    value = table[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def load_relay_config(path: Path) -> RelayConfig:
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    base = path.parent
    relay = data.get("relay")
    if not isinstance(relay, dict):
        raise ConfigError(f"{path}: needs a [relay] table")
    where = f"{path} [relay]"
    listen = _get(relay, "listen", str, where, "127.0.0.1:8440")
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f"{where}: listen {listen!r} must be HOST:PORT")
    bundle = _get(relay, "bundle", str, where, "")
    storage = _get(relay, "storage", str, where, "log")
    if not storage.startswith("s3://"):
        storage = str((base / storage).resolve())
    upstreams = _upstreams(path, data.get("upstreams", []))
    witnesses = _witnesses(path, data.get("witnesses", []))
    quorum = _get(relay, "witness_quorum", int, where, len(witnesses))
    if (witnesses and not 1 <= quorum <= len(witnesses)) or (not witnesses and quorum != 0):
        raise ConfigError(f"{where}: witness_quorum {quorum} must be between 1 and the {len(witnesses)} [[witnesses]]")
    admin_token = _token(relay, "admin_token_file", base, where)
    auditor_token = _token(relay, "auditor_token_file", base, where)
    if admin_token is not None and auditor_token is not None and hmac.compare_digest(admin_token, auditor_token):
        raise ConfigError(f"{where}: admin_token_file and auditor_token_file hold the same token; they must differ")
    key_file = _get(relay, "body_encryption_public_key", str, where, None)
    try:
        body_key = load_public_key(base / key_file) if key_file else None
    except (OSError, DecodeError) as exc:
        raise ConfigError(f"{where}: body_encryption_public_key: {getattr(exc, 'strerror', None) or exc}") from exc
    return RelayConfig(
        path=path,
        host=host or "127.0.0.1",
        port=int(port_text),
        public_url=_get(relay, "public_url", str, where, f"http://{listen}"),
        enclave=_get(relay, "enclave", str, where),
        bundle=(base / bundle) if bundle else None,
        storage=storage,
        s3_endpoint_url=_get(relay, "s3_endpoint_url", str, where, "") or None,
        run_dir=base / _get(relay, "run_dir", str, where, "run"),
        trust_root=_get(relay, "trust_root", str, where, "aws"),
        max_argument_bytes=_get(relay, "max_argument_bytes", int, where, 1 << 20),
        enclave_timeout_s=float(_get(relay, "enclave_timeout_s", (int, float), where, 5)),
        upstreams=upstreams,
        body_retention_days=_get(relay, "body_retention_days", int, where, None),
        attestation_refresh_s=float(_get(relay, "attestation_refresh_s", (int, float), where, 3600)),
        admin_token=admin_token,
        auditor_token=auditor_token,
        body_public_key=body_key,
        keep_denied_arguments=_get(relay, "keep_denied_arguments", bool, where, False),
        witnesses=witnesses,
        witness_quorum=quorum,
        kms=_kms(path, data.get("kms")),
        **_oauth(relay, where),
        **_pacing(relay, where),
    )


def _pacing(relay: dict[str, Any], where: str) -> dict[str, Any]:
    """Bounds on how stale the public checkpoint and the witnessed one may get (decision 0025)."""
    bounds = {
        "publish_interval_ms": (1000, 10, 60_000),
        "publish_every": (4096, 1, 1 << 20),
        # The enclave pauses granting at 10 s / 1000 entries unwitnessed (its defaults): stay far below.
        "witness_interval_ms": (250, 0, 5000),
        "witness_every": (256, 1, 500),
    }
    out: dict[str, Any] = {}
    for key, (default, low, high) in bounds.items():
        value = _get(relay, key, int, where, default)
        if not low <= value <= high:
            raise ConfigError(f"{where}: {key} {value} must be between {low} and {high}")
        out[key] = value
    return out


def _oauth(relay: dict[str, Any], where: str) -> dict[str, Any]:
    """The MCP authorization keys (cloister.relay.oauth): URLs checked for shape only."""
    resource = _get(relay, "resource_url", str, where, "")
    if resource and (not _URL.fullmatch(resource) or "#" in resource):
        raise ConfigError(f"{where}: resource_url {resource!r} must be an http(s) URL without a fragment")
    servers = _get(relay, "authorization_servers", list, where, None)
    if servers is not None and not all(isinstance(s, str) and _URL.fullmatch(s) for s in servers):
        raise ConfigError(f"{where}: authorization_servers must be a list of http(s) URLs")
    scopes = _get(relay, "oauth_scopes", list, where, [])
    if not all(isinstance(s, str) and _SCOPE.fullmatch(s) for s in scopes):
        raise ConfigError(f"{where}: oauth_scopes must be scope tokens (RFC 6749 §3.3: printable ASCII, no quote)")
    return {
        "resource_url": resource,
        "authorization_servers": tuple(servers) if servers is not None else None,
        "oauth_scopes": tuple(scopes),
        "token_gate": _get(relay, "token_gate", bool, where, None),
    }


def _kms(path: Path, table: Any) -> KmsConfig | None:
    if table is None:
        return None
    where = f"{path} [kms]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(table) - {"key_id", "region", "endpoint_url"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    key_id = _get(table, "key_id", str, where)
    if not key_id:
        raise ConfigError(f"{where}: key_id must not be empty")
    endpoint = _get(table, "endpoint_url", str, where, "") or None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: endpoint_url {endpoint!r} must be http(s)://")
    return KmsConfig(key_id=key_id, region=_get(table, "region", str, where, "us-east-1"), endpoint_url=endpoint)


def _witnesses(path: Path, tables: Any) -> tuple[WitnessConfig, ...]:
    from cloister.verify.cosignature import Ed25519CosignatureVerifier

    if not isinstance(tables, list):
        raise ConfigError(f"{path}: [[witnesses]] must be an array of tables")
    witnesses: list[WitnessConfig] = []
    for i, t in enumerate(tables):
        ww = f"{path} [[witnesses]] #{i + 1}"
        if not isinstance(t, dict):
            raise ConfigError(f"{ww}: must be a table")
        name, url, vkey = (_get(t, key, str, ww) for key in ("name", "url", "vkey"))
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{ww}: url {url!r} must be http(s)://")
        try:
            verifier = Ed25519CosignatureVerifier.from_vkey(vkey)
        except DecodeError as exc:
            raise ConfigError(f"{ww}: vkey: {exc}") from exc
        if verifier.name != name:
            raise ConfigError(f"{ww}: the vkey is for {verifier.name!r}, not {name!r}")
        if any(w.name == name or w.vkey == vkey for w in witnesses):
            raise ConfigError(f"{ww}: witness {name!r} (or its key) is declared twice")
        witnesses.append(WitnessConfig(name=name, url=url.rstrip("/"), vkey=vkey))
    return tuple(witnesses)


def _token(relay: dict[str, Any], key: str, base: Path, where: str) -> str | None:
    """A bearer secret read from the file named by `key`, or None when the key is absent."""
    token_file = _get(relay, key, str, where, None)
    if not token_file:
        return None
    try:
        token: str = (base / str(token_file)).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {key}: cannot read {token_file}: {getattr(exc, 'strerror', None) or exc}") from exc
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise ConfigError(f"{where}: {key}: the token must be at least 16 printable characters without spaces")
    return token


def _upstreams(path: Path, tables: Any) -> tuple[UpstreamConfig, ...]:
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: [[upstreams]] must be an array of tables")
    upstreams: list[UpstreamConfig] = []
    names: set[str] = set()
    for i, u in enumerate(tables):
        uw = f"{path} [[upstreams]] #{i + 1}"
        if not isinstance(u, dict):
            raise ConfigError(f"{uw}: must be a table")
        upstream = _upstream(u, path.parent, uw)
        if upstream.name in names:
            raise ConfigError(f"{uw}: upstream {upstream.name!r} is declared twice")
        names.add(upstream.name)
        upstreams.append(upstream)
    return tuple(upstreams)


def _upstream(u: dict[str, Any], base: Path, uw: str) -> UpstreamConfig:
    name = _get(u, "name", str, uw)
    if not _UPSTREAM_NAME.match(name) or "___" in name:
        raise ConfigError(f"{uw}: name {name!r} must be letters, digits, _ . - (no '___')")
    url = _get(u, "url", str, uw, None)
    command = _get(u, "command", list, uw, [])
    if (url is None) == (not command):
        raise ConfigError(f"{uw}: give exactly one of 'url' (streamable HTTP) or 'command' (stdio)")
    if not all(isinstance(c, str) for c in command):
        raise ConfigError(f"{uw}: 'command' must be a list of strings")
    env = _get(u, "env", dict, uw, {})
    timeout = float(_get(u, "timeout_s", (int, float), uw, 30))
    if not 0 < timeout <= 3600:
        raise ConfigError(f"{uw}: timeout_s must be in (0, 3600]")
    cwd = _get(u, "cwd", str, uw, None)
    artifact = _get(u, "artifact", str, uw, None)
    ca_file = _get(u, "ca_file", str, uw, None)
    if ca_file and not (url or "").startswith("https://"):
        raise ConfigError(f"{uw}: ca_file goes with an https:// url")
    reattest = float(_get(u, "reattest_s", (int, float), uw, 300))
    if not 5 <= reattest <= 86400:
        raise ConfigError(f"{uw}: reattest_s must be in [5, 86400]")
    reproof = float(_get(u, "reproof_min_interval_s", (int, float), uw, 5))
    if not 1 <= reproof <= 3600:
        raise ConfigError(f"{uw}: reproof_min_interval_s must be in [1, 3600]")
    wait = _get(u, "wait_for_witness", bool, uw, False)
    wait_s = float(_get(u, "witness_wait_s", (int, float), uw, 10))
    if not 0 < wait_s <= 300:
        raise ConfigError(f"{uw}: witness_wait_s must be in (0, 300]")
    return UpstreamConfig(
        name=name,
        wait_for_witness=wait,
        witness_wait_s=wait_s,
        url=url,
        command=tuple(command),
        env={str(k): str(v) for k, v in env.items()},
        cwd=(base / cwd) if cwd else None,
        timeout_s=timeout,
        artifact=(base / artifact) if artifact else None,
        reattest_s=reattest,
        ca_file=(base / ca_file) if ca_file else None,
        reproof_min_interval_s=reproof,
    )
