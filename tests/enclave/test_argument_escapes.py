"""Tool arguments reach Cedar as `context.input`, in Cedar's JSON format, where an object with a
member `__extn`, `__entity` or `__expr` is not a record but an escape: an extension value, an
entity, an expression. Arguments holding one would make Cedar evaluate a value other than the one
the upstream receives, so the enclave refuses them, at any depth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloister.verify.entries import DecisionEntry, parse_entry
from tests.world import World, make_world


@pytest.fixture
def w(tmp_path: Path) -> World:
    world = make_world(tmp_path)
    # Without the hourly cap, whose cost reads `amount` as a number (and so refused an object):
    # the policies alone decide refund.create, as they do for any tool without an argument cost.
    world.persist(world.core.load_policy(world.sign_bundle(2, {"limits.toml": None}))[2])
    return world


def refund(w: World, args: dict[str, Any]) -> tuple[bool, str, str]:
    v = w.core.authorize(
        token=w.token("refund-bot", ["refund-agent"]),
        server="refunds",
        tool="refund.create",
        arguments_json=json.dumps(args).encode(),
        request_id="",
        persisted_size=len(w.log),
    )
    w.persist(v.log)
    entry = parse_entry(w.log[v.log_index])
    assert isinstance(entry, DecisionEntry)
    return v.allowed, entry.code, v.reason


def test_cedar_escape_keys_in_arguments_are_refused(w: World) -> None:
    """`refund-single-cap` forbids refunds above 5000. An `amount` sent as Cedar's decimal escape
    is decimal("1.0") to Cedar, a small refund it permits, while the upstream receives an object
    (whatever it makes of it, not 1.0)."""
    assert refund(w, {"customer_id": "cus_1001", "amount": 9000})[:2] == (False, "policy")  # the forbid works
    escaped = {"customer_id": "cus_1001", "amount": {"__extn": {"fn": "decimal", "arg": "1.0"}}}
    allowed, code, reason = refund(w, escaped)
    assert (allowed, code) == (False, "bad-arguments"), reason
    assert "input.amount.__extn is a Cedar escape" in reason
    # Every escape Cedar defines, at any depth, in records and in sets (arrays).
    for args, where in [
        ({"amount": 10, "meta": {"__entity": {"type": "Cloister::Role", "id": "refund-supervisor"}}}, "meta.__entity"),
        ({"amount": 10, "meta": {"a": [1, {"b": {"__expr": "true"}}]}}, "meta.a[1].b.__expr"),
        ({"amount": 10, "__extn": {"fn": "ip", "arg": "10.0.0.1"}}, "input.__extn"),
        ({"amount": 10, "notes": [{"__entity": {"type": "Cloister::Agent", "id": "x"}}]}, "notes[0].__entity"),
        ({"amount": 10, "meta": {"__record": {}}}, "meta.__record"),  # the prefix Cedar reserves
    ]:
        allowed, code, reason = refund(w, {"customer_id": "cus_1001", **args})
        assert (allowed, code) == (False, "bad-arguments") and where in reason, reason


def test_arguments_that_only_look_like_escapes_are_data(w: World) -> None:
    for args in (
        {"customer_id": "cus_1001", "amount": 10, "reason": "__extn"},  # a value, not a member name
        {"customer_id": "cus_1001", "amount": 10, "meta": {"_extn": 1, "x__entity": 2, "": 3}},
        {"customer_id": "cus_1001", "amount": 10, "tags": ["__expr"]},
    ):
        allowed, code, reason = refund(w, args)
        assert allowed and code == "", reason
