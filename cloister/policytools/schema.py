"""A Cedar schema generated from a bundle, for bundles that do not ship `schema.cedarschema`.

It describes exactly what the enclave's engine builds (see `enclave/policy.py`):

- `Cloister::Agent in [Cloister::Role]` with the agents' attributes from entities.toml, plus
  `id` and `region` (the engine always sets both);
- `Cloister::Server` with the attributes the engine gives it (`name`, `region`, `category`,
  `attestation`... and those from entities.toml), read from the bundle's entity list;
- `Action::"Mcp"` ⊃ `Action::"CallTool"` ⊃ one action per tool, `"<server>___<tool>"`, whose
  context is `{input: <the tool's arguments>, system: {now: datetime}, issuer: String}` (the
  issuer that authenticated the call).

The arguments are typed only for tools whose JSON Schema the bundle carries as
`inputs/<server>___<tool>.json` (the `inputSchema` an MCP server lists in `tools/list`; the
enclave ignores these files). Other tools get an empty `input` record, and validation errors
about their arguments are dropped: nothing is known about them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cloister.enclave.bundle import MCP_ACTIONS, NAMESPACE, ActionKind, PolicyBundle, action_id

INPUTS_DIR = "inputs/"
_MAX_DEPTH = 8


@dataclass(frozen=True)
class GeneratedSchema:
    text: str
    typed_actions: frozenset[str]  # actions whose `context.input` is typed from an input schema
    notes: tuple[str, ...]  # what could not be typed, and why


def _q(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def _value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, int):
        return "Long"
    return "String"


def _record(entities: Iterable[Mapping[str, Any]], always: Mapping[str, str], what: str, notes: list[str]) -> list[str]:
    """The fields of a record type covering every entity's attributes: required when all have it."""
    items = list(entities)
    types: dict[str, set[str]] = {}
    present: dict[str, int] = {}
    for attrs in items:
        for k, v in attrs.items():
            types.setdefault(k, set()).add(_value_type(v))
            present[k] = present.get(k, 0) + 1
    fields: list[str] = []
    for k, t in always.items():
        seen = types.pop(k, set()) | {t}
        present.pop(k, None)
        if len(seen) > 1:
            notes.append(f"{what} attribute {k!r} has several types ({', '.join(sorted(seen))}); it is left out")
            continue
        fields.append(f"{_q(k)}: {t}")
    for k in sorted(types):
        if len(types[k]) > 1:
            notes.append(f"{what} attribute {k!r} has several types ({', '.join(sorted(types[k]))}); it is left out")
            continue
        optional = "?" if present[k] < len(items) else ""
        fields.append(f"{_q(k)}{optional}: {next(iter(types[k]))}")
    return fields


def _block(fields: list[str]) -> str:
    """An entity's record type, one attribute per line."""
    return "{\n" + "".join(f"    {f},\n" for f in fields) + "  }" if fields else "{}"


def json_schema_type(schema: Any, depth: int = 0) -> str | None:
    """A Cedar type for a JSON Schema, or None when it has no single Cedar type.

    As the engine types arguments (and AWS AgentCore does): `integer` is a Long, `number` a
    `decimal` (compared with `.lessThan(decimal("500.0"))`, not `<`).
    """
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return None
    t = schema.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        t = non_null[0] if len(non_null) == 1 else None
    if t is None and isinstance(schema.get("enum"), list) and all(isinstance(x, str) for x in schema["enum"]):
        t = "string"
    if t == "string":
        return "String"
    if t == "integer":
        return "Long"
    if t == "number":
        return "decimal"
    if t == "boolean":
        return "Bool"
    if t == "array":
        inner = json_schema_type(schema.get("items"), depth + 1)
        return f"Set<{inner}>" if inner else None
    if t == "object" or (t is None and isinstance(schema.get("properties"), Mapping)):
        props = schema.get("properties") or {}
        if not isinstance(props, Mapping):
            return None
        required = set(schema.get("required") or [])
        fields = []
        for name in sorted(props):
            inner = json_schema_type(props[name], depth + 1)
            if inner is not None:
                fields.append(f"{_q(str(name))}{'' if name in required else '?'}: {inner}")
        return "{" + ", ".join(fields) + "}"
    return None


def input_schemas(files: Mapping[str, bytes]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The JSON Schemas under inputs/, by action id, and (file, problem) for unreadable ones."""
    out: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for path, data in sorted(files.items()):
        if not (path.startswith(INPUTS_DIR) and path.endswith(".json")):
            continue
        try:
            out[path[len(INPUTS_DIR) : -len(".json")]] = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append((path, f"not a JSON document: {exc}"))
    return out, problems


def generate_schema(bundle: PolicyBundle, inputs: Mapping[str, Any]) -> GeneratedSchema:
    notes: list[str] = []
    ns = NAMESPACE
    agent_attrs = [{**a.attrs} for a in bundle.agents.values()]
    # The servers exactly as the engine builds them (their attributes include derived ones).
    server_attrs = [e["attrs"] for e in json.loads(bundle.entities_json) if e["uid"]["type"] == f"{ns}::Server"]
    agent_always = {"id": "String", "region": "String"}  # the engine always sets these
    lines = [
        "// Generated by `cloister policy schema` from entities.toml (and inputs/*.json). Review it, then",
        "// save it as schema.cedarschema to validate policies against it strictly.",
        f"namespace {ns} {{",
        "  entity Role;",
        f"  entity Agent in [Role] {_block(_record(agent_attrs, agent_always, 'agent', notes))};",
        f"  entity Server {_block(_record(server_attrs, {'name': 'String'}, 'server', notes))};",
        "  action Mcp;",
        "  action CallTool in [Mcp];",
    ]
    typed: set[str] = set()
    for server in bundle.servers.values():
        for tool in server.tools:
            aid = action_id(server.name, tool)
            input_type = "{}"
            if aid in inputs:
                t = json_schema_type(inputs[aid])
                if t is not None and t.startswith("{"):
                    input_type = t
                    typed.add(aid)
                else:
                    notes.append(f"inputs/{aid}.json: not an object schema; the arguments stay untyped")
            lines += [
                f"  action {_q(aid)} in [CallTool] appliesTo {{",
                "    principal: [Agent],",
                "    resource: [Server],",
                f'    context: {{ "input": {input_type}, "system": {{ "now": datetime }}, "issuer": String }}',
                "  };",
            ]
    for aid in sorted(set(inputs) - {action_id(s.name, t) for s in bundle.servers.values() for t in s.tools}):
        notes.append(f"inputs/{aid}.json: no such tool in entities.toml")
    # Decision 0018: a resource read's input is its URI, a prompt's its name; sampling and
    # elicitation requests stay untyped.
    mcp_inputs = {ActionKind.RESOURCE: '{ "uri": String }', ActionKind.PROMPT: '{ "name": String }'}
    for kind, action in MCP_ACTIONS.items():
        lines += [
            f"  action {_q(action)} in [Mcp] appliesTo {{",
            "    principal: [Agent],",
            "    resource: [Server],",
            f'    context: {{ "input": {mcp_inputs.get(kind, "{}")}, '
            '"system": { "now": datetime }, "issuer": String }',
            "  };",
        ]
    lines.append("}")
    return GeneratedSchema(text="\n".join(lines) + "\n", typed_actions=frozenset(typed), notes=tuple(notes))
