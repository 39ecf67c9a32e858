"""Cedar evaluation for one bundle version, sliced by action.

cedarpy evaluates every policy of a set linearly, so the engine keeps one PolicySet per tool
action holding only the policies whose action scope can match it (the action itself, a list
containing it, an action group, or any action). Slices are built lazily and cached; each
decision evaluates one slice.

Entity model (following AWS AgentCore Policy where it fits, in the `Cloister` namespace):

- principal `Cloister::Agent::"<sub>"`, a member of `Cloister::Role::"<role>"` for each role
  its token carries, with the agent's attributes from entities.toml;
- action `Cloister::Action::"<server>___<tool>"`, in `Action::"CallTool"`, in `Action::"Mcp"`;
- resource `Cloister::Server::"<server>"` with its attributes (region, category, attestation...);
- context `{input: <the tool arguments>, system: {now: datetime}, issuer: <the token's issuer>}`:
  the issuer that authenticated this call (its `iss`), one the bundle binds to the agent.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cedarpy

from cloister.enclave.bundle import ACTION_GROUPS, MCP_ACTIONS, NAMESPACE, PolicyBundle, _entity_refs, action_id

_ACTION_TYPE = f"{NAMESPACE}::Action"
# Actions that are not a tool's: the groups and the other MCP requests' (decision 0018).
_NON_TOOL_ACTIONS = frozenset(ACTION_GROUPS) | frozenset(MCP_ACTIONS.values())
# Entity stores kept (`_Stores`): each is one action's entities (about the bundle's roles and
# servers, plus a few actions) and, for AGENT_STORES, one principal. Bounded: a miss costs about
# 20 us; memory is about 13 kB per store with 50 roles.
ACTION_STORES = 4096
AGENT_STORES = 4096


@dataclass(frozen=True)
class Principal:
    agent: str
    roles: frozenset[str]
    issuer: str


@dataclass(frozen=True)
class CedarVerdict:
    allowed: bool
    policy_ids: tuple[str, ...]
    # "" when allowed; "policy" when a forbid matched; "no-permit" when nothing permitted.
    code: str
    reason: str


# Cedar's JSON formats (entities, context) read an object with a member `__entity` as an entity
# reference, `__extn` as an extension value (decimal("1.0"), ip(...)), and `__expr` (refused by
# current versions) as an expression: not as a record. Every escape Cedar defines starts with
# "__", so tool arguments with such a member anywhere are refused (decide, step 1): Cedar would
# evaluate a value other than the one the upstream receives.
CEDAR_ESCAPE_PREFIX = "__"


# A value partial evaluation leaves open (cedarpy's `unknown` extension): discovery's input.
UNKNOWN: Any = {"__extn": {"fn": "unknown", "arg": "input"}}


class CedarEscape(ValueError):
    """Tool arguments hold an object member that Cedar would read as an escape."""


def cedar_escape(value: Any) -> str | None:
    """Where a JSON value holds an object member Cedar could read as an escape (a path such as
    `input.amount.__extn`), or None when it holds none."""
    stack: list[tuple[Any, str]] = [(value, "input")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                where = f"{path}.{k}" if isinstance(k, str) else f"{path}[{k!r}]"
                if isinstance(k, str) and k.startswith(CEDAR_ESCAPE_PREFIX):
                    return where
                stack.append((x, where))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]") for i, x in enumerate(v))
    return None


def cedar_value(value: Any, schema: Mapping[str, Any] | None = None) -> Any:
    """A JSON value as a Cedar value, typed as AWS AgentCore types tool inputs.

    JSON numbers are Cedar `decimal`s (JSON Schema "number"), except where the tool's input schema
    says "integer" (Cedar Long). A number a decimal cannot hold exactly (more than 4 fractional
    digits, out of range) stays a string, so policies comparing it error, and erroring forbids fail
    closed. Nulls are dropped, since Cedar has none. An object member that Cedar would read as an
    escape raises CedarEscape: argument data never becomes an entity or an extension value.
    """
    kind = schema.get("type") if isinstance(schema, Mapping) else None
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if kind == "integer" and (isinstance(value, int) or value.is_integer()) and abs(value) < 2**63:
            return int(value)
        return _decimal(value)
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema, Mapping) else None
        return [cedar_value(v, items if isinstance(items, Mapping) else None) for v in value if v is not None]
    if isinstance(value, dict):
        if any(isinstance(k, str) and k.startswith(CEDAR_ESCAPE_PREFIX) for k in value):
            raise CedarEscape(f"an argument object has a member starting with {CEDAR_ESCAPE_PREFIX!r}")
        props = schema.get("properties") if isinstance(schema, Mapping) else None
        props = props if isinstance(props, Mapping) else {}
        return {k: cedar_value(v, props.get(k)) for k, v in value.items() if v is not None}
    return str(value)


def _decimal(value: int | float) -> Any:
    text = str(value) if isinstance(value, int) else repr(value)
    if "e" in text or "E" in text:
        return text
    whole, _, frac = text.partition(".")
    if len(frac) > 4 or abs(value) >= 922337203685477:
        return text
    return {"__extn": {"fn": "decimal", "arg": f"{whole}.{frac or '0'}"}}


def _cedar_datetime(now: datetime) -> dict[str, Any]:
    return {"__extn": {"fn": "datetime", "arg": _datetime_text(now)}}


# The last second formatted, (POSIX second, its text): decisions within a second share it. One
# tuple, replaced whole, so threads read a consistent pair.
_last_second: tuple[int, str] = (-1, "")


def _datetime_text(now: datetime) -> str:
    """`now` as Cedar's datetime() reads it, to the millisecond, in UTC."""
    global _last_second
    second = int(now.timestamp() // 1)
    cached, text = _last_second
    if cached != second:
        text = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (second, text)
    return f"{text}.{now.microsecond // 1000:03d}Z"


_json = json.JSONEncoder(ensure_ascii=True, separators=(", ", ": ")).encode


def _error_policy(error: Any) -> str:
    """The policy id an evaluation error names (cedarpy reports errors as dicts or text)."""
    if isinstance(error, dict):
        return str(error.get("policy_id", ""))
    text = str(error)
    start = text.find("`")
    end = text.find("`", start + 1)
    return text[start + 1 : end] if 0 <= start < end else ""


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("error", error))
    return str(error)


