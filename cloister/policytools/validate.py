"""`cloister policy validate`: every problem in a bundle, each with its file and line.

The enclave's parser (`cloister.enclave.bundle.parse_bundle_files`) is the authority: a bundle it
refuses is invalid. It stops at the first problem, though, and names a file but rarely a
line, so validation first checks each file on its own (TOML syntax, each Cedar statement,
each limit, each server and tool name), then runs the enclave's parser, then checks what the
enclave does not:

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
from typing import Any

import cedarpy

from cloister.enclave.bundle import (
    ACTION_GROUPS,
    MCP_ACTIONS,
    NAMESPACE,
    BundleError,
    PolicyBundle,
    action_id,
    parse_bundle_files,
    server_name_problem,
    tool_name_problem,
)
from cloister.policytools.cedarsrc import Statement, locate_parse_error, split_statements
from cloister.policytools.findings import BUNDLE, SCHEMA_FILE, Finding, PolicyInfo, Validation, guess_line, line_of
from cloister.policytools.schema import INPUTS_DIR
from cloister.policytools.schemacheck import CHUNK, check_against_schema
from cloister.verify.bundle import MAX_NOT_AFTER, MAX_ORIGIN_CHARS, pack_payload
from cloister.verify.errors import DecodeError
from cloister.wire.contract import TOOL_SEPARATOR

__all__ = ["BUNDLE", "SCHEMA_FILE", "Finding", "PolicyInfo", "Validation", "entity_refs", "validate_files"]

TOML_FILES = ("bundle.toml", "entities.toml", "issuers.toml", "limits.toml")
_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)")
_ENTITY_TYPES = {f"{NAMESPACE}::{t}" for t in ("Agent", "Role", "Server", "Action")}


def validate_files(files: Mapping[str, bytes]) -> Validation:
    """Check a bundle's files as the enclave will, and more. Never raises for bad content."""
    v = Validation(files=dict(files))
    texts = _decode(v)
    tomls = _check_toml(v, texts)
    statements = _check_cedar(v, texts)
    _check_schema_syntax(v, texts)
    _check_container(v)
    _check_names(v, texts, tomls)
    _check_limit_blocks(v, texts, tomls)
    try:
        # The enclave's own reference and schema checks stop at the first problem; ours below
        # report each with its line.
        v.bundle = parse_bundle_files(files, check_references=False)
    except BundleError as exc:
        file, _, rest = str(exc).partition(": ")
        file = file if file in files or file in TOML_FILES or file.startswith("policies/") else BUNDLE
        if not v.has_error_in(file) and not (
            file == "policies/" and any(f.file.startswith("policies/") for f in v.errors)
        ):
            v.error(file, guess_line(texts.get(file, ""), rest), rest if file != BUNDLE else str(exc))
    if v.bundle is None:
        return v
    _collect_policies(v, texts, statements)
    _check_ids(v)
    _check_references(v, texts)
    check_against_schema(v, texts)
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


def _parse_in_chunks(statements: list[Statement]) -> list[Any] | None:
    """The EST of each statement, or None when some chunk does not parse as static policies."""
    out: list[Any] = []
    for i in range(0, len(statements), CHUNK):
        chunk = statements[i : i + CHUNK]
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
        pack_payload(v.files, 1, origin="o" * MAX_ORIGIN_CHARS, not_after=MAX_NOT_AFTER)
    except DecodeError as exc:
        v.error(BUNDLE, None, str(exc))


# ---- server and tool names: the enclave's rule, every name with its line -------------------------


def _check_names(v: Validation, texts: Mapping[str, str], tomls: Mapping[str, Any]) -> None:
    """Every server and tool name the enclave would refuse (`server_name_problem`,
    `tool_name_problem`: action ids `<server>___<tool>` must name one pair each)."""
    servers = tomls.get("entities.toml", {}).get("servers")
    if not isinstance(servers, dict):
        return
    text = texts.get("entities.toml", "")
    for name, table in servers.items():
        server_line = _server_line(text, name)
        problem = server_name_problem(name)
        if problem is not None:
            v.error("entities.toml", server_line, f"[servers.{name}]: {problem}")
        tools = table.get("tools") if isinstance(table, dict) else None
        for tool in tools if isinstance(tools, list) else ():
            problem = tool_name_problem(tool)
            if problem is not None:
                v.error("entities.toml", _value_line(text, server_line, tool), f"[servers.{name}]: {problem}")


def _server_line(text: str, name: str) -> int | None:
    """The line of `[servers.<name>]` (bare or quoted), or of `<name> = ...` under `[servers]`."""
    quoted = (re.escape(name), re.escape(json.dumps(name)), re.escape(f"'{name}'"))
    header = re.compile(r"^\s*\[\s*servers\s*\.\s*(?:" + "|".join(quoted) + r")\s*\]")
    key = re.compile(r"^\s*(?:" + "|".join(quoted) + r")\s*=")
    lines = text.splitlines()
    for pattern in (header, key):
        for i, line in enumerate(lines):
            if pattern.match(line):
                return i + 1
    return None


def _value_line(text: str, start: int | None, value: object) -> int | None:
    """The first line from `start` on that quotes `value`, else `start`."""
    if not isinstance(value, str) or start is None:
        return start
    lines = text.splitlines()
    for i in range(start - 1, len(lines)):
        if any(q in lines[i] for q in (json.dumps(value), f'"{value}"', f"'{value}'")):
            return i + 1
    return start


# ---- limits, one [[limits]] table at a time ----------------------------------------------------

_LIMIT_HEADER = re.compile(r"^\s*\[\[\s*limits\s*\]\]\s*(#.*)?$")


