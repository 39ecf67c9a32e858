"""Policies and entities against a Cedar schema: the bundle's own (errors) or one generated from
entities.toml (warnings: the generated schema is a best guess at what the engine builds)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

import cedarpy

from cloister.enclave.bundle import NAMESPACE, action_id
from cloister.policytools.findings import BUNDLE, SCHEMA_FILE, Finding, PolicyInfo, Validation, guess_line, line_of
from cloister.policytools.schema import generate_schema, input_schemas

# cedarpy's parser and validator slow down more than linearly with the number of policies in one
# call (10,000 policies: 2 s to parse, 12 s to validate at once; 0.3 s and 1.7 s in chunks).
# Policies are parsed and validated independently, so chunks give the same answers.
CHUNK = 200


def check_against_schema(v: Validation, texts: Mapping[str, str]) -> None:
    b = v.bundle
    assert b is not None
    if SCHEMA_FILE in texts:
        if v.has_error_in(SCHEMA_FILE):
            return
        v.schema = "file"
        schema_text = texts[SCHEMA_FILE]
        severity: Literal["error", "warning"] = "error"
        untyped: frozenset[str] = frozenset()
        _check_entities_schema(v, schema_text, texts)
    else:
        inputs, problems = input_schemas(v.files)
        for path, problem in problems:
            v.warn(path, None, problem)
        generated = generate_schema(b, inputs)
        for note in generated.notes:
            v.warn("entities.toml", None, f"generated schema: {note}")
        try:
            cedarpy.Schema.from_str(generated.text)
        except ValueError as exc:
            v.warn(BUNDLE, None, f"could not generate a schema from entities.toml: {exc}")
            return
        v.schema = "generated"
        schema_text = generated.text
        severity = "warning"
        untyped = frozenset(action_id(s.name, t) for s in b.servers.values() for t in s.tools) - generated.typed_actions
    by_file: dict[str, list[PolicyInfo]] = {}
    for p in v.policies.values():
        by_file.setdefault(p.file, []).append(p)
    schema = cedarpy.Schema.from_str(schema_text)
    for path, infos in by_file.items():
        if all(i.statement is not None for i in infos):
            chunks = [
                (n, "\n".join(i.statement.text for i in infos[n : n + CHUNK] if i.statement))
                for n in range(0, len(infos), CHUNK)
            ]
        else:
            chunks = [(0, texts[path])]
        errors = [(n, e) for n, text in chunks for e in cedarpy.validate_policies(text, schema).errors]
        # The validator's order varies between runs; report in source order.
        for n, err in sorted(errors, key=lambda x: (x[0], len(x[1].policy_id), x[1].policy_id, x[1].error)):
            m = re.fullmatch(r"policy(\d+)", err.policy_id)
            k = n + int(m.group(1)) if m else -1
            info = infos[k] if 0 <= k < len(infos) else None
            message = re.sub(r"^for policy `policy\d+`, ", "", err.error)
            arg = re.search(r"attribute `input\.[^`]*` in context for [\w:]+::\"([^\"]+)\" not found", message)
            if arg and arg.group(1) in untyped:
                continue  # nothing is known about this tool's arguments
            if severity == "warning" and re.match(
                r"unrecognized (action|entity type)|unable to find an applicable action", message
            ):
                continue  # unknown entities are errors already (_check_references), more precisely
            where = f"policy {info.key!r}" if info else "policies"
            suffix = "" if severity == "error" else " (against the schema generated from entities.toml)"
            file, line = (path, info.line) if info else (SCHEMA_FILE if v.schema == "file" else path, None)
            attr = re.search(r"attribute `(?:[^`]*\.)?([^`.]+)`", message)
            if info and attr:  # point at the attribute's use rather than the policy's first line
                line = line_of(texts[path], info, "." + attr.group(1)) or line
            v.findings.append(Finding(severity, file, line, f"{where}: {message}{suffix}"))


def _check_entities_schema(v: Validation, schema_text: str, texts: Mapping[str, str]) -> None:
    """The entities the engine builds (servers, and each agent with its roles) against the schema."""
    b = v.bundle
    assert b is not None
    ns = NAMESPACE
    entities = [e for e in json.loads(b.entities_json) if e["uid"]["type"] != f"{ns}::Action"]
    for a in b.agents.values():
        attrs = {**a.attrs, "id": a.name}
        attrs.setdefault("region", "")
        entities.append(
            {
                "uid": {"type": f"{ns}::Agent", "id": a.name},
                "attrs": attrs,
                "parents": [{"type": f"{ns}::Role", "id": r} for r in sorted(a.roles)],
            }
        )

    def conforms(items: list[Any]) -> bool:
        try:
            cedarpy.Entities.from_json_str(json.dumps(items), schema=schema_text)
        except ValueError:
            return False
        return True

    if not conforms(entities):
        for e in entities:
            if conforms([e]):
                continue
            etype, eid = e["uid"]["type"], e["uid"]["id"]
            kind = {"Agent": "agents", "Server": "servers", "Role": "roles"}.get(etype.split("::")[-1], "")
            header = f"[{kind}.{eid}]" if kind != "roles" else "[roles]"
            problems = [
                f"attribute {k!r} = {val!r}: {msg}"
                for k, val in e["attrs"].items()
                if (msg := _attribute_problem(schema_text, etype, k, val))
            ]
            detail = "; ".join(problems) or "a required attribute is missing, or its type or parents are not declared"
            v.error(
                "entities.toml",
                guess_line(texts.get("entities.toml", ""), header),
                f"{header}: {etype}::{json.dumps(eid)} does not conform to {SCHEMA_FILE}: {detail}",
            )
    # Every tool should have its action in the schema, or policies naming it cannot be validated.
    for s in b.servers.values():
        for t in s.tools:
            probe = f"permit (principal, action == {ns}::Action::{json.dumps(action_id(s.name, t))}, resource);"
            if any("unrecognized action" in e.error for e in cedarpy.validate_policies(probe, schema_text).errors):
                v.warn(
                    SCHEMA_FILE,
                    None,
                    f"declares no action {json.dumps(action_id(s.name, t))} for tool {t!r} of server {s.name!r}",
                )


def _attribute_problem(schema_text: str, etype: str, attr: str, value: Any) -> str | None:
    """Why an attribute value does not fit the schema, from the validator's verdict on a probe policy
    that uses the attribute as the value's type (cedarpy's entity check says only "does not conform")."""
    var = "principal" if etype.endswith("::Agent") else "resource"
    use = {bool: "|| true", int: "< 0"}.get(type(value), 'like "*"')
    probe = f"permit ({var} is {etype}, action, resource) when {{ {var}[{json.dumps(attr)}] {use} }};"
    for err in cedarpy.validate_policies(probe, schema_text).errors:
        if "applicable action" in err.error:
            continue
        m = re.search(r"expected (\S+) but saw (\S+)", err.error)
        if m:  # the probe expected the value's type; the schema declares the other one
            return f"the schema declares {m.group(2)}, the value is a {m.group(1)}"
        if "not found" in err.error:
            return f"the schema does not declare it on {etype}"
        return re.sub(r"^for policy `policy\d+`, ", "", err.error)
    return None
