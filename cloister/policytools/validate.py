"""`cloister policy validate`: every problem in a bundle, each with its file and line.

The enclave's parser (`enclave.bundle.parse_bundle_files`) is the authority: a bundle it
refuses is invalid. It stops at the first problem, though, and names a file but rarely a
line, so validation first checks each file on its own (TOML syntax, each Cedar statement,
each limit), then runs the enclave's parser, then checks what the enclave does not:

- every policy has an `@id` (error: decisions, log entries and `policy diff` name policies by
  it, and the positional fallback id `<file>#<n>` changes whenever a policy moves);
- every entity a policy names exists (agents, roles, servers, tool actions);
- the policies type-check against `schema.cedarschema` (errors), or, when the bundle has none,
  against a schema generated from entities.toml (warnings: the generated schema is a guess);
- the entities conform to `schema.cedarschema`;
- limits that can never match, or that charge an argument of every tool (warnings).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import cedarpy

from cloister.policytools.cedarsrc import Statement, locate_parse_error, split_statements
from cloister.policytools.schema import INPUTS_DIR, generate_schema, input_schemas
from cloister.verify.bundle import pack_payload
from cloister.verify.errors import DecodeError
from enclave.bundle import (
    ACTION_GROUPS,
    NAMESPACE,
    TOOL_SEPARATOR,
    BundleError,
    PolicyBundle,
    action_id,
    parse_bundle_files,
)

TOML_FILES = ("bundle.toml", "entities.toml", "issuers.toml", "limits.toml")
SCHEMA_FILE = "schema.cedarschema"
BUNDLE = "<bundle>"  # the file name of findings about the bundle as a whole
_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)")
_ENTITY_TYPES = {f"{NAMESPACE}::{t}" for t in ("Agent", "Role", "Server", "Action")}


@dataclass(frozen=True)
class Finding:
    severity: Literal["error", "warning"]
    file: str
    line: int | None
    message: str
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}" + (f":{self.column}" if self.column else "")
        return f"{where}: {self.severity}: {self.message}"

    def as_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "file": self.file, "line": self.line, "column": self.column,
                "message": self.message}


@dataclass(frozen=True)
class PolicyInfo:
    """One policy: `key` is the id the enclave decides and logs with."""

    key: str
    file: str
    statement: Statement | None  # None when the source could not be matched to the parse
    est: Mapping[str, Any]
    has_id: bool

    @property
    def line(self) -> int | None:
        return self.statement.line if self.statement else None


@dataclass
class Validation:
    files: dict[str, bytes]
    findings: list[Finding] = field(default_factory=list)
    bundle: PolicyBundle | None = None
    policies: dict[str, PolicyInfo] = field(default_factory=dict)
    schema: Literal["file", "generated", "none"] = "none"

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, file: str, line: int | None, message: str, column: int | None = None) -> None:
        self.findings.append(Finding("error", file, line, message, column))

    def warn(self, file: str, line: int | None, message: str, column: int | None = None) -> None:
        self.findings.append(Finding("warning", file, line, message, column))

    def has_error_in(self, file: str) -> bool:
        return any(f.file == file and f.severity == "error" for f in self.findings)

    def summary(self) -> dict[str, Any]:
        b = self.bundle
        per_file: dict[str, int] = {}
        for p in self.policies.values():
            per_file[p.file] = per_file.get(p.file, 0) + 1
        return {
            "valid": self.ok,
            "name": b.settings.name if b else None,
            "mode": b.settings.mode if b else None,
            "policies": dict(sorted(per_file.items())),
            "agents": len(b.agents) if b else 0,
            "roles": len(b.roles) if b else 0,
            "servers": len(b.servers) if b else 0,
            "tools": sum(len(s.tools) for s in b.servers.values()) if b else 0,
            "limits": len(b.limits) if b else 0,
            "issuers": len(b.issuers) if b else 0,
            "schema": {"file": SCHEMA_FILE, "generated": "generated from entities.toml",
                       "none": "none"}[self.schema],
            "errors": len(self.errors),
            "warnings": len(self.warnings),
        }


def validate_files(files: Mapping[str, bytes]) -> Validation:
    """Check a bundle's files as the enclave will, and more. Never raises for bad content."""
    v = Validation(files=dict(files))
    texts = _decode(v)
    tomls = _check_toml(v, texts)
    statements = _check_cedar(v, texts)
    _check_schema_syntax(v, texts)
    _check_container(v)
    _check_limit_blocks(v, texts, tomls)
    try:
        v.bundle = parse_bundle_files(files)
    except BundleError as exc:
        file, _, rest = str(exc).partition(": ")
        file = file if file in files or file in TOML_FILES or file.startswith("policies/") else BUNDLE
        if not v.has_error_in(file) and not (file == "policies/" and any(
                f.file.startswith("policies/") for f in v.errors)):
            v.error(file, guess_line(texts.get(file, ""), rest), rest if file != BUNDLE else str(exc))
    if v.bundle is None:
        return v
    _collect_policies(v, texts, statements)
    _check_ids(v)
    _check_references(v, texts)
    _check_against_schema(v, texts)
    _check_limit_semantics(v, texts)
    _check_unused_files(v)
    return v


