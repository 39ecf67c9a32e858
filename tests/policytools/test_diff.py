"""`cloister policy diff`: versions, a summary of what changes in meaning, and per-file diffs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.enclave.bundle import read_bundle_dir
from cloister.policytools.diff import diff_bundles, render
from cloister.policytools.source import load_source
from tests.policytools.conftest import cli, sign_local


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def _changed_copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    _edit(dst / "bundle.toml", 'mode = "enforce"', 'mode = "log-only"')
    _edit(dst / "limits.toml", 'max = "10000"\nwindow = "1h"', 'max = "5000"\nwindow = "30m"')
    (dst / "limits.toml").write_text(
        (dst / "limits.toml").read_text()
        + (
            '\n[[limits]]\nid = "research-searches"\nkind = "rate"\nper = "tool"\n'
            'tools = ["research___web_search"]\nmax = "100"\nwindow = "1h"\n'
        )
    )
    _edit(dst / "policies" / "refunds.cedar", 'decimal("5000.0")', 'decimal("2500.0")')
    (dst / "policies" / "research.cedar").unlink()
    (dst / "policies" / "research2.cedar").write_text(
        '@id("research-agent-search")\npermit (\n  principal in Cloister::Role::"research-agent",\n'
        '  action == Cloister::Action::"research___web_search",\n  resource == Cloister::Server::"research"\n);\n'
        '@id("eu-only")\nforbid (principal, action, resource) unless { principal.region == resource.region };\n'
    )
    _edit(dst / "entities.toml", "[agents.research-bot]", "[agents.audit-bot]\nroles = []\n\n[agents.research-bot]")
    _edit(dst / "entities.toml", 'tools = ["web_search", "db_write"]', 'tools = ["web_search", "db_write", "fetch"]')
    return dst


def test_semantic_summary(bundle: Path, tmp_path: Path) -> None:
    new = _changed_copy(bundle, tmp_path / "new")
    d = diff_bundles(load_source(bundle), load_source(new))
    s = d.semantic
    assert s["settings"] == {"mode": ["enforce", "log-only"]}
    assert s["policies"] == {
        "added": ["eu-only"],
        "removed": [],
        "changed": ["refund-single-cap"],
        "moved": {"research-agent-search": ["policies/research.cedar", "policies/research2.cedar"]},
    }
    assert s["agents"] == {"added": ["audit-bot"], "removed": [], "changed": []}
    assert s["tools"] == {"added": ["research___fetch"], "removed": [], "changed": []}
    assert s["servers"]["changed"] == []  # tools are reported as tools
    assert s["limits"]["changed"] == {"refund-bot-hourly-refunds": {"max": ["10000", "5000"], "window": ["1h", "30m"]}}
    assert list(s["limits"]["added"]) == ["research-searches"]
    text = render(d)
    for line in (
        "  mode: enforce -> log-only   (log-only decides and logs but does not block)",
        "  policy added: eu-only",
        "  policy changed: refund-single-cap",
        "  policy moved: research-agent-search (policies/research.cedar -> policies/research2.cedar)",
        "  agent added: audit-bot",
        "  tool added: research___fetch",
        "  limit changed: refund-bot-hourly-refunds: max 10000 -> 5000, window 1h -> 30m",
        "  limit added: research-searches (rate max 100 per 1h per tool, cost call, tools research___web_search)",
        "--- policies/research.cedar (removed)",
        "--- policies/research2.cedar (added)",
        '-when { context.input.amount.greaterThan(decimal("5000.0")) };',
        '+when { context.input.amount.greaterThan(decimal("2500.0")) };',
    ):
        assert line in text.splitlines(), (line, text)


def test_cli_signed_against_directory_and_json(bundle: Path, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    old = tmp_path / "v4.bundle"
    old.write_bytes(sign_local(read_bundle_dir(bundle), 4, key))
    new = _changed_copy(bundle, tmp_path / "new")
    r = cli("diff", str(old), str(new))
    assert r.returncode == 1, r.stderr
    first = r.stdout.splitlines()[:2]
    assert first[0].startswith(f"old: {old} (version 4, signed by key ") and "sha256 " in first[0]
    assert first[1] == f"new: {new} (directory, unsigned)"
    j = cli("diff", "--json", str(old), str(new))
    out = json.loads(j.stdout)
    assert out["old"]["version"] == 4 and out["new"]["signed"] is False and out["identical"] is False
    assert {f["path"]: f["status"] for f in out["files"]}["policies/research2.cedar"] == "added"
    # The same content, signed or not, is identical.
    same = cli("diff", str(old), str(bundle))
    assert same.returncode == 0 and "identical: no file differs" in same.stdout


def test_versions_that_would_be_refused_are_noted(bundle: Path, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    files = read_bundle_dir(bundle)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(sign_local(files, 5, key))
    b.write_bytes(sign_local({**files, "policies/x.cedar": b'@id("x") forbid (principal, action, resource);'}, 5, key))
    r = cli("diff", str(a), str(b))
    assert r.returncode == 1
    assert "note: the new bundle's version 5 is not above 5: an enclave running the old one would refuse it" in r.stdout
    assert "  policy added: x" in r.stdout


def test_comment_only_change_and_unparseable_side(bundle: Path, tmp_path: Path) -> None:
    new = tmp_path / "new"
    shutil.copytree(bundle, new)
    (new / "policies" / "refunds.cedar").write_text("// reworded\n" + (new / "policies" / "refunds.cedar").read_text())
    text = render(diff_bundles(load_source(bundle), load_source(new)))
    assert "  no change in meaning (comments, formatting or unused files only)" in text
    (new / "entities.toml").write_text("[roles\n")
    d = diff_bundles(load_source(bundle), load_source(new))
    assert not d.semantic and any(n.startswith("the new bundle does not parse (entities.toml:") for n in d.notes)
    assert "--- entities.toml (changed)" in render(d)


def test_cli_input_errors(bundle: Path, tmp_path: Path) -> None:
    missing = cli("diff", str(bundle), str(tmp_path / "missing"))
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
    (tmp_path / "junk").write_bytes(b"junk")
    junk = cli("diff", str(tmp_path / "junk"), str(bundle))
    assert junk.returncode == 2 and "not a signed bundle" in junk.stderr
