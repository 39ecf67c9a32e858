"""`cloister policy explain`: decide one call offline, with the enclave's own `decide()`, and say why.

The decision is `cloister.enclave.decide.decide`, the function the enclave runs, in its order:
arguments and x402 payment, identity, server and tool, quarantine, Cedar, limits. What a
running enclave would know, explain assumes, and says so in its notes:

- identity: the agent and the roles its token would claim, taken as given (no token is checked);
- servers: each has proven the identity its bundle entry pins (`--attestation` sets another level
  for the called server: one that is not the pinned identity quarantines it, as in the enclave),
  and pinned tools match their pins; input schemas are the bundle's `inputs/<server>___<tool>.json`;
- limits: an empty limit book, so this shows which limits apply and what this call costs, not
  what remains; live budget state is in the running enclave only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import cedarpy

from cloister.enclave.bundle import (
    MAX_LIMIT_VALUE,
    MCP_INPUT_SCHEMAS,
    NAMESPACE,
    ActionKind,
    Limit,
    PolicyBundle,
    ServerSpec,
    action_id,
)
from cloister.enclave.decide import Call, Decision, State, Step, decide, granted, registered
from cloister.enclave.limits import BadCost, LimitBook
from cloister.enclave.policy import PolicyEngine, Principal, cedar_value
from cloister.policytools.diff import describe_limit
from cloister.policytools.findings import PolicyInfo, Validation
from cloister.policytools.schema import input_schemas
from cloister.verify.errors import DecodeError
from cloister.wire.contract import DenyCode

LIVE_STATE_NOTE = (
    "limits are checked against an empty window: this shows which limits apply and what this call "
    "costs; what remains now is known only to the running enclave"
)


@dataclass
class Explanation:
    agent: str
    roles: list[str]
    roles_source: str  # "--role" or "all roles granted to the agent"
    server: str
    tool: str
    at: str
    mode: str
    decision: str = "deny"  # "allow" | "deny"
    code: str = ""  # the enclave's denial code ("" when allowed)
    reason: str = ""
    enforced: bool = True  # False in log-only mode: a deny is logged but the call goes through
    policies: list[dict[str, Any]] = field(default_factory=list)  # the determining ones
    evaluation_errors: list[dict[str, str]] = field(default_factory=list)
    considered: int = 0  # policies in the action's slice
    attestation: str | None = None  # resource.attestation assumed for the server
    discoverable: bool | None = None
    kind: str = "tools/call"  # the MCP request explained (decision 0018)
    payment: str | None = None  # the x402 payment the call carries (--payment)
    limits: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_at(text: str | None) -> datetime:
    if not text:
        return datetime.now(UTC)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise DecodeError(f"--at {text!r}: not an ISO 8601 time (e.g. 2026-03-01T14:30:00Z)") from exc
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _policy_view(info: PolicyInfo | None, key: str, bundle: PolicyBundle) -> dict[str, Any]:
    view: dict[str, Any] = {"id": key, "file": bundle.policy_sources.get(key)}
    if info is not None:
        view["effect"] = info.est.get("effect")
        view["line"] = info.line
        if info.statement is not None:
            view["source"] = info.statement.text
            view["comment"] = info.statement.comment
    return view


@dataclass(frozen=True)
class ClaimedIdentity:
    """decide's identity offline: an agent and the roles its token would claim, taken as given;
    checked as the enclave checks a token's (registered agent, granted roles)."""

    agent: str
    roles: tuple[str, ...]

    def principal(self, bundle: PolicyBundle, now_ms: int) -> Principal:
        # The issuer is the first the bundle binds to the agent (context.issuer in Cedar).
        spec = registered(bundle, self.agent)
        return granted(spec, self.agent, self.roles, min(spec.issuers, default=""))


class OfflineServers:
    """The enclave's server registry (`decide.ServerView`) as explain assumes it: every server has
    proven the identity its bundle entry pins, except that `attestation` names the level of
    `server`; a server that pins an identity and is at any other level is quarantined, as the
    enclave quarantines every server whose pinned identity is not proven. Pinned tools are taken
    to match their pins. Input schemas are the bundle's inputs/<server>___<tool>.json."""

    def __init__(self, bundle: PolicyBundle, files: Mapping[str, bytes], server: str, attestation: str | None):
        self.levels: dict[str, str] = {name: spec.identity.kind for name, spec in bundle.servers.items()}
        if attestation and server in self.levels:
            self.levels[server] = attestation
        self._schemas = input_schemas(files)[0]

    def refusal(self, spec: ServerSpec, tool: str, now_ms: int) -> str | None:
        kind, level = spec.identity.kind, self.levels.get(spec.name, spec.identity.kind)
        if kind != "none" and level != kind:
            return (
                f"server {spec.name!r} is quarantined: it has not proven its {kind} identity "
                f"(resource.attestation taken as {level!r})"
            )
        return None

    def input_schema(self, server: str, tool: str) -> Mapping[str, Any] | None:
        schema = self._schemas.get(action_id(server, tool))
        return schema if isinstance(schema, Mapping) else None