# ---- per file ------------------------------------------------------------------------------

def _decode(v: Validation) -> dict[str, str]:
    texts: dict[str, str] = {}
    for path, data in v.files.items():
        if not path.endswith((".toml", ".cedar", ".cedarschema", ".json")):
            continue
        try:
            texts[path] = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            v.error(path, line, f"not UTF-8 (byte {exc.start})")
    return texts


def _check_toml(v: Validation, texts: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in TOML_FILES:
        if name not in texts:
            continue
        try:
            out[name] = tomllib.loads(texts[name])
        except tomllib.TOMLDecodeError as exc:
            msg = str(exc)
            m = _TOML_POS.search(msg)
            if m:
                v.error(name, int(m.group(1)), _TOML_POS.sub("", msg), int(m.group(2)))
            else:  # "(at end of document)"
                v.error(name, texts[name].count("\n") + 1, msg)
    return out


def _cedar_parse(text: str) -> None:
    cedarpy.policies_to_json_str(text)


# cedarpy's parser and validator slow down more than linearly with the number of policies in one
# call (10,000 policies: 2 s to parse, 12 s to validate at once; 0.3 s and 1.7 s in chunks).
# Policies are parsed and validated independently, so chunks give the same answers.
CHUNK = 200


def _parse_in_chunks(statements: list[Statement]) -> list[Any] | None:
    """The EST of each statement, or None when some chunk does not parse as static policies."""
    out: list[Any] = []
    for i in range(0, len(statements), CHUNK):
        chunk = statements[i:i + CHUNK]
        try:
            est = json.loads(cedarpy.policies_to_json_str("\n".join(st.text for st in chunk)))
        except ValueError:
            return None
        parsed = list(est.get("staticPolicies", {}).values())
        if len(parsed) != len(chunk) or est.get("templates"):
            return None
        out.extend(parsed)
    return out


def _check_cedar(v: Validation, texts: Mapping[str, str]) -> dict[str, list[tuple[Statement, Any]]]:
    """Each policy file's statements with their parsed (EST) form; every syntax error located."""
    out: dict[str, list[tuple[Statement, Any]]] = {}
    for path in sorted(p for p in texts if p.startswith("policies/") and p.endswith(".cedar")):
        text = texts[path]
        statements = split_statements(text)
        parsed = _parse_in_chunks(statements)
        if parsed is not None:
            out[path] = list(zip(statements, parsed, strict=True))
            continue
        try:
            _cedar_parse(text)
            continue  # valid Cedar that the splitter did not cut as Cedar does: no source lines then
        except ValueError:
            pass
        # Find every statement that fails on its own, and where in it.
        found = False
        for st in statements:
            try:
                _cedar_parse(st.text)
            except ValueError as exc:
                found = True
                loc = locate_parse_error(st.text, _cedar_parse, str(exc))
                # `loc` is relative to the statement; shift it to the file.
                line = st.line + loc.line - 1
                col = loc.column + (st.start - (text.rfind("\n", 0, st.start) + 1) if loc.line == 1 else 0)
                v.error(path, line, f"invalid Cedar: {exc}", col)
        if not found:
            try:
                _cedar_parse(text)
            except ValueError as exc:
                loc = locate_parse_error(text, _cedar_parse, str(exc))
                v.error(path, loc.line, f"invalid Cedar: {exc}", loc.column)
    return out


def _schema_parse(text: str) -> None:
    cedarpy.Schema.from_str(text)


def _check_schema_syntax(v: Validation, texts: Mapping[str, str]) -> None:
    text = texts.get(SCHEMA_FILE)
    if text is None:
        return
    try:
        _schema_parse(text)
    except ValueError as exc:
        loc = locate_parse_error(text, _schema_parse, str(exc))
        v.error(SCHEMA_FILE, loc.line, f"invalid Cedar schema: {exc}", loc.column)


def _check_container(v: Validation) -> None:
    """What signing would refuse: file names, count and total size."""
    try:
        pack_payload(v.files, 1)
    except DecodeError as exc:
        v.error(BUNDLE, None, str(exc))


# ---- limits, one [[limits]] table at a time ----------------------------------------------------

_LIMIT_HEADER = re.compile(r"^\s*\[\[\s*limits\s*\]\]\s*(#.*)?$")


def _limit_blocks(text: str) -> list[tuple[int, str]]:
    """Each [[limits]] table's first line (1-based) and text."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _LIMIT_HEADER.match(line)]
    return [(s + 1, "".join(lines[s:e])) for s, e in zip(starts, [*starts[1:], len(lines)], strict=True)]


def _check_limit_blocks(v: Validation, texts: Mapping[str, str], tomls: Mapping[str, Any]) -> None:
    """Run the enclave's limit checks on each limit alone, so that every bad limit is reported."""
    from enclave.bundle import _entities, _limits  # the enclave's own checks, one limit at a time

    raw = tomls.get("limits.toml", {}).get("limits")
    if "limits.toml" not in tomls or not isinstance(raw, list) or "entities.toml" not in tomls:
        return
    try:
        roles, agents, servers = _entities(v.files)
    except BundleError:
        return  # reported for entities.toml by the full parse
    blocks = _limit_blocks(texts["limits.toml"])
    if len(blocks) != len(raw):
        return  # limits written in another TOML form: the full parse reports the first problem
    ids: dict[str, int] = {}
    for n, (first_line, block) in enumerate(blocks):
        table = raw[n]
        lid = table.get("id") if isinstance(table, dict) else None
        if isinstance(lid, str):
            if lid in ids:
                v.error("limits.toml", first_line, f"limit {lid!r}: id already used by the limit on line {ids[lid]}")
            ids.setdefault(lid, first_line)
        try:
            _limits({"limits.toml": block.encode()}, roles, agents, servers)
        except BundleError as exc:
            msg = str(exc).removeprefix("limits.toml: ").replace("limit #1", f"limit #{n + 1}")
            v.error("limits.toml", _limit_key_line(block, first_line, msg), msg)


def _limit_key_line(block: str, first_line: int, message: str) -> int:
    """The line of the key a limit error is about ("limit 'x': max ..." is about `max = ...`)."""
    m = re.match(r"limit (?:'[^']*'|#\d+): (?:unknown )?(\w+)", message)
    if m:
        key = m.group(1)
        for candidate in (key, key + "s"):  # "unknown agent" is about `agents = [...]`
            for i, line in enumerate(block.splitlines()):
                if re.match(rf"\s*{re.escape(candidate)}\s*=", line):
                    return first_line + i
    return first_line


# ---- with the parsed bundle ----------------------------------------------------------------------

def _collect_policies(v: Validation, texts: Mapping[str, str],
                      statements: Mapping[str, list[tuple[Statement, Any]]]) -> None:
    """The policies as the enclave names them, each with its source statement."""
    assert v.bundle is not None
    for path in sorted(p for p in texts if p.startswith("policies/") and p.endswith(".cedar")):
        pairs = statements.get(path)
        if pairs is None:  # the statements could not be matched: use the parse alone
            est = json.loads(cedarpy.policies_to_json_str(texts[path]))
            pairs_or_none: list[tuple[Statement | None, Any]] = [
                (None, p) for p in est.get("staticPolicies", {}).values()]
        else:
            pairs_or_none = list(pairs)
        for n, (st, policy) in enumerate(pairs_or_none):
            annotated = policy.get("annotations", {}).get("id")
            key = annotated if annotated else f"{path.removeprefix('policies/')}#{n}"
            v.policies[key] = PolicyInfo(key=key, file=path, statement=st, est=policy, has_id=bool(annotated))


def _check_ids(v: Validation) -> None:
    for p in v.policies.values():
        if not p.has_id:
            v.error(p.file, p.line, f"policy #{p.statement.index if p.statement else '?'} has no @id(\"...\"): "
                    f"decisions and the log would call it {p.key!r}, which changes when policies move")


def entity_refs(node: Any) -> Iterator[tuple[str, str | None]]:
    """Every (entity type, id) a policy's EST names; id None for `is` type tests."""
    if isinstance(node, Mapping):
        if isinstance(node.get("type"), str) and isinstance(node.get("id"), str):
            yield node["type"], node["id"]
            return
        if isinstance(node.get("entity_type"), str):
            yield node["entity_type"], None
        for value in node.values():
            yield from entity_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from entity_refs(value)


def _check_references(v: Validation, texts: Mapping[str, str]) -> None:
    b = v.bundle
    assert b is not None
    known_actions = {action_id(s.name, t) for s in b.servers.values() for t in s.tools} | set(ACTION_GROUPS)
    for p in v.policies.values():
        reported: set[tuple[str, str | None]] = set()
        for etype, eid in entity_refs({k: p.est.get(k) for k in ("principal", "action", "resource", "conditions")}):
            if (etype, eid) in reported:
                continue
            reported.add((etype, eid))
            problem = _reference_problem(b, known_actions, etype, eid)
            if problem:
                v.error(p.file, _line_of(texts.get(p.file, ""), p, eid or etype), f"policy {p.key!r}: {problem}")


def _reference_problem(b: PolicyBundle, known_actions: set[str], etype: str, eid: str | None) -> str | None:
    ns = NAMESPACE
    if etype not in _ENTITY_TYPES:
        return (f"entity type {etype} is not in Cloister's model ({', '.join(sorted(_ENTITY_TYPES))}); "
                "nothing of that type is ever evaluated")
    if eid is None:
        return None
    if etype == f"{ns}::Agent" and eid not in b.agents:
        return f"unknown agent {eid!r} (entities.toml has no [agents.{eid}])"
    if etype == f"{ns}::Role" and eid not in b.roles:
        return f"unknown role {eid!r} (entities.toml [roles] does not declare it)"
    if etype == f"{ns}::Server" and eid not in b.servers:
        return f"unknown server {eid!r} (entities.toml has no [servers.{eid}])"
    if etype == f"{ns}::Action" and eid not in known_actions:
        server, sep, tool = eid.partition(TOOL_SEPARATOR)
        if not sep:
            return (f"unknown action {eid!r}: actions are tools, named '<server>{TOOL_SEPARATOR}<tool>', "
                    f"or the groups {', '.join(ACTION_GROUPS)}")
        if server not in b.servers:
            return f"unknown tool {eid!r}: entities.toml has no server {server!r}"
        tools = ", ".join(b.servers[server].tools) or "none"
        return f"unknown tool {eid!r}: server {server!r} has no tool {tool!r} in entities.toml (its tools: {tools})"
    return None


def _line_of(text: str, p: PolicyInfo, needle: str) -> int | None:
    """The line of `needle` (quoted, as written in Cedar) inside policy `p`, else the policy's line."""
    if p.statement is None:
        return None
    at = text.find(json.dumps(needle), p.statement.start, p.statement.end)
    if at < 0 and needle.startswith("."):
        m = re.compile(re.escape(needle) + r"\b").search(text, p.statement.start, p.statement.end)
        at = m.start() if m else -1
    if at < 0:
        at = text.find(needle, p.statement.start, p.statement.end)
    return p.statement.line + text.count("\n", p.statement.start, at) if at >= 0 else p.line


def _check_against_schema(v: Validation, texts: Mapping[str, str]) -> None:
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
            chunks = [(n, "\n".join(i.statement.text for i in infos[n:n + CHUNK] if i.statement))
                      for n in range(0, len(infos), CHUNK)]
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
                    r"unrecognized (action|entity type)|unable to find an applicable action", message):
                continue  # unknown entities are errors already (_check_references), more precisely
            where = f"policy {info.key!r}" if info else "policies"
            suffix = "" if severity == "error" else " (against the schema generated from entities.toml)"
            file, line = (path, info.line) if info else (SCHEMA_FILE if v.schema == "file" else path, None)
            attr = re.search(r"attribute `(?:[^`]*\.)?([^`.]+)`", message)
            if info and attr:  # point at the attribute's use rather than the policy's first line
                line = _line_of(texts[path], info, "." + attr.group(1)) or line
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
        entities.append({"uid": {"type": f"{ns}::Agent", "id": a.name}, "attrs": attrs,
                         "parents": [{"type": f"{ns}::Role", "id": r} for r in sorted(a.roles)]})

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
            problems = [f"attribute {k!r} = {val!r}: {msg}" for k, val in e["attrs"].items()
                        if (msg := _attribute_problem(schema_text, etype, k, val))]
            detail = "; ".join(problems) or "a required attribute is missing, or its type or parents are not declared"
            v.error("entities.toml", guess_line(texts.get("entities.toml", ""), header),
                    f"{header}: {etype}::{json.dumps(eid)} does not conform to {SCHEMA_FILE}: {detail}")
    # Every tool should have its action in the schema, or policies naming it cannot be validated.
    for s in b.servers.values():
        for t in s.tools:
            probe = f'permit (principal, action == {ns}::Action::{json.dumps(action_id(s.name, t))}, resource);'
            if any("unrecognized action" in e.error for e in cedarpy.validate_policies(probe, schema_text).errors):
                v.warn(SCHEMA_FILE, None, f"declares no action {json.dumps(action_id(s.name, t))} for tool "
                       f"{t!r} of server {s.name!r}")


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


