"""`cloister policy validate` refuses server and tool names whose action ids could collide,
with the enclave's own rule, each name at its line (issue 9 item 4; decision 0012)."""

from __future__ import annotations

from pathlib import Path

from tests.policytools.conftest import cli, messages, validate

COLLIDING = """
[servers.pay_]
tools = ["wire"]

[servers.pay]
tools = [
  "lookup",
  "_wire",
]
"""


def test_colliding_server_and_tool_names_are_refused(bundle: Path) -> None:
    # 'pay_' + '___' + 'wire' and 'pay' + '___' + '_wire' are the same Cedar action, 'pay____wire':
    # a permit written for one would let agents call the other.
    text = (bundle / "entities.toml").read_text()
    first = text.count("\n") + 2  # the line of [servers.pay_]
    v = validate(bundle, {"entities.toml": text + COLLIDING})
    got = [m for m in messages(v) if m.startswith("entities.toml")]
    assert got == [
        f"entities.toml:{first}: error: [servers.pay_]: server name 'pay_' ends with '_': its action ids "
        "'pay____<tool>' would read as server 'pay' with a tool starting with '_'",
        f"entities.toml:{first + 6}: error: [servers.pay]: tool name '_wire' starts with '_': its action id "
        "'<server>____wire' would read as a server ending with '_'",
    ], messages(v)
    assert not v.ok
    r = cli("validate", str(bundle))  # the file on disk is unchanged: still valid
    assert r.returncode == 0, r.stdout


def test_every_name_outside_the_safe_set_is_reported_at_its_line(bundle: Path) -> None:
    entities = (bundle / "entities.toml").read_text() + (
        '\n[servers."a___b"]\ntools = ["ok"]\n'
        '\n[servers."pay:eu"]\ntools = ["ok"]\n'
        '\n[servers.fine]\ntools = ["x___y", "has space", "' + "t" * 129 + '", "é"]\n'
    )
    v = validate(bundle, {"entities.toml": entities})
    got = [m.split(": error: ")[1] for m in messages(v) if m.startswith("entities.toml")]
    assert got == [
        "[servers.a___b]: server name 'a___b' contains '___', the separator in action ids '<server>___<tool>'",
        "[servers.pay:eu]: server name 'pay:eu' must be 1 to 64 letters, digits, '_', '.' or '-', starting "
        "with a letter or digit",
        "[servers.fine]: tool name 'x___y' contains '___', the separator in action ids '<server>___<tool>'",
        "[servers.fine]: tool name 'has space' must be 1 to 128 letters, digits, '_', '.' or '-' (MCP's tool names)",
        f"[servers.fine]: tool name '{'t' * 129}' must be 1 to 128 letters, digits, '_', '.' or '-' (MCP's tool names)",
        "[servers.fine]: tool name 'é' must be 1 to 128 letters, digits, '_', '.' or '-' (MCP's tool names)",
    ]
    lines = [int(m.split(":")[1]) for m in messages(v) if m.startswith("entities.toml")]
    base = entities.count("\n", 0, entities.index('[servers."a___b"]')) + 1
    assert lines == [base, base + 3, base + 7, base + 7, base + 7, base + 7]