def _limit_blocks(text: str) -> list[tuple[int, str]]:
    """Each [[limits]] table's first line (1-based) and text."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _LIMIT_HEADER.match(line)]
    return [(s + 1, "".join(lines[s:e])) for s, e in zip(starts, [*starts[1:], len(lines)], strict=True)]


def _check_limit_blocks(v: Validation, texts: Mapping[str, str], tomls: Mapping[str, Any]) -> None:
    """Run the enclave's limit checks on each limit alone, so that every bad limit is reported."""
    from cloister.enclave.bundle import parse_entities, parse_limits  # the enclave's own checks, one at a time

    raw = tomls.get("limits.toml", {}).get("limits")
    if "limits.toml" not in tomls or not isinstance(raw, list) or "entities.toml" not in tomls:
        return
    try:
        roles, agents, servers = parse_entities(v.files)
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
            parse_limits({"limits.toml": block.encode()}, roles, agents, servers)
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


def _collect_policies(
    v: Validation, texts: Mapping[str, str], statements: Mapping[str, list[tuple[Statement, Any]]]
) -> None:
    """The policies as the enclave names them, each with its source statement."""
    assert v.bundle is not None
    for path in sorted(p for p in texts if p.startswith("policies/") and p.endswith(".cedar")):
        pairs = statements.get(path)
        if pairs is None:  # the statements could not be matched: use the parse alone
            est = json.loads(cedarpy.policies_to_json_str(texts[path]))
            pairs_or_none: list[tuple[Statement | None, Any]] = [
                (None, p) for p in est.get("staticPolicies", {}).values()
            ]
        else:
            pairs_or_none = list(pairs)
        for n, (st, policy) in enumerate(pairs_or_none):
            annotated = policy.get("annotations", {}).get("id")
            key = annotated if annotated else f"{path.removeprefix('policies/')}#{n}"
            v.policies[key] = PolicyInfo(key=key, file=path, statement=st, est=policy, has_id=bool(annotated))


def _check_ids(v: Validation) -> None:
    for p in v.policies.values():
        if not p.has_id:
            v.error(
                p.file,
                p.line,
                f'policy #{p.statement.index if p.statement else "?"} has no @id("..."): '
                f"decisions and the log would call it {p.key!r}, which changes when policies move",
            )


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
    known_actions = (
        {action_id(s.name, t) for s in b.servers.values() for t in s.tools}
        | set(ACTION_GROUPS)
        | set(MCP_ACTIONS.values())
    )
    for p in v.policies.values():
        reported: set[tuple[str, str | None]] = set()
        for etype, eid in entity_refs({k: p.est.get(k) for k in ("principal", "action", "resource", "conditions")}):
            if (etype, eid) in reported:
                continue
            reported.add((etype, eid))
            problem = _reference_problem(b, known_actions, etype, eid)
            if problem:
                v.error(p.file, line_of(texts.get(p.file, ""), p, eid or etype), f"policy {p.key!r}: {problem}")


def _reference_problem(b: PolicyBundle, known_actions: set[str], etype: str, eid: str | None) -> str | None:
    ns = NAMESPACE
    if etype not in _ENTITY_TYPES:
        return (
            f"entity type {etype} is not in Cloister's model ({', '.join(sorted(_ENTITY_TYPES))}); "
            "nothing of that type is ever evaluated"
        )
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
            return (
                f"unknown action {eid!r}: actions are tools, named '<server>{TOOL_SEPARATOR}<tool>', "
                f"the groups {', '.join(ACTION_GROUPS)}, or {', '.join(MCP_ACTIONS.values())}"
            )
        if server not in b.servers:
            return f"unknown tool {eid!r}: entities.toml has no server {server!r}"
        tools = ", ".join(b.servers[server].tools) or "none"
        return f"unknown tool {eid!r}: server {server!r} has no tool {tool!r} in entities.toml (its tools: {tools})"
    return None


def _check_limit_semantics(v: Validation, texts: Mapping[str, str]) -> None:
    b = v.bundle
    assert b is not None
    text = texts.get("limits.toml", "")
    for lim in b.limits:
        line = guess_line(text, f"id = '{lim.id}'")
        reaches = [
            a
            for a in b.agents.values()
            if (not lim.agents or a.name in lim.agents) and (not lim.roles or a.roles & lim.roles)
        ]
        if not reaches:
            v.warn("limits.toml", line, f"limit {lim.id!r} matches no registered agent (check its agents and roles)")
        if lim.kind == "rate" and lim.maximum == 0:
            v.warn("limits.toml", line, f"limit {lim.id!r} has max 0: it refuses every call it matches")
        if lim.cost[0] == "argument" and not lim.tools and not lim.servers:
            v.warn(
                "limits.toml",
                line,
                f"limit {lim.id!r} charges argument {lim.cost[1]!r} but selects no tools "
                f"or servers: every call it matches without a numeric {lim.cost[1]!r} argument is refused",
            )


def _check_unused_files(v: Validation) -> None:
    b = v.bundle
    assert b is not None
    from cloister.enclave.bundle import read_toml

    used = {*TOML_FILES, SCHEMA_FILE}
    issuers = read_toml(v.files, "issuers.toml", required=False).get("issuers", {})
    for t in issuers.values() if isinstance(issuers, dict) else ():
        for entry in t.get("keys", []) if isinstance(t, dict) else ():
            name = entry.get("file") if isinstance(entry, dict) else entry
            if isinstance(name, str):
                used.add(name)
    for path in sorted(v.files):
        if (
            path in used
            or (path.startswith("policies/") and path.endswith(".cedar"))
            or (path.startswith(INPUTS_DIR) and path.endswith(".json"))
        ):
            continue
        v.warn(path, None, "not used by the enclave (it is still signed and shipped with the bundle)")
