"""`cloister policy validate`: each bad input is reported with its file and line, all at once."""

from __future__ import annotations

import json
from pathlib import Path

import cedarpy
import pytest

from cloister.policytools.cedarsrc import locate_parse_error, split_statements
from tests.policytools.conftest import cli, messages, validate

EXAMPLE_LIMITS = """
[[limits]]
id = "refund-bot-hourly-refunds"
kind = "spend"
per = "agent"
roles = ["refund-agent"]
tools = ["refunds___refund.create"]
cost = "argument:amount"
max = "10000"
window = "1h"
"""

SCHEMA = """namespace Cloister {
  entity Role;
  entity Agent in [Role] { "id": String, "region": String };
  entity Server { "name": String, "region": String, "category": String, "attestation": String,
                  "identity"?: String };
  action Mcp;
  action CallTool in [Mcp];
  type Sys = { "now": datetime };
  action "refunds___customer_lookup", "refunds___transaction_history", "refunds___refund.approve_above_threshold"
    in [CallTool] appliesTo { principal: [Agent], resource: [Server], context: { "input": {}, "system": Sys } };
  action "refunds___refund.create" in [CallTool] appliesTo {
    principal: [Agent], resource: [Server],
    context: { "input": { "amount": decimal, "customer"?: String }, "system": Sys }
  };
  action "research___web_search", "research___db_write" in [CallTool] appliesTo {
    principal: [Agent], resource: [Server], context: { "input": {}, "system": Sys } };
}
"""


def test_the_example_bundle_is_valid(bundle: Path) -> None:
    v = validate(bundle)
    assert v.ok and not v.findings, messages(v)
    s = v.summary()
    assert s["policies"] == {"policies/refunds.cedar": 4, "policies/research.cedar": 1}
    assert (s["agents"], s["roles"], s["servers"], s["tools"], s["limits"], s["mode"]) == (2, 3, 2, 6, 2, "enforce")
    assert s["schema"] == "generated from entities.toml"


def test_cli_valid_prints_a_summary_and_exits_0(bundle: Path) -> None:
    r = cli("validate", str(bundle))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "valid:" in r.stdout and "policies: 5 (policies/refunds.cedar: 4, policies/research.cedar: 1)" in r.stdout
    assert "agents 2, roles 3, servers 2, tools 6, limits 2, issuers 1" in r.stdout


