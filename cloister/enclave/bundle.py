"""The policy bundle's content: parsed once per bundle version, then immutable.

A bundle directory holds:

- `bundle.toml`: name, mode (`enforce` or `log-only`), argument size cap, grant lifetime;
- `policies/*.cedar`: Cedar policies (each ideally with an `@id("...")` annotation);
- `schema.cedarschema` (optional): a Cedar schema the policies are validated against;
- `entities.toml`: roles, agents (allowed roles, attributes), servers (attributes, tools, identity);
- `issuers.toml` and the key files it names: who may mint agent tokens;
- `limits.toml` (optional): rate limits and spend caps.

Every error names the file, and the line where the underlying parser reports one.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Literal

import cedarpy
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from cloister.verify.entries import DECISION_FIELDS, SERVER_FIELDS
from cloister.verify.errors import DecodeError
from cloister.verify.jwt import PublicKey, load_jwks
from cloister.verify.x402 import AcceptedPayment, PaymentError, accepted_payment
from cloister.wire.contract import MAX_LIMIT_WINDOW_S, TOOL_SEPARATOR

NAMESPACE = "Cloister"
ACTION_GROUPS = ("CallTool", "Mcp")


class ActionKind(StrEnum):
    """What an agent (or an upstream, for sampling, elicitation and roots) asks for: the MCP method.

    Tools keep one Cedar action per tool (decision 0005). The other kinds name no item the bundle
    declares (a resource URI, a prompt name, a sampling request), so each is one Cedar action,
    `MCP_ACTIONS[kind]`, with the server as the resource and the request in `context.input`
    (decision 0018)."""

    TOOL = "tools/call"
    RESOURCE = "resources/read"
    PROMPT = "prompts/get"
    SAMPLING = "sampling/createMessage"
    ELICITATION = "elicitation/create"
    ROOTS = "roots/list"  # decision 0027


# The Cedar action of each non-tool kind, a child of Action::"Mcp".
MCP_ACTIONS: dict[ActionKind, str] = {
    ActionKind.RESOURCE: "ReadResource",
    ActionKind.PROMPT: "GetPrompt",
    ActionKind.SAMPLING: "CreateMessage",
    ActionKind.ELICITATION: "Elicit",
    ActionKind.ROOTS: "ListRoots",
}


# How the request of each non-tool kind is typed for Cedar (as a tool's input schema types its
# arguments): the MCP schema's integers are Cedar Longs, so `context.input.maxTokens <= 1000` works.
MCP_INPUT_SCHEMAS: dict[ActionKind, dict[str, Any]] = {
    ActionKind.SAMPLING: {"type": "object", "properties": {"maxTokens": {"type": "integer"}}},
}


def entry_name(kind: ActionKind, name: str) -> str:
    """The `tool` a decision entry (and a grant) records: the tool's name for a tool, else
    "<method>:<name>" (`resources/read:<uri>`, `prompts/get:<prompt>`, `sampling/createMessage:`,
    `roots/list:`).
    A bundle's tool names cannot contain ':', so no other kind can pass for a tool call."""
    return name if kind is ActionKind.TOOL else f"{kind.value}:{name}"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")  # roles, limit ids (fullmatch)
# Agents are token subjects, so their names also take "|": Auth0 and Okta's Auth0 name users
# "auth0|65a1...", "google-oauth2|1043...", "samlp|corp|jo@example.com". Nothing in Cloister
# splits an agent name on "|" (Cedar ids, log entries, grants and metrics take it as text).
_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@|-]{0,127}")
# Servers and tools name Cedar actions `<server>___<tool>` and the MCP tools agents see: see
# server_name_problem and tool_name_problem, the one rule that `policy validate` runs too.
_SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # MCP (2025-11-25): letters, digits, _ - . and 1 to 128
MAX_LIMIT_VALUE = Decimal("1e15")
# With amounts at most MAX_LIMIT_VALUE (16 integer digits), 12 places keep every total within
# the 28 digits of Decimal's default context, so windows add and subtract without rounding.
MAX_COST_PLACES = 12
# A decision entry lists the roles a call used (cloister.verify.entries.DECISION_FIELDS).
MAX_AGENT_ROLES = DECISION_FIELDS["roles"].max_len


class BundleError(DecodeError):
    """A bundle's content is invalid. The message starts with the file (and line) at fault."""


def action_id(server: str, tool: str) -> str:
    return f"{server}{TOOL_SEPARATOR}{tool}"


# Action ids must name one (server, tool) each, or a policy, a limit or an agent's tool name
# written for one pair would apply to another ('pay_' + 'wire' and 'pay' + '_wire' are both
# 'pay____wire'). Neither name may contain the separator, a server name may not end with '_' and a
# tool name may not start with one: then every action id contains the separator exactly once, so
# `partition` and `rpartition` both split it back into the one pair it came from (decision 0012).


