"""How the relay names upstream resources and routes what upstreams send outside an answer
(decision 0018): URI mapping, attribution of sampling and log messages, and listing bounds."""

from __future__ import annotations

from typing import Any

import pytest

from cloister.relay.agent_sessions import AgentSessions, relay_template, relay_uri, split_uri
from cloister.relay.upstreams import MAX_LISTED, bounded_listing


@pytest.mark.parametrize(
    "uri",
    ["demo://resource/static/document/a.md", "file:///etc/passwd", "https://x.test/a?b=c&d=%2F#f", "é://ü", "a b"],
)
def test_a_relay_uri_names_its_server_and_gives_back_the_upstream_uri(uri: str) -> None:
    mapped = relay_uri("everything", uri)
    assert mapped.startswith("cloister://upstream/everything/") and "/" not in mapped.removeprefix(
        "cloister://upstream/everything/"
    )
    assert split_uri(mapped) == ("everything", uri)


def test_a_template_keeps_its_expressions_and_expands_to_a_relay_uri() -> None:
    template = relay_template("everything", "demo://resource/dynamic/text/{resourceId}")
    assert template == "cloister://upstream/everything/demo%3A%2F%2Fresource%2Fdynamic%2Ftext%2F{resourceId}"
    assert split_uri(template.replace("{resourceId}", "7")) == ("everything", "demo://resource/dynamic/text/7")


@pytest.mark.parametrize(
    "uri", ["cloister://attestation/00", "cloister://upstream/", "cloister://upstream/x", "cloister://upstream//y", "x"]
)
def test_other_uris_name_no_upstream_resource(uri: str) -> None:
    assert split_uri(uri) is None


class Ctx:
    """A request context as far as AgentSessions reads it."""

    def __init__(self, sid: str) -> None:
        self.request = type("R", (), {"headers": {"mcp-session-id": sid} if sid else {}})()
        self.session = object()
        self.request_id = 1


def test_only_calls_of_one_session_attribute_an_upstream_request() -> None:
    agents = AgentSessions()
    a, b = agents.seen(Ctx("A"), "ta"), agents.seen(Ctx("B"), "tb")  # type: ignore[arg-type]
    assert agents.attributed("s") == (None, 0)
    with agents.flight("s", a, Ctx("A")):  # type: ignore[arg-type]
        flight, n = agents.attributed("s")
        assert flight is not None and flight.token == "ta" and n == 1
        with agents.flight("s", a, Ctx("A")):  # type: ignore[arg-type]
            assert agents.attributed("s")[0] is not None  # two calls, one session
            with agents.flight("s", b, Ctx("B")):  # type: ignore[arg-type]
                assert agents.attributed("s") == (None, 2)  # two sessions: neither
                assert agents.log_targets("s", "error") == [] and agents.dropped_logs == 1
        assert agents.attributed("other") == (None, 0)
    assert agents.flights == {}


def test_log_messages_without_a_call_go_to_sessions_that_asked_at_that_level() -> None:
    agents = AgentSessions()
    quiet, verbose, errors = (agents.seen(Ctx(k), "t") for k in ("Q", "V", "E"))  # type: ignore[arg-type]
    verbose.log_level, errors.log_level = "debug", "error"
    assert agents.log_targets("s", "critical") == []  # their listings showed them nothing of "s"
    verbose.servers.add("s")
    errors.servers.add("s")
    assert [s.key for s, _ in agents.log_targets("s", "info")] == ["mcp:V"]
    assert [s.key for s, _ in agents.log_targets("s", "critical")] == ["mcp:V", "mcp:E"]
    assert agents.log_targets("another", "critical") == []
    assert agents.most_verbose() == "debug" and quiet.log_level is None


def test_requests_without_a_session_id_are_not_remembered() -> None:
    agents = AgentSessions()
    for _ in range(100):
        agents.seen(Ctx(""), "t")  # type: ignore[arg-type]
    assert agents.sessions == {}


def test_an_upstream_offers_at_most_max_listed_items() -> None:
    items: list[Any] = list(range(MAX_LISTED + 5))
    assert bounded_listing("s", "resources", items) == items[:MAX_LISTED]