def test_cli_lists_every_error_with_file_and_line_and_exits_1(bundle: Path) -> None:
    (bundle / "bundle.toml").write_text('[bundle]\nname = "x"\nmode = \n')
    (bundle / "policies" / "bad.cedar").write_text(
        '@id("a")\npermit (principal, action, resource)\nwhen { context.input.amount < };\n\n'
        '@id("b")\npermit (principal, action, resource) when { foo(1) };\n'
    )
    r = cli("validate", str(bundle), "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    found = {(f["file"], f["line"], f["column"]) for f in out["findings"] if f["severity"] == "error"}
    assert ("bundle.toml", 3, 8) in found
    assert ("policies/bad.cedar", 3, 31) in found  # the `}` after `<`
    assert ("policies/bad.cedar", 6, 45) in found  # `foo`
    assert out["valid"] is False
    text = cli("validate", str(bundle))
    assert text.returncode == 1 and "invalid:" in text.stdout
    assert "policies/bad.cedar:3:31: error: invalid Cedar: unexpected token `}`" in text.stdout


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    r = cli("validate", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not a directory" in r.stderr
    assert cli("validate").returncode == 2


def test_bad_toml_has_line_and_column(bundle: Path) -> None:
    v = validate(bundle, {"entities.toml": "[roles]\nrefund-agent = {}\n\n[agents.x\nroles = []\n"})
    assert [(f.file, f.line) for f in v.errors][:1] == [("entities.toml", 4)], messages(v)


def test_bad_setting_points_at_its_line(bundle: Path) -> None:
    v = validate(bundle, {"bundle.toml": '[bundle]\nname = "x"\n\nmode = "strict"\n'})
    assert messages(v) == ["bundle.toml:4: error: mode 'strict' must be 'enforce' or 'log-only'"]


def test_invalid_cedar_every_statement_is_located(bundle: Path) -> None:
    v = validate(
        bundle,
        {
            "policies/x.cedar": (
                "// a comment with a ; in it\n"
                '@id("one")\npermit (principal, action, resource)\n  when { context.input.amount < };\n'
                '@id("two")\npermit (principal == Cloister::Role, action, resource);\n'
                '@id("three")\n@id("again") permit (principal, action, resource);\n'
                '@id("four")\npermit (principal, action, resource) when { "unterminated };\n'
            )
        },
    )
    assert [(f.file, f.line) for f in v.errors] == [
        ("policies/x.cedar", 4),
        ("policies/x.cedar", 6),
        ("policies/x.cedar", 8),
        ("policies/x.cedar", 10),
    ], messages(v)
    assert "unexpected token `}`" in v.errors[0].message
    assert "duplicate annotation" in v.errors[2].message


def test_a_policy_without_id_is_an_error(bundle: Path) -> None:
    v = validate(
        bundle,
        {
            "policies/x.cedar": '\n\npermit (principal, action == Cloister::Action::"research___web_search",'
            " resource);\n"
        },
    )
    assert not v.ok
    assert messages(v) == [
        'policies/x.cedar:3: error: policy #0 has no @id("..."): decisions and the log would '
        "call it 'x.cedar#0', which changes when policies move"
    ]


def test_unknown_entities_in_policies(bundle: Path) -> None:
    v = validate(
        bundle,
        {
            "policies/x.cedar": (
                '@id("a")\npermit (\n  principal in Cloister::Role::"nobody",\n'
                '  action == Cloister::Action::"refunds___refund.delete",\n  resource == Cloister::Server::"payroll"\n);\n'
                '@id("b")\npermit (principal == AgentCore::User::"x", action, resource)\n'
                '  when { principal == Cloister::Agent::"ghost" };\n'
            )
        },
    )
    got = messages(v)
    assert (
        "policies/x.cedar:3: error: policy 'a': unknown role 'nobody' (entities.toml [roles] does not declare it)"
        in got
    )
    assert any(
        m.startswith(
            "policies/x.cedar:4: error: policy 'a': unknown tool 'refunds___refund.delete': server "
            "'refunds' has no tool 'refund.delete'"
        )
        for m in got
    ), got
    assert (
        "policies/x.cedar:5: error: policy 'a': unknown server 'payroll' (entities.toml has no [servers.payroll])"
        in got
    )
    assert any(m.startswith("policies/x.cedar:8: error: policy 'b': entity type AgentCore::User") for m in got), got
    assert "policies/x.cedar:9: error: policy 'b': unknown agent 'ghost' (entities.toml has no [agents.ghost])" in got
    # The generated schema does not repeat what the reference check already said.
    assert not [f for f in v.warnings if "unrecognized" in f.message], got


def test_generated_schema_catches_attribute_typos_as_warnings(bundle: Path) -> None:
    v = validate(
        bundle,
        {
            "policies/x.cedar": (
                '@id("typo")\nforbid (principal, action, resource)\nwhen { principal.regoin != resource.region };\n'
            )
        },
    )
    assert v.ok
    assert [(f.file, f.line) for f in v.warnings] == [("policies/x.cedar", 3)]
    assert "attribute `regoin` on entity type `Cloister::Agent` not found" in v.warnings[0].message
    assert "generated" in v.warnings[0].message
    # --strict turns warnings into failure.
    (bundle / "policies" / "x.cedar").write_text(
        '@id("typo")\nforbid (principal, action, resource)\nwhen { principal.regoin != resource.region };\n'
    )
    assert cli("validate", str(bundle)).returncode == 0
    strict = cli("validate", "--strict", str(bundle))
    assert strict.returncode == 1 and "1 warning(s) (--strict)" in strict.stdout


def test_generated_schema_types_arguments_from_input_schemas(bundle: Path) -> None:
    inputs = {
        "type": "object",
        "properties": {"amount": {"type": "number"}, "customer": {"type": "string"}},
        "required": ["amount"],
    }
    v = validate(
        bundle,
        {
            "inputs/refunds___refund.create.json": json.dumps(inputs),
            "policies/x.cedar": (
                '@id("x")\nforbid (principal, action == Cloister::Action::"refunds___refund.create", resource)\n'
                'when { context.input.amount > 5 ||\n context.input.custmer == "x" };\n'
                '@id("y")\nforbid (principal, action == Cloister::Action::"refunds___refund.create", resource)\n'
                'when { context.input.customer == "x" };\n'
            ),
        },
    )
    assert v.ok
    # (The validator's order of errors within a policy varies between runs.)
    assert sorted((f.line, f.message.split(" (against")[0]) for f in v.warnings) == [
        (1, "policy 'x': unexpected type: expected Long but saw decimal"),  # numbers are decimals
        (
            4,
            "policy 'x': attribute `input.custmer` in context for Cloister::Action::\"refunds___refund.create\" "
            "not found",
        ),
        (
            7,
            "policy 'y': unable to guarantee safety of access to optional attribute `input.customer` in context for "
            'Cloister::Action::"refunds___refund.create"',
        ),
    ], messages(v)
    # Untyped tools: nothing is said about their arguments.
    v2 = validate(
        bundle,
        {
            "policies/x.cedar": '@id("x")\nforbid (principal, action == '
            'Cloister::Action::"refunds___refund.create", resource) when { context.input.anything };\n'
        },
    )
    assert v2.ok and not v2.findings, messages(v2)


def test_schema_file_violations_are_errors_with_lines(bundle: Path) -> None:
    assert validate(bundle, {"schema.cedarschema": SCHEMA}).findings == []
    bad_policy = validate(
        bundle,
        {
            "schema.cedarschema": SCHEMA,
            "policies/x.cedar": (
                '@id("x")\nforbid (principal, action == Cloister::Action::"refunds___refund.create", resource)\n'
                'when { context.input.amount like "5*" };\n'
            ),
        },
    )
    assert [(f.file, f.line) for f in bad_policy.errors] == [("policies/x.cedar", 1)]
    assert "expected String but saw decimal" in bad_policy.errors[0].message
    # An entity that does not conform: the agent's region is a String, the schema says Long.
    bad_entity = validate(bundle, {"schema.cedarschema": SCHEMA.replace('"region": String }', '"region": Long }')})
    got = messages(bad_entity)
    assert (
        'entities.toml:9: error: [agents.refund-bot]: Cloister::Agent::"refund-bot" does not conform to '
        "schema.cedarschema: attribute 'region' = 'eu': the schema declares Long, the value is a String"
    ) in got
    # A schema that does not parse is located too.
    broken = validate(
        bundle, {"schema.cedarschema": "namespace Cloister {\n  entity Role;\n  entity Agent in [Role]\n}\n"}
    )
    assert [(f.file, f.line) for f in broken.errors] == [("schema.cedarschema", 4)], messages(broken)
    # A tool the schema does not declare is a warning (policies naming it cannot be validated).
    partial = validate(bundle, {"schema.cedarschema": SCHEMA.replace('"research___web_search", ', "")})
    assert any('declares no action "research___web_search"' in f.message for f in partial.warnings)


def test_limits_every_bad_limit_is_reported_with_its_line(bundle: Path) -> None:
    text = (
        EXAMPLE_LIMITS
        + """
[[limits]]
id = "negative"
kind = "spend"
cost = "price:1"
max = "-5"
window = "1h"

[[limits]]
id = "ghost"
kind = "rate"
agents = ["nobody"]
max = "5"
window = "1h"

[[limits]]
id = "absurd"
kind = "rate"
tools = ["refunds___refund.create"]
max = "1e20"
window = "1h"

[[limits]]
id = "forever"
kind = "rate"
max = "5"
window = "90d"

[[limits]]
id = "negative"
kind = "rate"
max = "1"
window = "1m"

[[limits]]
id = "unknown-tool"
kind = "rate"
tools = ["refunds___refund.delete"]
max = "1"
window = "1m"
"""
    )
    got = messages(validate(bundle, {"limits.toml": text}))
    assert got == [
        "limits.toml:16: error: limit 'negative': max: '-5' is negative or absurdly large",
        "limits.toml:22: error: limit 'ghost': unknown agent 'nobody'",
        "limits.toml:30: error: limit 'absurd': max: '1e20' is negative or absurdly large",
        "limits.toml:37: error: limit 'forever': window must be between 1s and 31d",
        "limits.toml:39: error: limit 'negative': id already used by the limit on line 12",
        "limits.toml:48: error: limit 'unknown-tool': unknown tool 'refunds___refund.delete'",
    ], got


def test_limit_warnings(bundle: Path) -> None:
    text = """
[[limits]]
id = "every-call-needs-amount"
kind = "spend"
cost = "argument:amount"
max = "10"
window = "1h"

[[limits]]
id = "nobody-has-it"
kind = "rate"
roles = ["refund-supervisor"]
max = "0"
window = "1h"
"""
    v = validate(bundle, {"limits.toml": text})
    assert v.ok
    got = messages(v)
    assert any(
        "limits.toml:3: warning: limit 'every-call-needs-amount' charges argument 'amount' but selects no tools" in m
        for m in got
    ), got
    assert (
        "limits.toml:10: warning: limit 'nobody-has-it' matches no registered agent (check its agents and roles)" in got
    )
    assert "limits.toml:10: warning: limit 'nobody-has-it' has max 0: it refuses every call it matches" in got


def test_unknown_role_on_an_agent_points_at_the_line(bundle: Path) -> None:
    entities = (bundle / "entities.toml").read_text().replace('roles = ["research-agent"]', 'roles = ["researcher"]')
    got = messages(validate(bundle, {"entities.toml": entities}))
    assert got == ["entities.toml:14: error: [agents.research-bot]: role 'researcher' is not declared under [roles]"]


def test_oversize_bundle(bundle: Path) -> None:
    v = validate(bundle, {"data/blob.txt": "x" * (9 << 20)})
    assert "<bundle>: error: bundle is" in messages(v)[0] and "the limit is 8388608" in messages(v)[0]
    assert any(f.file == "data/blob.txt" and "not used by the enclave" in f.message for f in v.warnings)


def test_missing_pieces(bundle: Path) -> None:
    assert messages(validate(bundle, {"issuers/cloister-dev.pem": None})) == [
        "issuers.toml:5: error: [issuers.cloister-dev]: key file 'issuers/cloister-dev.pem' is not in the bundle"
    ]
    assert messages(validate(bundle, {"policies/refunds.cedar": None, "policies/research.cedar": None})) == [
        "policies/: error: no .cedar files (a bundle without policies would deny everything)"
    ]
    assert messages(validate(bundle, {"bundle.toml": None})) == ["bundle.toml: error: missing (every bundle needs one)"]
    assert messages(validate(bundle, {"policies/x.cedar": ""})) == []  # an empty file is allowed


def test_not_utf8(bundle: Path) -> None:
    (bundle / "policies" / "bin.cedar").write_bytes(b"// ok\n\xff\xfe")
    r = cli("validate", str(bundle))
    assert r.returncode == 1 and "policies/bin.cedar:2: error: not UTF-8 (byte 6)" in r.stdout


# ---- the locator, on its own ----------------------------------------------------------------------


def _parse(text: str) -> None:
    cedarpy.policies_to_json_str(text)


@pytest.mark.parametrize(
    ("text", "line", "col"),
    [
        ("permit (principal, action, resource)\nwhen { 1 + };", 2, 12),
        ("permit (\n  principal,\n  action,\n  resource\n) when {\n  foo(1) };", 6, 3),
        ("permit (principal, action, resource)\nwhen { context.x.bar(1) };", 2, 18),
        ("permitt (principal, action, resource);", 1, 1),
        ("permit (principal, action, resource)", 1, 37),  # end of input
    ],
)
def test_locate_parse_error(text: str, line: int, col: int) -> None:
    with pytest.raises(ValueError, match=r".") as exc:
        _parse(text)
    loc = locate_parse_error(text, _parse, str(exc.value))
    assert (loc.line, loc.column) == (line, col)


def test_split_statements_keeps_comments_and_strings() -> None:
    text = (
        '// first\n// policy\n@id("a;b")\npermit (principal, action, resource)\n'
        'when { context.input.q == "x;y" };\n\n// unrelated\n\n@id("c") forbid (principal, action, resource);\n'
    )
    sts = split_statements(text)
    assert [(s.index, s.line, s.end_line) for s in sts] == [(0, 3, 5), (1, 9, 9)]
    assert sts[0].comment == "// first\n// policy" and sts[1].comment == ""
    assert sts[0].text.endswith('"x;y" };')


def test_the_shipped_example_bundle_is_valid(tmp_path: Path) -> None:
    import shutil

    from cloister.dev import state as devstate
    from tests.policytools.conftest import add_issuer_key

    dst = tmp_path / "example"
    copy = getattr(devstate, "copy_example_bundle", None)  # fills in placeholders, where the example has them
    if copy is not None:
        copy(dst)
    else:
        shutil.copytree(devstate.example_bundle_dir(), dst)
    add_issuer_key(dst)
    v = validate(dst)
    assert v.ok, messages(v)


def test_the_generated_schema_saved_as_the_bundle_schema_validates_it(bundle: Path) -> None:
    (bundle / "inputs").mkdir()
    (bundle / "inputs" / "refunds___refund.create.json").write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"amount": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["amount"],
            }
        )
    )
    r = cli("schema", str(bundle))
    assert r.returncode == 0, r.stderr
    cedarpy.Schema.from_str(r.stdout)
    assert '"input": {"amount": decimal, "tags"?: Set<String>}' in r.stdout
    (bundle / "schema.cedarschema").write_text(r.stdout)
    v = validate(bundle)
    assert v.ok and v.schema == "file" and not v.findings, messages(v)
    assert cli("schema", str(bundle / "nope")).returncode == 2


def test_the_generated_schema_declares_the_issuer_policies_can_read(bundle: Path) -> None:
    """context.issuer (issue 9, item 3): the issuer that authenticated a call, which the bundle
    binds to its agent. A policy that reads it validates against the generated schema."""
    (bundle / "inputs").mkdir()
    schema = {"type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}
    (bundle / "inputs" / "refunds___refund.create.json").write_text(json.dumps(schema))
    (bundle / "policies" / "issuer.cedar").write_text(
        '@id("dev-issuer-only")\nforbid (principal, action == Cloister::Action::"refunds___refund.create", '
        'resource) unless { context.issuer == "cloister-dev" };\n'
    )
    r = cli("schema", str(bundle))
    assert r.returncode == 0, r.stderr
    assert '"issuer": String' in r.stdout
    (bundle / "schema.cedarschema").write_text(r.stdout)
    v = validate(bundle)
    assert v.ok and v.schema == "file" and not v.findings, messages(v)