def _check_limit_semantics(v: Validation, texts: Mapping[str, str]) -> None:
    b = v.bundle
    assert b is not None
    text = texts.get("limits.toml", "")
    for lim in b.limits:
        line = guess_line(text, f"id = '{lim.id}'")
        reaches = [a for a in b.agents.values()
                   if (not lim.agents or a.name in lim.agents) and (not lim.roles or a.roles & lim.roles)]
        if not reaches:
            v.warn("limits.toml", line, f"limit {lim.id!r} matches no registered agent (check its agents and roles)")
        if lim.kind == "rate" and lim.maximum == 0:
            v.warn("limits.toml", line, f"limit {lim.id!r} has max 0: it refuses every call it matches")
        if lim.cost[0] == "argument" and not lim.tools and not lim.servers:
            v.warn("limits.toml", line, f"limit {lim.id!r} charges argument {lim.cost[1]!r} but selects no tools "
                   f"or servers: every call it matches without a numeric {lim.cost[1]!r} argument is refused")


def _check_unused_files(v: Validation) -> None:
    b = v.bundle
    assert b is not None
    from enclave.bundle import _toml

    used = {*TOML_FILES, SCHEMA_FILE}
    issuers = _toml(v.files, "issuers.toml", required=False).get("issuers", {})
    for t in issuers.values() if isinstance(issuers, dict) else ():
        for entry in t.get("keys", []) if isinstance(t, dict) else ():
            name = entry.get("file") if isinstance(entry, dict) else entry
            if isinstance(name, str):
                used.add(name)
    for path in sorted(v.files):
        if path in used or (path.startswith("policies/") and path.endswith(".cedar")) or (
                path.startswith(INPUTS_DIR) and path.endswith(".json")):
            continue
        v.warn(path, None, "not used by the enclave (it is still signed and shipped with the bundle)")


def guess_line(text: str, message: str) -> int | None:
    """The line a message about a TOML file points at: a `[table]` it names, then a value it quotes."""
    if not text:
        return None
    lines = text.splitlines()
    start = 0
    table = re.search(r"\[([A-Za-z0-9_.:@\"' -]+)\]", message)
    if table:
        parts = [p.strip("\"'") for p in table.group(1).split(".")]
        pattern = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(f"[\"']?{re.escape(p)}[\"']?" for p in parts) + r"\s*\]")
        for i, line in enumerate(lines):
            if pattern.match(line):
                start = i
                break
        else:
            table = None
    for value in re.findall(r"'([^']+)'", message):
        for i in range(start, len(lines)):
            if f'"{value}"' in lines[i] or f"'{value}'" in lines[i]:
                return i + 1
    if table:
        return start + 1
    m = re.match(r"(\w+)[ :]", message)  # "mode 'x' must be ..." is about `mode = ...`
    if m:
        for i, line in enumerate(lines):
            if re.match(rf"\s*{re.escape(m.group(1))}\s*=", line):
                return i + 1
    return None
