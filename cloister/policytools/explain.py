"""`cloister policy explain`: decide one call offline, with the enclave's own engine, and say why.

The steps follow `EnclaveCore._decide` in order: arguments (size cap, a JSON object), the
agent and the roles its token would claim, the server and tool, Cedar (`PolicyEngine.evaluate`),
then limits (`LimitBook.check`). Limits are checked on a fresh book: this shows which limits
apply and what this call costs, not what remains; live budget state is in the running
enclave only. Token signatures are not checked here: the principal is taken as given.
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

from cloister.enclave.bundle import MAX_LIMIT_VALUE, NAMESPACE, Limit, PolicyBundle, action_id
from cloister.enclave.limits import BadCost, LimitBook
from cloister.enclave.policy import PolicyEngine, Principal, cedar_value
from cloister.policytools.diff import describe_limit
from cloister.policytools.findings import PolicyInfo, Validation
from cloister.policytools.schema import input_schemas
from cloister.verify.canonical import parse_json
from cloister.verify.errors import DecodeError

LIVE_STATE_NOTE = ("limits are checked against an empty window: this shows which limits apply and what this call "
                   "costs; what remains now is known only to the running enclave")


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


def explain(validation: Validation, *, agent: str, roles: list[str] | None, server: str, tool: str,
            arguments_json: str, at: datetime, attestation: str | None = None) -> Explanation:
    bundle = validation.bundle
    assert bundle is not None, "explain needs a bundle that parses"
    spec = bundle.agents.get(agent)
    granted = sorted(spec.roles) if spec else []
    chosen = sorted(set(roles)) if roles else granted
    ex = Explanation(agent=agent, roles=chosen, roles_source="--role" if roles else "all roles granted to the agent",
                     server=server, tool=tool, at=at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                     mode=bundle.settings.mode)
    ex.notes.append("the token is not checked: the agent and roles are taken as given")
    # 1. Arguments, as the enclave parses them.
    try:
        arguments = parse_json(arguments_json.encode(), what="arguments", max_bytes=bundle.settings.max_argument_bytes)
        if not isinstance(arguments, dict):
            raise DecodeError("arguments: must be a JSON object")
    except DecodeError as exc:
        return _deny(ex, "bad-arguments", str(exc))
    # 2. The principal.
    if spec is None:
        return _deny(ex, "unknown-agent", f"agent {agent!r} is not registered in the policy bundle")
    for role in chosen:
        if role not in spec.roles:
            return _deny(ex, "unauthenticated",
                         f"role-not-granted: the bundle does not grant role {role!r} to agent {agent!r}")
    # 3. Server and tool.
    server_spec = bundle.servers.get(server)
    if server_spec is None:
        return _deny(ex, "unknown-server", f"server {server!r} is not in the policy bundle")
    if tool not in server_spec.tools:
        return _deny(ex, "unknown-tool", f"tool {tool!r} is not a tool of server {server!r} in the policy bundle")
    # 4. Cedar, with the enclave's engine.
    engine = PolicyEngine(bundle)
    _set_attestation(ex, engine, bundle, server, attestation)
    principal = Principal(agent=agent, roles=frozenset(chosen), issuer="(explain)")
    # The running enclave types arguments by the tool's input schema as the upstream lists it
    # (numbers are decimals unless it says integer); offline, that is inputs/<server>___<tool>.json.
    input_schema = input_schemas(validation.files)[0].get(action_id(server, tool))
    if input_schema is None:
        ex.notes.append(f"no inputs/{action_id(server, tool)}.json: arguments are typed without the tool's input "
                        "schema (every number is a decimal); the enclave uses the schema the upstream lists")
    verdict = engine.evaluate(principal, server, tool, arguments, at, input_schema)
    ex.considered = engine.slice_size(server, tool)
    ex.discoverable = engine.may_call(principal, server, tool, at)
    ex.policies = [_policy_view(validation.policies.get(pid), pid, bundle) for pid in verdict.policy_ids]
    ex.evaluation_errors = _evaluation_errors(bundle, principal, server, tool, arguments, at, input_schema,
                                              ex.attestation or "none")
    if not verdict.allowed:
        _deny(ex, verdict.code, verdict.reason)
    # 5. Limits on an empty book: which apply and what this call costs.
    now_ms = int(at.timestamp() * 1000)
    roleset = frozenset(chosen)
    matching = [lim for lim in bundle.limits if lim.matches(agent, roleset, server, tool)]
    try:
        # Each limit's cost, read through the enclave's own LimitBook with the cap lifted.
        costs = {lim.id: LimitBook([replace(lim, maximum=MAX_LIMIT_VALUE)]).check(
            agent, roleset, server, tool, arguments, now_ms).charges.get(lim.id) for lim in matching}
    except BadCost as exc:
        ex.limits = [_limit_view(lim, None) for lim in matching]
        if verdict.allowed:
            _deny(ex, "bad-arguments", str(exc))
        return _finish(ex)
    ex.limits = [_limit_view(lim, costs[lim.id]) for lim in matching]
    fresh = LimitBook(bundle.limits).check(agent, roleset, server, tool, arguments, now_ms)
    if verdict.allowed and not fresh.ok and fresh.denied_by is not None:
        lim = next(x for x in matching if x.id == fresh.denied_by.limit_id)
        _deny(ex, "limit", f"limit {lim.id!r}: this call costs {costs[lim.id]}, and its max is {lim.maximum} "
              f"per {describe_limit(lim)['window']}: it cannot pass even with an empty window")
    elif verdict.allowed:
        ex.decision, ex.code = "allow", ""
        ex.reason = "permitted by " + ", ".join(verdict.policy_ids)
    return _finish(ex)


def _set_attestation(ex: Explanation, engine: PolicyEngine, bundle: PolicyBundle, server: str,
                     level: str | None) -> None:
    """`resource.attestation` is what the server has proven to the running enclave; offline, assume
    the identity the bundle pins for it verified, unless --attestation says otherwise."""
    chosen = level or bundle.servers[server].identity.kind
    engine.set_server_levels({server: chosen})
    ex.attestation = chosen
    if not level:
        ex.notes.append(f"resource.attestation is taken as {chosen!r} (the identity the bundle pins, as if verified); "
                        "pass --attestation to try another level")


def _limit_view(lim: Limit, cost: Decimal | None) -> dict[str, Any]:
    view = describe_limit(lim)
    view = {"id": lim.id, **view, "cost_source": view.pop("cost"), "cost": str(cost) if cost is not None else None}
    if lim.cost[0] == "x402":
        view["note"] = "charged after the call, with the amount the upstream's x402 payment requirement names"
    return view


def _deny(ex: Explanation, code: str, reason: str) -> Explanation:
    ex.decision, ex.code, ex.reason = "deny", code, reason
    # As in the enclave: log-only lets policy, no-permit and limit denials through (logged as denials).
    ex.enforced = not (ex.mode == "log-only" and code in ("policy", "no-permit", "limit"))
    return _finish(ex)


def _finish(ex: Explanation) -> Explanation:
    if ex.limits and LIVE_STATE_NOTE not in ex.notes:
        ex.notes.append(LIVE_STATE_NOTE)
    return ex


def _evaluation_errors(bundle: PolicyBundle, principal: Principal, server: str, tool: str,
                       arguments: Mapping[str, Any], at: datetime,
                       input_schema: Mapping[str, Any] | None, attestation: str) -> list[dict[str, str]]:
    """Policies Cedar could not evaluate for this request: it skips them, so an erroring permit
    permits nothing, and the enclave denies when a forbid errors (decision 0006). The engine's
    reason names only the first error, so evaluate the same request once more here, with every
    policy, for the diagnostics alone."""
    ns = NAMESPACE
    attrs = {**(bundle.agents[principal.agent].attrs if principal.agent in bundle.agents else {}),
             "id": principal.agent}
    attrs.setdefault("region", "")
    servers = json.loads(bundle.entities_json)
    for e in servers:
        if e["uid"] == {"type": f"{ns}::Server", "id": server}:
            e["attrs"]["attestation"] = attestation  # as the engine was told (set_server_levels)
    entities = [*servers, {
        "uid": {"type": f"{ns}::Agent", "id": principal.agent}, "attrs": attrs,
        "parents": [{"type": f"{ns}::Role", "id": r} for r in sorted(principal.roles)]}]
    text = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{at.microsecond // 1000:03d}Z"
    request = {
        "principal": f"{ns}::Agent::{json.dumps(principal.agent)}",
        "action": f"{ns}::Action::{json.dumps(action_id(server, tool))}",
        "resource": f"{ns}::Server::{json.dumps(server)}",
        "context": {"input": cedar_value(arguments, input_schema),
                    "system": {"now": {"__extn": {"fn": "datetime", "arg": text}}}},
    }
    policies = cedarpy.PolicySet.from_json_str(json.dumps(
        {"staticPolicies": dict(bundle.policies), "templates": {}, "templateLinks": []}))
    result = cedarpy.is_authorized(request, policies, json.dumps(entities))
    out = []
    for err in result.diagnostics.errors:
        e = err if isinstance(err, Mapping) else {"error": str(err)}
        text = str(e.get("error", e))
        named = re.search(r"policy `([^`]+)`", text)
        out.append({"policy": str(e.get("policy_id") or (named.group(1) if named else "?")), "error": text})
    return out


def render(ex: Explanation) -> str:
    verdict = ex.decision.upper()
    if ex.decision == "deny" and not ex.enforced:
        verdict += " (log-only mode: logged as a denial, but the call goes through)"
    lines = [
        f"decision: {verdict}" + (f"  [{ex.code}]" if ex.code else ""),
        f"reason:   {ex.reason}",
        f"call:     agent {ex.agent!r} -> {ex.server}{'___'}{ex.tool} at {ex.at}",
        f"roles:    {', '.join(ex.roles) or '(none)'} ({ex.roles_source})",
        f"mode:     {ex.mode}",
    ]
    if ex.attestation is not None:
        lines.append(f"server:   resource.attestation = {ex.attestation!r}")
    if ex.discoverable is not None:
        lines.append(f"discovery: {ex.server}___{ex.tool} "
                     + ("appears in this agent's tools/list" if ex.discoverable else
                        "is hidden from this agent's tools/list (no arguments could be permitted)"))
    if ex.considered:
        lines.append(f"policies:  {ex.considered} can apply to this tool; determining:"
                     + ("" if ex.policies else " none"))
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
            lines.append(f"  - {lim['id']}: {lim['kind']} max {lim['max']} per {lim['window']} per {lim['per']}, "
                         f"cost {lim['cost_source']}; {cost}")
            if lim.get("note"):
                lines.append(f"      {lim['note']}")
    elif ex.code not in ("bad-arguments", "unknown-agent", "unauthenticated", "unknown-server", "unknown-tool"):
        lines.append("limits: none apply to this call")
    lines += [f"note: {n}" for n in ex.notes]
    return "\n".join(lines) + "\n"