def server_name_problem(name: object) -> str | None:
    """Why `name` cannot be a server name, or None when it can."""
    if not isinstance(name, str) or not _SERVER_NAME.fullmatch(name):
        return f"server name {name!r} must be 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
    if TOOL_SEPARATOR in name:
        return f"server name {name!r} contains {TOOL_SEPARATOR!r}, the separator in action ids '<server>___<tool>'"
    if name.endswith("_"):
        return (
            f"server name {name!r} ends with '_': its action ids '{name}___<tool>' would read as server "
            f"{name.rstrip('_')!r} with a tool starting with '_'"
        )
    return None


def tool_name_problem(name: object) -> str | None:
    """Why `name` cannot be a tool name in a bundle, or None when it can."""
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        return f"tool name {name!r} must be 1 to 128 letters, digits, '_', '.' or '-' (MCP's tool names)"
    if TOOL_SEPARATOR in name:
        return f"tool name {name!r} contains {TOOL_SEPARATOR!r}, the separator in action ids '<server>___<tool>'"
    if name.startswith("_"):
        return (
            f"tool name {name!r} starts with '_': its action id '<server>___{name}' would read as a server "
            "ending with '_'"
        )
    return None


@dataclass(frozen=True)
class Issuer:
    issuer: str
    audience: str
    keys: tuple[tuple[str | None, PublicKey], ...]
    roles_claim: str = "roles"
    max_lifetime_s: int = 86400


@dataclass(frozen=True)
class AgentSpec:
    name: str
    roles: frozenset[str]
    attrs: Mapping[str, Any]
    # The issuers (their `iss`) whose tokens may name this agent: `issuers = [...]` in entities.toml,
    # or the bundle's only issuer when it lists none (parse_bundle_files binds them).
    issuers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Identity:
    """What an upstream server must prove before agents may use it."""

    kind: Literal["none", "nitro", "checksum", "tls"] = "none"
    pcrs: Mapping[int, bytes] = field(default_factory=dict)  # nitro
    sha256: str = ""  # checksum: hex SHA-256 of the artifact
    spki_sha256: str = ""  # tls: hex SHA-256 of the certificate's SubjectPublicKeyInfo
    reattest_s: int = 3600  # a verification expires after this long


@dataclass(frozen=True)
class ServerSpec:
    name: str
    tools: tuple[str, ...]
    attrs: Mapping[str, Any]
    identity: Identity
    pins: Mapping[str, str]  # tool -> sha256 hex of its definition (cloister.verify.tools)
    # The upstream instance grants for this server are bound to ("": none; docs/decisions/0010).
    instance: str = ""
    # The x402 payments the server accepts (scheme, network, asset and its decimals, pay-to).
    x402: tuple[AcceptedPayment, ...] = ()


@dataclass(frozen=True)
class Limit:
    id: str
    kind: Literal["rate", "spend"]
    per: Literal["agent", "role", "tool", "server", "all"]
    maximum: Decimal
    window_s: int
    cost: tuple[str, str]  # ("argument", name) | ("price", decimal) | ("x402", "") ; rate: ("call", "")
    agents: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    servers: frozenset[str] = frozenset()
    tools: frozenset[str] = frozenset()  # action ids "<server>___<tool>"

    def matches(self, agent: str, roles: frozenset[str], server: str, tool: str) -> bool:
        return (
            (not self.agents or agent in self.agents)
            and (not self.roles or bool(self.roles & roles))
            and (not self.servers or server in self.servers)
            and (not self.tools or action_id(server, tool) in self.tools)
        )


@dataclass(frozen=True)
class Settings:
    name: str
    mode: Literal["enforce", "log-only"] = "enforce"
    max_argument_bytes: int = 64 * 1024
    grant_ttl_s: int = 60
    # Policy sets (files under policies/) in log-only mode: decided and logged, never enforced.
    log_only_sets: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PolicyBundle:
    settings: Settings
    issuers: Mapping[str, Issuer]
    roles: frozenset[str]
    agents: Mapping[str, AgentSpec]
    servers: Mapping[str, ServerSpec]
    limits: tuple[Limit, ...]
    # Cedar policies in EST (JSON) form keyed by policy id, plus the id -> source file map.
    policies: Mapping[str, Any]
    policy_sources: Mapping[str, str]
    schema_text: str | None
    entities_json: str = field(repr=False, default="[]")


