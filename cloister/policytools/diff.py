"""`cloister policy diff`: what changes between two bundles, file by file and in meaning.

The semantic summary compares the bundles as the enclave parses them: policies by the id
decisions are logged with, entities, limits, issuers and settings. A side that does not
parse still gets its file diff; the summary then says why it is missing.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloister.enclave.bundle import BundleError, Limit, PolicyBundle, action_id, parse_bundle_files
from cloister.policytools.source import BundleSource


@dataclass
class BundleDiff:
    old: BundleSource
    new: BundleSource
    files: list[dict[str, Any]] = field(default_factory=list)  # path, status, diff
    semantic: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.files

    def as_json(self) -> dict[str, Any]:
        def side(s: BundleSource) -> dict[str, Any]:
            return {"path": s.path, "signed": s.signed, "version": s.version, "signer": s.signer, "sha256": s.sha256}

        return {
            "old": side(self.old),
            "new": side(self.new),
            "identical": self.identical,
            "semantic": self.semantic,
            "notes": self.notes,
            "files": self.files,
        }


def _text(data: bytes) -> list[str] | None:
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _file_diffs(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        status = "added" if a is None else "removed" if b is None else "changed"
        la, lb = _text(a or b""), _text(b or b"")
        if la is None or lb is None:
            text = (
                f"binary file {status}: sha256 {hashlib.sha256(a or b'').hexdigest()[:16]} -> "
                f"{hashlib.sha256(b or b'').hexdigest()[:16]}\n"
            )
        else:
            text = "".join(
                difflib.unified_diff(
                    la, lb, f"a/{path}" if a is not None else "/dev/null", f"b/{path}" if b is not None else "/dev/null"
                )
            )
            if text and not text.endswith("\n"):
                text += "\n\\ No newline at end of file\n"
        out.append({"path": path, "status": status, "diff": text})
    return out


def _added_removed_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[str]]:
    return {
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
        "changed": sorted(k for k in set(old) & set(new) if old[k] != new[k]),
    }


def _window(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def describe_limit(lim: Limit) -> dict[str, Any]:
    cost = {"call": "call", "argument": f"argument:{lim.cost[1]}", "price": f"price:{lim.cost[1]}", "x402": "x402"}[
        lim.cost[0]
    ]
    return {
        "kind": lim.kind,
        "per": lim.per,
        "max": str(lim.maximum),
        "window": _window(lim.window_s),
        "cost": cost,
        "agents": sorted(lim.agents),
        "roles": sorted(lim.roles),
        "servers": sorted(lim.servers),
        "tools": sorted(lim.tools),
    }


def _limit_changes(old: PolicyBundle, new: PolicyBundle) -> dict[str, Any]:
    a = {lim.id: describe_limit(lim) for lim in old.limits}
    b = {lim.id: describe_limit(lim) for lim in new.limits}
    arc = _added_removed_changed(a, b)
    changed = {lid: {k: [a[lid][k], b[lid][k]] for k in a[lid] if a[lid][k] != b[lid][k]} for lid in arc["changed"]}
    return {"added": {k: b[k] for k in arc["added"]}, "removed": {k: a[k] for k in arc["removed"]}, "changed": changed}


def _entity_view(b: PolicyBundle) -> dict[str, Any]:
    return {
        "agents": {a.name: {"roles": sorted(a.roles), **a.attrs} for a in b.agents.values()},
        "roles": dict.fromkeys(sorted(b.roles), True),
        "servers": {
            s.name: {**s.attrs, "identity": _plain(s.identity), "pins": dict(s.pins)} for s in b.servers.values()
        },
        "tools": {action_id(s.name, t): True for s in b.servers.values() for t in s.tools},
        "issuers": {
            i.issuer: {
                "audience": i.audience,
                "roles_claim": i.roles_claim,
                "max_lifetime_s": i.max_lifetime_s,
                "keys": len(i.keys),
            }
            for i in b.issuers.values()
        },
    }


def _plain(value: Any) -> Any:
    """A JSON-able view of a dataclass, mapping or value (bytes as hex), to compare and print."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value