class _Stores:
    """Entity stores keyed by everything they are made from. A memo only (a miss builds the
    store again), bounded, least recently used first out; its own lock."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, cedarpy.Entities] = OrderedDict()  # guarded by _lock

    def get(self, key: Hashable) -> cedarpy.Entities | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: Hashable, store: cedarpy.Entities) -> None:
        with self._lock:
            self._items[key] = store
            if len(self._items) > self._size:
                self._items.popitem(last=False)


@dataclass(frozen=True)
class _Generation:
    """The entity stores made from one set of server attestation levels: replaced whole when the
    levels change, so a decision reads one generation and never mixes the old and the new."""

    common: cedarpy.Entities  # every entity but the tool actions
    actions: _Stores  # per action: common + the tool actions its slice can reach
    agents: _Stores  # per (action, agent, roles): that store + the principal


class PolicyEngine:
    """Decides tools/call requests for one immutable bundle."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self.bundle = bundle
        self._general: dict[str, Any] = {}
        self._by_action: dict[str, dict[str, Any]] = {}
        # Policies of log-only sets are evaluated apart: they are recorded, never enforced.
        log_only = bundle.settings.log_only_sets
        self._shadow = PolicyEngine(_only(bundle, log_only, keep=True)) if log_only else None
        for pid, policy in bundle.policies.items():
            if bundle.policy_sources.get(pid) in log_only:
                continue
            targets = _action_targets(policy.get("action", {}))
            if targets is None:
                self._general[pid] = policy
            else:
                for t in targets:
                    self._by_action.setdefault(t, {})[pid] = policy
        # The entities, with the tool actions apart. A request can reach only its principal, its
        # action, its server, their ancestors and the entities its policies name (attributes are
        # scalars, context.input holds no entity: decide step 1), so each action's store holds the
        # other entities and the tool actions its slice can reach, not the bundle's every tool:
        # adding a principal copies the store, and with thousands of tools that copy took
        # milliseconds (docs/decisions/0026).
        self._common: list[dict[str, Any]] = []
        self._tool_actions: dict[str, dict[str, Any]] = {}
        for e in json.loads(bundle.entities_json):
            uid = e["uid"]
            if uid["type"] == _ACTION_TYPE and uid["id"] not in _NON_TOOL_ACTIONS:
                self._tool_actions[uid["id"]] = e
            else:
                self._common.append(e)
        self._levels: dict[str, str] = {}
        self._lock = threading.Lock()  # guards building slices and generations
        # Per action: its slice of policies, whether they read `context.system` (the time: building
        # a Cedar datetime costs about as much as evaluating a small policy set), and the entity
        # JSON of the tool actions the slice can reach. Independent of the servers' levels.
        self._slices: dict[str, tuple[cedarpy.PolicySet, bool, str]] = {}
        self._gen = self._generation(self._common)

    @staticmethod
    def _generation(common: list[dict[str, Any]]) -> _Generation:
        common_store = cedarpy.Entities.from_json_str(json.dumps(common))
        return _Generation(common_store, _Stores(ACTION_STORES), _Stores(AGENT_STORES))

    def _slice(self, action: str) -> tuple[cedarpy.PolicySet, bool, str]:
        hit = self._slices.get(action)
        if hit is None:
            with self._lock:
                hit = self._slices.get(action)
                if hit is None:
                    policies = {**self._general, **self._by_action.get(action, {})}
                    text = json.dumps({"staticPolicies": policies, "templates": {}, "templateLinks": []})
                    uses_system = '"attr": "system"' in text or '"attr":"system"' in text
                    named = {action} | {
                        str(u["id"]) for p in policies.values() for u in _entity_refs(p) if u["type"] == _ACTION_TYPE
                    }
                    reach = [self._tool_actions[a] for a in sorted(named) if a in self._tool_actions]
                    hit = (cedarpy.PolicySet.from_json_str(text), uses_system, json.dumps(reach))
                    self._slices[action] = hit
        return hit

    def _store(self, p: Principal, action: str) -> cedarpy.Entities:
        """The entities a decision on `action` by `p` reads: the action's store plus the principal,
        a member of the roles its token carries, with the agent's attributes from entities.toml."""
        gen = self._gen  # one generation throughout: a store is never cached under newer levels
        key = (action, p.agent, p.roles)
        store = gen.agents.get(key)
        if store is not None:
            return store
        base = gen.actions.get(action)
        if base is None:
            base = gen.common.with_added_json_str(self._slice(action)[2])
            gen.actions.put(action, base)  # a race builds the same store twice
        spec = self.bundle.agents.get(p.agent)
        attrs = dict(spec.attrs) if spec else {}
        attrs.setdefault("region", "")
        attrs["id"] = p.agent
        delta = [
            {
                "uid": {"type": f"{NAMESPACE}::Agent", "id": p.agent},
                "attrs": attrs,
                "parents": [{"type": f"{NAMESPACE}::Role", "id": r} for r in sorted(p.roles)],
            }
        ]
        store = base.with_added_json_str(json.dumps(delta))
        gen.agents.put(key, store)
        return store

    def set_server_levels(self, levels: dict[str, str]) -> None:
        """Update `resource.attestation` (the identity each server has proven) for later decisions."""
        if levels == self._levels:
            return
        common = [
            {**e, "attrs": {**e["attrs"], "attestation": levels[e["uid"]["id"]]}}
            if e["uid"]["type"] == f"{NAMESPACE}::Server" and e["uid"]["id"] in levels
            else e
            for e in self._common
        ]
        gen = self._generation(common)
        # Swap whole objects: a concurrent decision sees either the old or the new entities.
        with self._lock:
            self._common, self._gen = common, gen
        self._levels = dict(levels)
        if self._shadow is not None:
            self._shadow.set_server_levels(levels)

    def slice_size(self, server: str, tool: str, *, action: str | None = None) -> int:
        return len(self._slice(action or action_id(server, tool))[0])

    def _request(self, p: Principal, server: str, aid: str) -> dict[str, Any]:
        return {
            "principal": {"type": f"{NAMESPACE}::Agent", "id": p.agent},
            "action": {"type": _ACTION_TYPE, "id": aid},
            "resource": {"type": f"{NAMESPACE}::Server", "id": server},
        }

    @staticmethod
    def _context(
        p: Principal, arguments: Mapping[str, Any], input_schema: Mapping[str, Any] | None, system: bool, now: datetime
    ) -> str:
        """The request's context as Cedar JSON, written around the input's (the members a dict
        would give); `system` (the time) only for slices that read it."""
        context = f'{{"input":{_json(cedar_value(arguments, input_schema))},"issuer":{_json(p.issuer)}'
        if system:
            context += f',"system":{{"now":{_json(_cedar_datetime(now))}}}'
        return context + "}"

    def evaluate(
        self,
        p: Principal,
        server: str,
        tool: str,
        arguments: Mapping[str, Any],
        now: datetime,
        input_schema: Mapping[str, Any] | None = None,
        *,
        action: str | None = None,
    ) -> CedarVerdict:
        """`action`: the Cedar action when it is not the tool's own (resources, prompts, sampling,
        elicitation: `bundle.MCP_ACTIONS`, decision 0018)."""
        aid = action or action_id(server, tool)
        policies, uses_system, _ = self._slice(aid)
        request = self._request(p, server, aid)
        request["context"] = self._context(p, arguments, input_schema, uses_system, now)
        # The extension's batch entry point with a pre-parsed PolicySet and Entities handle: the
        # public wrapper re-serialises and re-wraps results, which costs more than the evaluation.
        raw = cedarpy._internal.is_authorized_batch([request], policies, self._store(p, aid)._inner, None, False)
        result = json.loads(raw[0])
        diagnostics = result.get("diagnostics", {})
        reasons = tuple(sorted(diagnostics.get("reason", [])))
        errors = diagnostics.get("errors", [])
        # Cedar ignores a policy whose evaluation errors (a type error, a missing attribute). For a
        # forbid that would let the call through, so fail closed: an unevaluable forbid denies.
        failed_forbids = tuple(
            sorted(
                pid
                for pid in map(_error_policy, errors)
                if pid and self.bundle.policies.get(pid, {}).get("effect") == "forbid"
            )
        )
        if failed_forbids:
            detail = _error_text(errors[0])
            return CedarVerdict(
                False,
                failed_forbids,
                "policy",
                f"forbid policy {', '.join(failed_forbids)} could not be evaluated for these arguments "
                f"({detail}); failing closed",
            )
        if result.get("decision") == "Allow":
            return CedarVerdict(True, reasons, "", "permitted by " + ", ".join(reasons))
        if reasons:
            return CedarVerdict(False, reasons, "policy", "forbidden by policy " + ", ".join(reasons))
        detail = f" ({len(errors)} policies could not be evaluated: {_error_text(errors[0])})" if errors else ""
        return CedarVerdict(False, (), "no-permit", "no policy permits this call" + detail)

    def shadow_verdict(
        self,
        p: Principal,
        server: str,
        tool: str,
        arguments: Mapping[str, Any],
        now: datetime,
        input_schema: Mapping[str, Any] | None,
        *,
        action: str | None = None,
    ) -> str:
        """What the log-only policy sets say about an allowed call: a note for the log, or ""."""
        if self._shadow is None:
            return ""
        shadow = self._shadow.evaluate(p, server, tool, arguments, now, input_schema, action=action)
        if shadow.code == "policy":
            return f"log-only policy set would deny: {shadow.reason}"
        return ""

    def may_call(
        self, p: Principal, server: str, tool: str, now: datetime, *, action: str | None = None, known: Any = None
    ) -> bool:
        """Whether some arguments could be permitted (partial evaluation, input unknown).

        Used only to filter discovery; every call is decided by `evaluate`. `action` as for
        `evaluate`; `known`: the part of the input a listing already knows (a resource's URI, a
        prompt's name), with `UNKNOWN` where it does not (decision 0018).
        """
        aid = action or action_id(server, tool)
        if not self._general and aid not in self._by_action:
            return False
        request = {
            "principal": f"{NAMESPACE}::Agent::{json.dumps(p.agent)}",
            "action": f"{_ACTION_TYPE}::{json.dumps(aid)}",
            "resource": f"{NAMESPACE}::Server::{json.dumps(server)}",
            "context": {
                "input": UNKNOWN if known is None else known,
                "system": {"now": _cedar_datetime(now)},
                "issuer": p.issuer,
            },
        }
        result = cedarpy.is_authorized_partial(request, self._slice(aid)[0], self._store(p, aid))
        return result.decision != cedarpy.Decision.Deny


def _action_targets(scope: Mapping[str, Any]) -> list[str] | None:
    """The tool actions a policy's action scope names, or None when it may match any action."""
    op = scope.get("op")
    if op == "All":
        return None
    entities = [scope["entity"]] if "entity" in scope else list(scope.get("entities", []))
    targets: list[str] = []
    for e in entities:
        if not isinstance(e, Mapping) or e.get("type") != _ACTION_TYPE:
            return None
        eid = str(e.get("id"))
        if op == "in" and eid in ACTION_GROUPS:
            return None
        targets.append(eid)
    return targets


def _only(bundle: PolicyBundle, sets: frozenset[str], *, keep: bool) -> PolicyBundle:
    """The bundle with only (keep=True) or without the policies of the given sets."""
    from dataclasses import replace

    chosen = {pid: p for pid, p in bundle.policies.items() if (bundle.policy_sources.get(pid) in sets) == keep}
    settings = replace(bundle.settings, log_only_sets=frozenset())
    return replace(bundle, policies=chosen, settings=settings)
