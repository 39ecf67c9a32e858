"""Server and tool names map one to one onto Cedar actions `<server>___<tool>` (issue 9 item 4).

Before, server 'pay_' with tool 'wire' and server 'pay' with tool '_wire' were both the action
'pay____wire': a permit (or a limit) written for one pair applied to the other. The enclave now
refuses such names when it loads a bundle, with the rule `policy validate` runs (decision 0012).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cloister.enclave.bundle import BundleError, action_id, parse_entities, server_name_problem, tool_name_problem
from cloister.enclave.core import PolicyRefused
from cloister.wire.contract import TOOL_SEPARATOR
from tests.world import World, make_world

PAY = """
[servers.pay_]
tools = ["wire"]

[servers.pay]
tools = ["_wire"]
"""
# Meant for the harmless pay_/wire; it would also permit pay/_wire.
PERMIT = """@id("anyone-may-wire")
permit (principal, action == Cloister::Action::"pay____wire", resource);
"""


@pytest.fixture
def w(tmp_path: Path) -> World:
    return make_world(tmp_path)


def test_colliding_server_and_tool_names_are_refused(w: World) -> None:
    entities = (w.bundle_dir / "entities.toml").read_text()
    colliding = w.sign_bundle(2, {"entities.toml": entities + PAY, "policies/pay.cedar": PERMIT})
    with pytest.raises(PolicyRefused, match=r"\[servers.pay_\]: server name 'pay_' ends with '_'"):
        w.core.load_policy(colliding)
    assert w.core.policy is not None and w.core.policy.version == 1
    # Either half alone is refused too: the rule is about names, not about a pair present together.
    only_tool = w.sign_bundle(2, {"entities.toml": entities + '\n[servers.pay]\ntools = ["_wire"]\n'})
    with pytest.raises(PolicyRefused, match=r"tool name '_wire' starts with '_'"):
        w.core.load_policy(only_tool)


@pytest.mark.parametrize(
    ("server", "tools", "message"),
    [
        ("a___b", ["t"], "contains '___'"),
        ("a_", ["t"], "ends with '_'"),
        ("_a", ["t"], "must be 1 to 64 letters"),
        ("a:b", ["t"], "must be 1 to 64 letters"),
        ("a\\n", ["t"], "must be 1 to 64 letters"),
        ("s" * 65, ["t"], "must be 1 to 64 letters"),
        ("a", ["t___u"], "contains '___'"),
        ("a", ["_t"], "starts with '_'"),
        ("a", ["t/u"], "must be 1 to 128 letters"),
        ("a", ["t\\n"], "must be 1 to 128 letters"),
        ("a", ["t" * 129], "must be 1 to 128 letters"),
        ("a", [""], "must be 1 to 128 letters"),
    ],
)
def test_unsafe_names_are_refused_at_load(server: str, tools: list[str], message: str) -> None:
    quoted = ", ".join(f'"{t}"' for t in tools)
    files = {"entities.toml": f'[roles]\n[servers."{server}"]\ntools = [{quoted}]\n'.encode()}
    with pytest.raises(BundleError, match=message):
        parse_entities(files)


def test_accepted_names_give_distinct_action_ids_that_split_back() -> None:
    # Every name over a small alphabet rich in underscores, up to 5 characters.
    names = ["".join(p) for n in range(1, 6) for p in itertools.product("a_", repeat=n)]
    servers = [s for s in names if server_name_problem(s) is None]
    tools = [t for t in names if tool_name_problem(t) is None]
    assert "a__a" in servers and "a_" not in servers and "a__a" in tools and "_a" not in tools
    seen: dict[str, tuple[str, str]] = {}
    for pair in itertools.product(servers, tools):
        aid = action_id(*pair)
        assert aid not in seen, (pair, seen.get(aid))
        seen[aid] = pair
        server, _, tool = aid.partition(TOOL_SEPARATOR)
        server_r, _, tool_r = aid.rpartition(TOOL_SEPARATOR)
        assert (server, tool) == (server_r, tool_r) == pair
    assert server_name_problem("refunds") is None and tool_name_problem("refund.create") is None
