"""What validation found, and where: findings with file and line, and the policies as written."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cloister.enclave.bundle import PolicyBundle
from cloister.policytools.cedarsrc import Statement

SCHEMA_FILE = "schema.cedarschema"
BUNDLE = "<bundle>"  # the file name of findings about the bundle as a whole


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
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "message": self.message,
        }


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
            "schema": {"file": SCHEMA_FILE, "generated": "generated from entities.toml", "none": "none"}[self.schema],
            "errors": len(self.errors),
            "warnings": len(self.warnings),
        }


def line_of(text: str, p: PolicyInfo, needle: str) -> int | None:
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