def explain(
    validation: Validation,
    *,
    agent: str,
    roles: list[str] | None,
    server: str,
    tool: str,
    arguments_json: str,
    at: datetime,
    attestation: str | None = None,
    payment: str = "",
    kind: ActionKind = ActionKind.TOOL,
) -> Explanation:
    """`kind` (decision 0018): a resource read (`tool` is the upstream's URI, the arguments the
    request, {"uri": ...}), a prompt (`tool` its name), or sampling or elicitation (`tool` "")."""
    bundle = validation.bundle
    assert bundle is not None, "explain needs a bundle that parses"
    spec = bundle.agents.get(agent)
    all_roles = sorted(spec.roles) if spec else []
    chosen = sorted(set(roles)) if roles else all_roles
    ex = Explanation(
        agent=agent,
        roles=chosen,
        roles_source="--role" if roles else "all roles granted to the agent",
        server=server,
        tool=tool,
        at=at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        mode=bundle.settings.mode,
        payment=payment or None,
    )
    ex.notes.append("the token is not checked: the agent and roles are taken as given")
    servers = OfflineServers(bundle, validation.files, server, attestation)
    engine = PolicyEngine(bundle)
    engine.set_server_levels(servers.levels)
    payload = payment.lstrip().startswith("{")  # an x402 payment payload (JSON), else a bare amount
    call = Call(
        identity=ClaimedIdentity(agent, tuple(chosen)),
        server=server,
        tool=tool,
        arguments_json=arguments_json.encode(),
        payment_amount="" if payload else payment,
        now_ms=int(at.timestamp() * 1000),
        payment=payment.encode() if payload else b"",
        kind=kind,
    )
    ex.kind = kind.value
    d = decide(call, State(bundle, engine, servers, LimitBook.for_bundle(bundle)))
    ex.decision, ex.code, ex.reason, ex.enforced = ("allow" if d.allowed else "deny"), d.code, d.reason, not d.log_only
    # What each step that ran looked at (a call denied at step N never reaches the steps after it).
    if d.allowed or d.step >= Step.QUARANTINE:
        _attestation(ex, bundle.servers[server], servers.levels[server], attestation)
    if d.allowed or d.step >= Step.CEDAR:
        _cedar_view(ex, validation, engine, servers, d, at, call)
        if kind is ActionKind.TOOL:  # limits count tool calls
            _limits_view(ex, bundle, d, call.now_ms)
    return _finish(ex)


def _attestation(ex: Explanation, spec: ServerSpec, level: str, asked: str | None) -> None:
    """`resource.attestation` is what the server has proven to the running enclave; offline,
    the identity the bundle pins, as if verified, unless --attestation says otherwise."""
    ex.attestation = level
    if not asked:
        ex.notes.append(
            f"resource.attestation is taken as {level!r} (the identity the bundle pins, as if verified); "
            "pass --attestation to try another level"
        )
    elif spec.identity.kind == "none" and level != "none":
        ex.notes.append(
            f"server {spec.name!r} pins no identity, so the running enclave sees resource.attestation "
            f"'none'; evaluated with {level!r} instead"
        )
    if spec.pins.get(ex.tool):
        ex.notes.append(
            f"tool {ex.tool!r} is pinned: taken to match its pin (the enclave quarantines it if the "
            "definition the upstream lists differs, or has not been reported)"
        )