def semantic_diff(old: PolicyBundle, new: PolicyBundle) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pol = _added_removed_changed(old.policies, new.policies)
    moved = {
        k: [old.policy_sources[k], new.policy_sources[k]]
        for k in set(old.policies) & set(new.policies)
        if old.policy_sources[k] != new.policy_sources[k]
    }
    out["policies"] = {**pol, "moved": dict(sorted(moved.items()))}
    ev_old, ev_new = _entity_view(old), _entity_view(new)
    for section in ("agents", "roles", "servers", "tools", "issuers"):
        out[section] = _added_removed_changed(ev_old[section], ev_new[section])
    out["limits"] = _limit_changes(old, new)
    so, sn = old.settings, new.settings
    out["settings"] = {
        k: [getattr(so, k), getattr(sn, k)]
        for k in ("name", "mode", "max_argument_bytes", "grant_ttl_s")
        if getattr(so, k) != getattr(sn, k)
    }
    return out


def diff_bundles(old: BundleSource, new: BundleSource) -> BundleDiff:
    d = BundleDiff(old=old, new=new, files=_file_diffs(old.files, new.files))
    if old.signed and new.signed and old.version is not None and new.version is not None and new.version <= old.version:
        d.notes.append(
            f"the new bundle's version {new.version} is not above {old.version}: an enclave running the "
            "old one would refuse it"
        )
    parsed: list[PolicyBundle] = []
    for label, src in (("old", old), ("new", new)):
        try:
            parsed.append(parse_bundle_files(src.files))
        except BundleError as exc:
            d.notes.append(f"the {label} bundle does not parse ({exc}); no semantic summary")
    if len(parsed) == 2:
        d.semantic = semantic_diff(parsed[0], parsed[1])
    return d


def render(d: BundleDiff) -> str:  # noqa: C901 (over the gate before it existed; split when next changed)
    lines = [f"old: {d.old.describe()}", f"new: {d.new.describe()}"]
    lines += [f"note: {n}" for n in d.notes]
    if d.identical:
        lines.append("identical: no file differs")
        return "\n".join(lines) + "\n"
    s = d.semantic
    if s:
        lines.append("")
        lines.append("summary:")
        if s["settings"]:
            for k, (a, b) in s["settings"].items():
                lines.append(
                    f"  {k}: {a} -> {b}"
                    + ("   (log-only decides and logs but does not block)" if k == "mode" and b == "log-only" else "")
                )
        p = s["policies"]
        for verb in ("added", "removed", "changed"):
            for pid in p[verb]:
                lines.append(f"  policy {verb}: {pid}")
        for pid, (a, b) in p["moved"].items():
            lines.append(f"  policy moved: {pid} ({a} -> {b})")
        for section, noun in (
            ("agents", "agent"),
            ("roles", "role"),
            ("servers", "server"),
            ("tools", "tool"),
            ("issuers", "issuer"),
        ):
            for verb in ("added", "removed", "changed"):
                for name in s[section][verb]:
                    lines.append(f"  {noun} {verb}: {name}")
        lim = s["limits"]
        for lid, spec in lim["added"].items():
            lines.append(f"  limit added: {lid} ({_limit_text(spec)})")
        for lid, spec in lim["removed"].items():
            lines.append(f"  limit removed: {lid} ({_limit_text(spec)})")
        for lid, changes in lim["changed"].items():
            text = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items())
            lines.append(f"  limit changed: {lid}: {text}")
        if lines[-1] == "summary:":
            lines.append("  no change in meaning (comments, formatting or unused files only)")
    for f in d.files:
        lines.append("")
        lines.append(f"--- {f['path']} ({f['status']})")
        lines.append(f["diff"].rstrip("\n"))
    return "\n".join(lines) + "\n"


def _limit_text(spec: Mapping[str, Any]) -> str:
    scope = ", ".join(f"{k} {','.join(spec[k])}" for k in ("agents", "roles", "servers", "tools") if spec[k])
    return f"{spec['kind']} max {spec['max']} per {spec['window']} per {spec['per']}, cost {spec['cost']}" + (
        f", {scope}" if scope else ""
    )


def _short(value: Any) -> str:
    return (
        ",".join(value)
        if isinstance(value, list) and value
        else "[]"
        if isinstance(value, list)
        else (json.dumps(value) if not isinstance(value, str) else value)
    )