def read_toml(files: Mapping[str, bytes], name: str, *, required: bool) -> dict[str, Any]:
    data = files.get(name)
    if data is None:
        if required:
            raise BundleError(f"{name}: missing (every bundle needs one)")
        return {}
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{name}: not UTF-8 (byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"{name}: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses once per nested array or inline table
        raise BundleError(f"{name}: arrays or tables nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer over Python's 4,300-digit conversion limit
        raise BundleError(f"{name}: {_first_line(exc)}") from exc


def _name(where: str, value: Any, pattern: re.Pattern[str] = _NAME) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        allowed = "_ . : @ | -" if pattern is _AGENT_NAME else "_ . : @ -"
        raise BundleError(f"{where}: {value!r} is not a valid name (letters, digits, {allowed}, at most 128)")
    return value


def _attrs(where: str, table: Mapping[str, Any], skip: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        if k in skip:
            continue
        if not isinstance(v, str | bool | int) or isinstance(v, float):
            raise BundleError(f"{where}: attribute {k!r} must be a string, integer or boolean")
        out[k] = v
    return out


def _strings(where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BundleError(f"{where}: expected a list of strings")
    return list(value)


def _duration(where: str, text: Any) -> int:
    m = re.fullmatch(r"(\d{1,12})(s|m|h|d)", text) if isinstance(text, str) else None
    if not m:
        raise BundleError(f"{where}: window {text!r} must look like 30s, 10m, 1h or 1d")
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not 0 < seconds <= MAX_LIMIT_WINDOW_S:
        raise BundleError(f"{where}: window must be between 1s and 31d")
    return seconds


def _decimal(where: str, value: Any) -> Decimal:
    try:
        d = Decimal(str(value)) if isinstance(value, str | int) and not isinstance(value, bool) else None
    except InvalidOperation:
        d = None
    if d is None or not d.is_finite():
        raise BundleError(f'{where}: {value!r} is not a decimal number (write it as a string, e.g. "10000")')
    if d < 0 or d > MAX_LIMIT_VALUE:
        raise BundleError(f"{where}: {value!r} is negative or absurdly large")
    if -int(d.as_tuple().exponent) > MAX_COST_PLACES:
        raise BundleError(f"{where}: {value!r} has more than {MAX_COST_PLACES} decimal places")
    return d


def _settings(files: Mapping[str, bytes]) -> Settings:
    raw = read_toml(files, "bundle.toml", required=True).get("bundle")
    if not isinstance(raw, dict):
        raise BundleError("bundle.toml: needs a [bundle] table")
    mode = raw.get("mode", "enforce")
    if mode not in ("enforce", "log-only"):
        raise BundleError(f"bundle.toml: mode {mode!r} must be 'enforce' or 'log-only'")
    max_args = raw.get("max_argument_bytes", 64 * 1024)
    if not isinstance(max_args, int) or not 0 < max_args <= 1 << 20:
        raise BundleError("bundle.toml: max_argument_bytes must be between 1 and 1048576")
    ttl = raw.get("grant_ttl_s", 60)
    if not isinstance(ttl, int) or not 1 <= ttl <= 3600:
        raise BundleError("bundle.toml: grant_ttl_s must be between 1 and 3600")
    modes = read_toml(files, "bundle.toml", required=True).get("modes", {})
    if not isinstance(modes, dict):
        raise BundleError("bundle.toml: [modes] maps policy files (policies/<name>.cedar) to enforce or log-only")
    log_only: set[str] = set()
    for path, set_mode in modes.items():
        if f"policies/{path}" not in files or not path.endswith(".cedar"):
            raise BundleError(f"bundle.toml: [modes] names {path!r}, which is not a file under policies/")
        if set_mode not in ("enforce", "log-only"):
            raise BundleError(f"bundle.toml: [modes] {path!r} must be 'enforce' or 'log-only'")
        if set_mode == "log-only":
            log_only.add(f"policies/{path}")
    return Settings(
        name=_name("bundle.toml: name", raw.get("name", "bundle")),
        mode=mode,
        max_argument_bytes=max_args,
        grant_ttl_s=ttl,
        log_only_sets=frozenset(log_only),
    )


def _load_key(files: Mapping[str, bytes], where: str, path: Any) -> PublicKey:
    if not isinstance(path, str) or path not in files:
        raise BundleError(f"{where}: key file {path!r} is not in the bundle")
    try:
        key = load_pem_public_key(files[path])
    except ValueError as exc:
        raise BundleError(f"{path}: not a PEM public key") from exc
    except UnsupportedAlgorithm as exc:  # a well-formed key of an algorithm cryptography does not know
        raise BundleError(f"{path}: a public key of an unsupported algorithm") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise BundleError(f"{path}: issuer keys must be Ed25519, P-256 or RSA")
    return key


def _audience(where: str, value: Any, origin: str) -> str:
    """An issuer's audience: what it sets, else the log's origin (not a word other deployments share)."""
    if value is None:
        return origin
    if not isinstance(value, str) or not value or len(value) > 512:
        raise BundleError(f"{where}: audience must be a non-empty string of at most 512 characters")
    return value


def _issuers(files: Mapping[str, bytes], origin: str = "") -> dict[str, Issuer]:
    raw = read_toml(files, "issuers.toml", required=True).get("issuers", {})
    if not isinstance(raw, dict) or not raw:
        raise BundleError("issuers.toml: needs at least one [issuers.<name>] table")
    out: dict[str, Issuer] = {}
    for label, t in raw.items():
        where = f"issuers.toml: [issuers.{label}]"
        if not isinstance(t, dict):
            raise BundleError(f"{where}: must be a table")
        iss = str(t.get("issuer", label))
        keys: list[tuple[str | None, PublicKey]] = []
        for entry in t.get("keys", []):
            if isinstance(entry, dict):
                keys.append((entry.get("kid"), _load_key(files, where, entry.get("file"))))
            else:
                keys.append((None, _load_key(files, where, entry)))
        jwks = t.get("jwks")
        if jwks is not None:
            if not isinstance(jwks, str) or jwks not in files:
                raise BundleError(f"{where}: jwks file {jwks!r} is not in the bundle")
            try:
                keys.extend(load_jwks(files[jwks]))
            except DecodeError as exc:
                raise BundleError(f"{jwks}: {exc}") from exc
        if not keys:
            raise BundleError(f"{where}: lists no keys (give `keys` PEM files or a `jwks` file)")
        lifetime = t.get("max_lifetime_s", 86400)
        if not isinstance(lifetime, int) or not 0 < lifetime <= 30 * 86400:
            raise BundleError(f"{where}: max_lifetime_s must be between 1 and 2592000")
        # Issuers are often URLs (OIDC): any single line without spaces, as the token's `iss` says.
        if not iss or len(iss) > 512 or any(c.isspace() for c in iss):
            raise BundleError(f"{where}: issuer {iss[:80]!r} must be a non-empty string without spaces")
        out[iss] = Issuer(
            issuer=iss,
            audience=_audience(where, t.get("audience"), origin),
            keys=tuple(keys),
            roles_claim=str(t.get("roles_claim", "roles")),
            max_lifetime_s=lifetime,
        )
    return out


def parse_entities(files: Mapping[str, bytes]) -> tuple[frozenset[str], dict[str, AgentSpec], dict[str, ServerSpec]]:
    raw = read_toml(files, "entities.toml", required=True)
    roles_raw = raw.get("roles", {})
    if not isinstance(roles_raw, dict):
        raise BundleError("entities.toml: [roles] must be a table of role names")
    roles = frozenset(_name("entities.toml: role", r) for r in roles_raw)
    agents: dict[str, AgentSpec] = {}
    for name, t in (raw.get("agents") or {}).items():
        where = f"entities.toml: [agents.{name}]"
        if not isinstance(t, dict):
            raise BundleError(f"{where}: must be a table")
        agent_roles = _strings(f"{where}: roles", t.get("roles"))
        for r in agent_roles:
            if r not in roles:
                raise BundleError(f"{where}: role {r!r} is not declared under [roles]")
        if len(set(agent_roles)) > MAX_AGENT_ROLES:
            raise BundleError(f"{where}: more than {MAX_AGENT_ROLES} roles (a decision entry lists the roles it used)")
        agents[_name(where, name, _AGENT_NAME)] = AgentSpec(
            name=name,
            roles=frozenset(agent_roles),
            attrs=_attrs(where, t, ("roles", "issuers")),
            issuers=frozenset(_strings(f"{where}: issuers", t.get("issuers"))),
        )
    servers: dict[str, ServerSpec] = {}
    for name, t in (raw.get("servers") or {}).items():
        where = f"entities.toml: [servers.{name}]"
        if not isinstance(t, dict):
            raise BundleError(f"{where}: must be a table")
        tools = tuple(_strings(f"{where}: tools", t.get("tools")))
        for problem in (server_name_problem(name), *map(tool_name_problem, tools)):
            if problem is not None:
                raise BundleError(f"{where}: {problem}")
        if len(set(tools)) != len(tools):
            raise BundleError(f"{where}: a tool is listed twice")
        identity = _identity(where, t.get("identity", {"kind": "none"}))
        pins = t.get("pins", {})
        if not isinstance(pins, dict) or not all(
            k in tools and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in pins.items()
        ):
            raise BundleError(f"{where}: pins must map listed tools to 64 hex characters (SHA-256)")
        servers[name] = ServerSpec(
            name=name,
            tools=tools,
            attrs=_attrs(where, t, ("tools", "identity", "pins", "instance", "x402")),
            identity=identity,
            pins=dict(pins),
            instance=_instance(where, t.get("instance", "")),
            x402=_x402_terms(where, t.get("x402", [])),
        )
    return roles, agents, servers


def _instance(where: str, value: Any) -> str:
    if value == "":
        return ""
    return _name(f"{where}: instance", value)


def _x402_terms(where: str, raw: Any) -> tuple[AcceptedPayment, ...]:
    """`x402 = [{ scheme, network, asset, decimals, pay_to }, ...]`: the payments the server accepts."""
    if not isinstance(raw, list):
        raise BundleError(f"{where}: x402 must be a list of accepted payments")
    terms: list[AcceptedPayment] = []
    for i, t in enumerate(raw):
        known = {"scheme", "network", "asset", "decimals", "pay_to"}
        if not isinstance(t, dict) or set(t) != known:
            raise BundleError(f"{where}: x402 entry #{i + 1} must have exactly {', '.join(sorted(known))}")
        try:
            terms.append(accepted_payment(t["scheme"], t["network"], t["asset"], t["decimals"], t["pay_to"]))
        except PaymentError as exc:
            raise BundleError(f"{where}: x402 entry #{i + 1}: {str(exc).removeprefix('x402 payment: ')}") from exc
    if len({(a.scheme, a.network, a.asset, a.pay_to) for a in terms}) != len(terms):
        raise BundleError(f"{where}: an x402 entry is listed twice")
    return tuple(terms)


def _hex(where: str, value: Any, size: int) -> str:
    if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{2 * size}}}", value):
        raise BundleError(f"{where}: expected {2 * size} lowercase hex characters")
    return value


def _identity(where: str, raw: Any) -> Identity:
    if not isinstance(raw, dict) or raw.get("kind") not in ("none", "nitro", "checksum", "tls"):
        raise BundleError(f"{where}: identity.kind must be none, nitro, checksum or tls")
    kind = raw["kind"]
    known = {"kind", "reattest_s"} | {"nitro": {"pcrs"}, "checksum": {"sha256"}, "tls": {"spki_sha256"}, "none": set()}[
        kind
    ]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BundleError(f"{where}: identity of kind {kind!r} does not take {unknown}")
    reattest = raw.get("reattest_s", 3600)
    if not isinstance(reattest, int) or not 10 <= reattest <= 86400:
        raise BundleError(f"{where}: identity.reattest_s must be between 10 and 86400 seconds")
    if kind == "nitro":
        pcrs_raw = raw.get("pcrs")
        if not isinstance(pcrs_raw, dict) or "0" not in pcrs_raw:
            raise BundleError(f'{where}: a nitro identity pins at least PCR0: pcrs = {{ "0" = "<96 hex>" }}')
        pcrs: dict[int, bytes] = {}
        for index, value in pcrs_raw.items():
            if not str(index).isdigit() or not 0 <= int(index) < 32:
                raise BundleError(f"{where}: PCR index {index!r} must be 0..31")
            pcrs[int(index)] = bytes.fromhex(_hex(f"{where}: PCR{index}", value, 48))
        return Identity(kind="nitro", pcrs=pcrs, reattest_s=reattest)
    if kind == "checksum":
        return Identity(
            kind="checksum", sha256=_hex(f"{where}: identity.sha256", raw.get("sha256"), 32), reattest_s=reattest
        )
    if kind == "tls":
        return Identity(
            kind="tls",
            spki_sha256=_hex(f"{where}: identity.spki_sha256", raw.get("spki_sha256"), 32),
            reattest_s=reattest,
        )
    return Identity(reattest_s=reattest)


def parse_limits(
    files: Mapping[str, bytes],
    roles: frozenset[str],
    agents: Mapping[str, AgentSpec],
    servers: Mapping[str, ServerSpec],
) -> tuple[Limit, ...]:
    raw = read_toml(files, "limits.toml", required=False).get("limits", [])
    if not isinstance(raw, list):
        raise BundleError("limits.toml: use [[limits]] tables")
    out: list[Limit] = []
    seen: set[str] = set()
    known_tools = {action_id(s.name, t) for s in servers.values() for t in s.tools}
    for i, t in enumerate(raw):
        where = f"limits.toml: limit #{i + 1}"
        if not isinstance(t, dict):
            raise BundleError(f"{where}: must be a table")
        lid = _name(f"{where}: id", t.get("id"))
        where = f"limits.toml: limit {lid!r}"
        if lid in seen:
            raise BundleError(f"{where}: id used twice")
        seen.add(lid)
        kind = t.get("kind")
        if kind not in ("rate", "spend"):
            raise BundleError(f"{where}: kind must be 'rate' or 'spend'")
        per = t.get("per", "agent")
        if per not in ("agent", "role", "tool", "server", "all"):
            raise BundleError(f"{where}: per must be agent, role, tool, server or all")
        cost_text = t.get("cost", "call" if kind == "rate" else None)
        if kind == "rate":
            if cost_text != "call":
                raise BundleError(f"{where}: a rate limit counts calls; omit 'cost'")
            cost: tuple[str, str] = ("call", "")
        elif isinstance(cost_text, str) and cost_text.startswith("argument:") and len(cost_text) > 9:
            cost = ("argument", cost_text[9:])
        elif isinstance(cost_text, str) and cost_text.startswith("price:"):
            cost = ("price", str(_decimal(f"{where}: cost", cost_text[6:])))
        elif cost_text == "x402":
            cost = ("x402", "")
        else:
            raise BundleError(f"{where}: cost must be 'argument:<name>', 'price:<amount>' or 'x402'")
        maximum = _decimal(f"{where}: max", t.get("max"))
        if kind == "rate" and maximum != maximum.to_integral_value():
            raise BundleError(f"{where}: a rate limit's max is a whole number of calls")
        sel = {k: frozenset(_strings(f"{where}: {k}", t.get(k))) for k in ("agents", "roles", "servers", "tools")}
        for k, known in (
            ("agents", set(agents)),
            ("roles", set(roles)),
            ("servers", set(servers)),
            ("tools", known_tools),
        ):
            unknown = sorted(sel[k] - known)
            if unknown:
                raise BundleError(f"{where}: unknown {k[:-1]} {unknown[0]!r}")
        out.append(
            Limit(
                id=lid,
                kind=kind,
                per=per,
                maximum=maximum,
                window_s=_duration(where, t.get("window")),
                cost=cost,
                **sel,
            )
        )
    return tuple(out)


MAX_CEDAR_NESTING = 64  # brackets; cedarpy's parser overflows its native stack (SIGSEGV) at a few hundred
# Chains that nest without brackets, per policy file: cedarpy crashed (SIGSEGV) on `if ... then`
# nested about 5,000 deep (is_authorized) and on an `&&` chain of about 20,000 terms
# (policies_to_json_str), measured with cedarpy 4.x here. Far below both, far above real policies.
MAX_CEDAR_IFS = 256
MAX_CEDAR_CONNECTIVES = 2048  # && and ||
_CEDAR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_CEDAR_IF = re.compile(r"\bif\b")


def _check_nesting(path: str, text: str) -> None:
    """Refuse brackets nested deeper than MAX_CEDAR_NESTING before the Cedar parser sees them: it
    recurses natively and crashes the process past a few hundred (found by the boundary fuzzer)."""
    depth, in_string, escaped = 0, False, False
    for c in text:
        if in_string:
            escaped, in_string = (not escaped and c == "\\"), in_string and (escaped or c != '"')
            continue
        if c == '"':
            in_string = True
        elif c in "([{":
            depth += 1
            if depth > MAX_CEDAR_NESTING:
                raise BundleError(f"{path}: brackets nested more than {MAX_CEDAR_NESTING} deep")
        elif c in ")]}":
            depth -= 1
    code = _CEDAR_STRING.sub('""', text)  # keywords and operators inside string literals do not count
    if len(_CEDAR_IF.findall(code)) > MAX_CEDAR_IFS:
        raise BundleError(f"{path}: more than {MAX_CEDAR_IFS} if-expressions in one policy file")
    if code.count("&&") + code.count("||") > MAX_CEDAR_CONNECTIVES:
        raise BundleError(f"{path}: more than {MAX_CEDAR_CONNECTIVES} && and || in one policy file")


def _policies(files: Mapping[str, bytes]) -> tuple[dict[str, Any], dict[str, str]]:
    policies: dict[str, Any] = {}
    sources: dict[str, str] = {}
    cedar_files = sorted(p for p in files if p.startswith("policies/") and p.endswith(".cedar"))
    if not cedar_files:
        raise BundleError("policies/: no .cedar files (a bundle without policies would deny everything)")
    for path in cedar_files:
        try:
            text = files[path].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BundleError(f"{path}: not UTF-8 (byte {exc.start})") from exc
        _check_nesting(path, text)
        try:
            est = json.loads(cedarpy.policies_to_json_str(text))
        except ValueError as exc:
            raise BundleError(f"{path}: invalid Cedar: {_first_line(exc)}") from exc
        except RecursionError as exc:  # a long chain (a && b && ...) nests deeply in the JSON form
            raise BundleError(f"{path}: an expression nested too deeply") from exc
        if est.get("templates"):
            raise BundleError(f"{path}: policy templates are not supported; write static policies")
        for n, (pid, policy) in enumerate(est.get("staticPolicies", {}).items()):
            annotated = policy.get("annotations", {}).get("id")
            key = annotated if annotated else f"{path.removeprefix('policies/')}#{n}"
            del pid
            if key in policies:
                raise BundleError(f"{path}: policy id {key!r} is also used in {sources[key]}")
            policies[key] = policy
            sources[key] = path
    # One parse of the whole set proves the combination is valid Cedar too.
    try:
        cedarpy.PolicySet.from_json_str(json.dumps({"staticPolicies": policies, "templates": {}, "templateLinks": []}))
    except ValueError as exc:
        raise BundleError(f"policies/: the policies do not form a valid set: {_first_line(exc)}") from exc
    return policies, sources


def _check_schema(policies: Mapping[str, Any], sources: Mapping[str, str], schema_text: str) -> None:
    """Refuse policies that do not validate against the bundle's own Cedar schema."""
    try:
        schema = cedarpy.Schema.from_str(schema_text)
    except ValueError as exc:
        raise BundleError(f"schema.cedarschema: invalid Cedar schema: {_first_line(exc)}") from exc
    ids = list(policies)
    # cedarpy's validator slows down more than linearly with the set's size: validate in chunks.
    for start in range(0, len(ids), 200):
        chunk = {pid: policies[pid] for pid in ids[start : start + 200]}
        text = cedarpy.policies_from_json_str(
            json.dumps({"staticPolicies": chunk, "templates": {}, "templateLinks": []})
        )
        result = cedarpy.validate_policies(text, schema)
        if not result.validation_passed:
            err = result.errors[0]
            pid = _policy_for(err.policy_id, list(chunk))
            raise BundleError(
                f"{sources.get(pid, 'policies/')}: policy {pid!r} does not validate against "
                f"schema.cedarschema: {err.error}"
            )


def _policy_for(reported: str, ids: list[str]) -> str:
    # The validator names policies by position (policy0, ...) in the text it was given.
    if reported.startswith("policy") and reported[6:].isdigit() and int(reported[6:]) < len(ids):
        return ids[int(reported[6:])]
    return reported


def _check_entities(
    policies: Mapping[str, Any],
    sources: Mapping[str, str],
    roles: frozenset[str],
    agents: Mapping[str, AgentSpec],
    servers: Mapping[str, ServerSpec],
) -> None:
    """Refuse policies that name an agent, role, server or tool the bundle does not declare.

    Such a policy can never match as intended (a typo in a forbid silently forbids nothing).
    """
    known = {
        f"{NAMESPACE}::Agent": set(agents),
        f"{NAMESPACE}::Role": set(roles),
        f"{NAMESPACE}::Server": set(servers),
        f"{NAMESPACE}::Action": {action_id(sv.name, t) for sv in servers.values() for t in sv.tools}
        | set(ACTION_GROUPS)
        | set(MCP_ACTIONS.values()),
    }
    for pid, policy in policies.items():
        for uid in _entity_refs(policy):
            kind, eid = uid.get("type"), uid.get("id")
            if not isinstance(kind, str) or not kind.startswith(f"{NAMESPACE}::"):
                continue
            if kind not in known:
                raise BundleError(
                    f"{sources[pid]}: policy {pid!r} uses entity type {kind!r}, which the entity "
                    f"model does not have (Agent, Role, Server, Action)"
                )
            if eid not in known[kind]:
                raise BundleError(
                    f"{sources[pid]}: policy {pid!r} names {kind}::{json.dumps(eid)}, which "
                    "entities.toml does not declare"
                )


def _entity_refs(node: Any) -> list[dict[str, Any]]:
    """Every entity UID an EST policy mentions: in its scope and inside its conditions."""
    found: list[dict[str, Any]] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            for key in ("entity", "__entity"):
                uid = n.get(key)
                if isinstance(uid, dict) and "type" in uid and "id" in uid:
                    found.append(uid)
            entities = n.get("entities")
            if isinstance(entities, list):
                found.extend(u for u in entities if isinstance(u, dict) and "type" in u and "id" in u)
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return found


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _entities_json(roles: frozenset[str], agents: Mapping[str, AgentSpec], servers: Mapping[str, ServerSpec]) -> str:
    ns = NAMESPACE
    out: list[dict[str, Any]] = [
        {"uid": {"type": f"{ns}::Role", "id": r}, "attrs": {}, "parents": []} for r in sorted(roles)
    ]
    out.append({"uid": {"type": f"{ns}::Action", "id": "Mcp"}, "attrs": {}, "parents": []})
    out.append(
        {
            "uid": {"type": f"{ns}::Action", "id": "CallTool"},
            "attrs": {},
            "parents": [{"type": f"{ns}::Action", "id": "Mcp"}],
        }
    )
    out.extend(
        {"uid": {"type": f"{ns}::Action", "id": a}, "attrs": {}, "parents": [{"type": f"{ns}::Action", "id": "Mcp"}]}
        for a in MCP_ACTIONS.values()
    )
    for s in servers.values():
        attrs = {
            "name": s.name,
            **s.attrs,
            "attestation": "none" if s.identity.kind == "none" else "unverified",
            "identity": s.identity.kind,
        }
        attrs.setdefault("region", "")
        attrs.setdefault("category", "")
        out.append({"uid": {"type": f"{ns}::Server", "id": s.name}, "attrs": attrs, "parents": []})
        for t in s.tools:
            out.append(
                {
                    "uid": {"type": f"{ns}::Action", "id": action_id(s.name, t)},
                    "attrs": {},
                    "parents": [{"type": f"{ns}::Action", "id": "CallTool"}],
                }
            )
    return json.dumps(out)


def bind_issuers(agents: Mapping[str, AgentSpec], issuers: Mapping[str, Issuer]) -> dict[str, AgentSpec]:
    """Each agent with the issuers that may mint its tokens. An agent lists them (`issuers = [...]`,
    the issuers' `iss`); one that lists none gets the bundle's only issuer. With several issuers and
    none listed the bundle is refused: any issuer could otherwise mint tokens for any agent."""
    out: dict[str, AgentSpec] = {}
    for name, spec in agents.items():
        where = f"entities.toml: [agents.{name}]"
        unknown = sorted(spec.issuers - set(issuers))
        if unknown:
            raise BundleError(f"{where}: issuer {unknown[0]!r} is not declared in issuers.toml (give its `issuer`)")
        bound = spec.issuers
        if not bound:
            if len(issuers) != 1:
                raise BundleError(
                    f"{where}: the bundle has {len(issuers)} issuers ({', '.join(sorted(issuers))}); list the ones "
                    "that may mint this agent's tokens: issuers = [...]"
                )
            bound = frozenset(issuers)
        out[name] = replace(spec, issuers=bound)
    return out


def _check_entry_limits(servers: Mapping[str, ServerSpec]) -> None:
    """What the log's entries could not record. A drifted pin's entry names its tool in a text map
    whose values are short (cloister.verify.entries.SERVER_FIELDS)."""
    short = SERVER_FIELDS["extra"].value_len
    for spec in servers.values():
        for tool in spec.pins:
            if len(tool) > short:
                raise BundleError(
                    f"entities.toml: [servers.{spec.name}]: pinned tool {tool[:40]!r}... has a name longer than "
                    f"{short} characters, which the log's server entries cannot record"
                )


@contextmanager
def _shape_errors(name: str) -> Iterator[None]:
    """A value of the wrong TOML type where the parser walks a table or list (a list where a table
    belongs, a number where a list belongs) is a refusal naming the file, never a crash. Found by
    the boundary fuzzer; the explicit checks above name the key where they exist."""
    try:
        yield
    except (TypeError, AttributeError, KeyError) as exc:
        raise BundleError(
            f"{name}: a value has the wrong TOML type for where it stands (a table, a list or a text was expected)"
        ) from exc


def parse_bundle_files(files: Mapping[str, bytes], *, check_references: bool = True, origin: str = "") -> PolicyBundle:
    """Parse and cross-check a bundle's files. Raises BundleError naming the file at fault.

    `check_references=False` skips the schema and entity-reference checks, for
    `cloister policy validate`, which runs its own versions of them to report every error with
    its line; the enclave always checks. `origin` is the log's origin (the enclave's config):
    the audience of an issuer that names none. Offline tools that verify no token leave it "".
    """
    with _shape_errors("bundle.toml"):
        settings = _settings(files)
    with _shape_errors("issuers.toml"):
        issuers = _issuers(files, origin)
    with _shape_errors("entities.toml"):
        roles, agents, servers = parse_entities(files)
        agents = bind_issuers(agents, issuers)
        _check_entry_limits(servers)
    with _shape_errors("limits.toml"):
        limits = parse_limits(files, roles, agents, servers)
    policies, sources = _policies(files)
    schema_text: str | None = None
    if "schema.cedarschema" in files:
        schema_text = files["schema.cedarschema"].decode("utf-8", "replace")
        if check_references:
            _check_schema(policies, sources, schema_text)
    if check_references:
        _check_entities(policies, sources, roles, agents, servers)
    entities_json = _entities_json(roles, agents, servers)
    try:
        cedarpy.Entities.from_json_str(entities_json)
    except ValueError as exc:
        raise BundleError(f"entities.toml: the entities are not valid Cedar entities: {_first_line(exc)}") from exc
    return PolicyBundle(
        settings=settings,
        issuers=issuers,
        roles=roles,
        agents=agents,
        servers=servers,
        limits=limits,
        policies=policies,
        policy_sources=sources,
        schema_text=schema_text,
        entities_json=entities_json,
    )


def read_bundle_dir(path: Any) -> dict[str, bytes]:
    """The files of a bundle directory, keyed by relative path (for signing and validation)."""
    from pathlib import Path

    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory")
    files: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            files[p.relative_to(root).as_posix()] = p.read_bytes()
    return files