def _cedar_view(
    ex: Explanation,
    validation: Validation,
    engine: PolicyEngine,
    servers: OfflineServers,
    d: Decision,
    at: datetime,
    call: Call,
) -> None:
    bundle = validation.bundle
    assert bundle is not None and d.principal is not None
    if call.action is not None:  # a resource, prompt, sampling or elicitation request (decision 0018)
        ex.considered = engine.slice_size(ex.server, ex.tool, action=call.action)
        ex.policies = [_policy_view(validation.policies.get(pid), pid, bundle) for pid in d.policy_ids]
        schema = MCP_INPUT_SCHEMAS.get(call.kind)
        ex.evaluation_errors = _evaluation_errors(
            bundle, d.principal, ex.server, call.action, d.arguments, at, schema, ex.attestation or "none"
        )
        return
    # The running enclave types arguments by the tool's input schema as the upstream lists it
    # (numbers are decimals unless it says integer); offline, that is inputs/<server>___<tool>.json.
    aid = action_id(ex.server, ex.tool)
    input_schema = servers.input_schema(ex.server, ex.tool)
    if input_schema is None:
        ex.notes.append(
            f"no inputs/{aid}.json: arguments are typed without the tool's input "
            "schema (every number is a decimal); the enclave uses the schema the upstream lists"
        )
    ex.considered = engine.slice_size(ex.server, ex.tool)
    ex.discoverable = engine.may_call(d.principal, ex.server, ex.tool, at)
    ex.policies = [_policy_view(validation.policies.get(pid), pid, bundle) for pid in d.policy_ids]
    ex.evaluation_errors = _evaluation_errors(
        bundle, d.principal, ex.server, aid, d.arguments, at, input_schema, ex.attestation or "none"
    )


def _limits_view(ex: Explanation, bundle: PolicyBundle, d: Decision, now_ms: int) -> None:
    """The limits that apply and what this call costs each (read through the enclave's LimitBook
    with the cap lifted); a limit denial on an empty book is restated as what it means."""
    assert d.principal is not None
    book = LimitBook.for_bundle(bundle)
    agent, roles = d.principal.agent, book.roles(d.principal.agent)  # limits apply by the bundle's roles
    matching = [lim for lim in bundle.limits if lim.matches(agent, roles, ex.server, ex.tool)]
    costs: dict[str, Decimal | None] = {}
    for lim in matching:
        try:
            costs[lim.id] = (
                LimitBook([replace(lim, maximum=MAX_LIMIT_VALUE)], {agent: roles})
                .check(agent, ex.server, ex.tool, d.arguments, now_ms, d.payment)
                .charges.get(lim.id)
            )
        except BadCost:
            costs[lim.id] = None
    ex.limits = [_limit_view(lim, costs[lim.id]) for lim in matching]
    denied_by = d.limit_check.denied_by if d.code == DenyCode.LIMIT and d.limit_check else None
    full = next((x for x in matching if denied_by and x.id == denied_by.limit_id), None)
    if full is not None:
        ex.reason = (
            f"limit {full.id!r}: this call costs {costs[full.id]}, and its max is {full.maximum} "
            f"per {describe_limit(full)['window']}: it cannot pass even with an empty window"
        )


def _limit_view(lim: Limit, cost: Decimal | None) -> dict[str, Any]:
    view = describe_limit(lim)
    view = {"id": lim.id, **view, "cost_source": view.pop("cost"), "cost": str(cost) if cost is not None else None}
    if lim.cost[0] == "x402":
        view["note"] = (
            "charged when the call is decided, with the x402 payment it carries (--payment AMOUNT); "
            "a call without one passes while budget remains, and the upstream names its price"
        )
    return view


def _finish(ex: Explanation) -> Explanation:
    if ex.limits and LIVE_STATE_NOTE not in ex.notes:
        ex.notes.append(LIVE_STATE_NOTE)
    return ex


def _evaluation_errors(
    bundle: PolicyBundle,
    principal: Principal,
    server: str,
    aid: str,
    arguments: Mapping[str, Any],
    at: datetime,
    input_schema: Mapping[str, Any] | None,
    attestation: str,
) -> list[dict[str, str]]:
    """Policies Cedar could not evaluate for this request: it skips them, so an erroring permit
    permits nothing, and the enclave denies when a forbid errors (decision 0006). The engine's
    reason names only the first error, so evaluate the same request once more here, with every
    policy, for the diagnostics alone."""
    ns = NAMESPACE
    attrs = {
        **(bundle.agents[principal.agent].attrs if principal.agent in bundle.agents else {}),
        "id": principal.agent,
    }
    attrs.setdefault("region", "")
    servers = json.loads(bundle.entities_json)
    for e in servers:
        if e["uid"] == {"type": f"{ns}::Server", "id": server}:
            e["attrs"]["attestation"] = attestation  # as the engine was told (set_server_levels)
    entities = [
        *servers,
        {
            "uid": {"type": f"{ns}::Agent", "id": principal.agent},
            "attrs": attrs,
            "parents": [{"type": f"{ns}::Role", "id": r} for r in sorted(principal.roles)],
        },
    ]
    text = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{at.microsecond // 1000:03d}Z"
    request = {
        "principal": f"{ns}::Agent::{json.dumps(principal.agent)}",
        "action": f"{ns}::Action::{json.dumps(aid)}",
        "resource": f"{ns}::Server::{json.dumps(server)}",
        "context": {
            "input": cedar_value(arguments, input_schema),
            "system": {"now": {"__extn": {"fn": "datetime", "arg": text}}},
            "issuer": principal.issuer,
        },
    }
    policies = cedarpy.PolicySet.from_json_str(
        json.dumps({"staticPolicies": dict(bundle.policies), "templates": {}, "templateLinks": []})
    )
    result = cedarpy.is_authorized(request, policies, json.dumps(entities))
    out = []
    for err in result.diagnostics.errors:
        e = err if isinstance(err, Mapping) else {"error": str(err)}
        text = str(e.get("error", e))
        named = re.search(r"policy `([^`]+)`", text)
        out.append({"policy": str(e.get("policy_id") or (named.group(1) if named else "?")), "error": text})
    return out


# Denials that come before the limits are looked at (or, for bad-arguments, before they are known).
_BEFORE_LIMITS = frozenset(
    {
        DenyCode.BAD_ARGUMENTS,
        DenyCode.UNKNOWN_AGENT,
        DenyCode.UNAUTHENTICATED,
        DenyCode.UNKNOWN_SERVER,
        DenyCode.UNKNOWN_TOOL,
        DenyCode.QUARANTINED,
    }
)


def _target(ex: Explanation) -> str:
    if ex.kind == ActionKind.TOOL.value:
        return f"{ex.server}___{ex.tool}"
    return f"{ex.kind} {ex.tool!r} on {ex.server}" if ex.tool else f"{ex.kind} by {ex.server}"


def render(ex: Explanation) -> str:
    verdict = ex.decision.upper()
    if ex.decision == "deny" and not ex.enforced:
        verdict += " (log-only mode: logged as a denial, but the call goes through)"
    lines = [
        f"decision: {verdict}" + (f"  [{ex.code}]" if ex.code else ""),
        f"reason:   {ex.reason}",
        f"call:     agent {ex.agent!r} -> {_target(ex)} at {ex.at}",
        f"roles:    {', '.join(ex.roles) or '(none)'} ({ex.roles_source})",
        f"mode:     {ex.mode}",
    ]
    if ex.payment is not None:
        lines.append(f"payment:  x402 {ex.payment}")
    if ex.attestation is not None:
        lines.append(f"server:   resource.attestation = {ex.attestation!r}")
    if ex.discoverable is not None:
        lines.append(
            f"discovery: {ex.server}___{ex.tool} "
            + (
                "appears in this agent's tools/list"
                if ex.discoverable
                else "is hidden from this agent's tools/list (no arguments could be permitted)"
            )
        )
    if ex.considered:
        lines.append(
            f"policies:  {ex.considered} can apply to this tool; determining:" + ("" if ex.policies else " none")
        )
    for p in ex.policies:
        where = f"{p.get('file')}:{p.get('line')}" if p.get("line") else str(p.get("file"))
        lines.append(f"  - {p['id']} ({p.get('effect', '?')}, {where})")
        source = "\n".join(x for x in (p.get("comment"), p.get("source")) if x)
        lines += [f"      {x}" for x in source.splitlines()]
    if ex.evaluation_errors:
        lines.append("evaluation errors (a permit that errors permits nothing; a forbid that errors denies):")
        lines += [f"  - {e['policy']}: {e['error']}" for e in ex.evaluation_errors]
    if ex.limits:
        lines.append("limits that apply to this call:")
        for lim in ex.limits:
            cost = f"this call costs {lim['cost']}" if lim.get("cost") is not None else "cost not computed"
            lines.append(
                f"  - {lim['id']}: {lim['kind']} max {lim['max']} per {lim['window']} per {lim['per']}, "
                f"cost {lim['cost_source']}; {cost}"
            )
            if lim.get("note"):
                lines.append(f"      {lim['note']}")
    elif ex.code not in _BEFORE_LIMITS:
        lines.append("limits: none apply to this call")
    lines += [f"note: {n}" for n in ex.notes]
    return "\n".join(lines) + "\n"
