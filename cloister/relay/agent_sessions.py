"""What the relay keeps of the agents' MCP sessions, for what MCP sends outside a request's answer
(decision 0018): list_changed notifications, upstream log messages, and upstream sampling and
elicitation requests, which must reach the one agent whose call caused them.

Upstream sessions are shared by every agent, and over stdio an upstream's request or notification
does not say which call it belongs to. So a sampling or elicitation request, or a log message, is
attributed to the agent session whose calls are in flight on that upstream, and only when all of
them belong to one session: with calls of two sessions in flight, it could be either's, and it
goes to neither (a sampling or elicitation request is refused to the upstream, a log message is
dropped and counted). Log messages with no call in flight go to the sessions that asked for logs
(`logging/setLevel`) at that level and whose listings showed them something of that server.

Also here: how upstream resources appear to agents. A resource's URI becomes
`cloister://upstream/<server>/<the upstream's URI, percent-encoded>` (a URI template keeps its
`{...}` expressions, so it still expands), which names the server unambiguously whatever the
upstream's own scheme.
"""

from __future__ import annotations

import contextlib
import re
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mcp.server.context import ServerRequestContext

UPSTREAM_URI = "cloister://upstream/"
MAX_SESSIONS = 10_000
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
_EXPRESSION = re.compile(r"(\{[^{}]*\})")


def relay_uri(server: str, uri: str) -> str:
    """The URI agents see for an upstream's resource."""
    return f"{UPSTREAM_URI}{server}/{urllib.parse.quote(uri, safe='')}"


def relay_template(server: str, template: str) -> str:
    """The URI template agents see for an upstream's template: its literal parts encoded as
    `relay_uri` encodes a URI, its RFC 6570 expressions kept."""
    parts = _EXPRESSION.split(template)
    encoded = "".join(p if i % 2 else urllib.parse.quote(p, safe="") for i, p in enumerate(parts))
    return f"{UPSTREAM_URI}{server}/{encoded}"


def split_uri(uri: str) -> tuple[str, str] | None:
    """(server, the upstream's URI) for a URI made by `relay_uri`, else None."""
    if not uri.startswith(UPSTREAM_URI):
        return None
    server, sep, rest = uri.removeprefix(UPSTREAM_URI).partition("/")
    if not sep or not server or not rest:
        return None
    return server, urllib.parse.unquote(rest)


def session_key(ctx: ServerRequestContext[Any, Any]) -> str:
    """One agent session: its Mcp-Session-Id, or the SDK's session object when there is none."""
    request = ctx.request
    sid = request.headers.get("mcp-session-id", "") if request is not None else ""
    return f"mcp:{sid}" if sid else f"obj:{id(ctx.session)}"


@dataclass
class AgentSession:
    key: str
    ctx: ServerRequestContext[Any, Any]  # its latest request's, whose session reaches the agent
    token: str
    log_level: str | None = None  # from logging/setLevel; None: no logs unless a call is in flight
    # The servers its listings showed it something of (the enclave judged): only their log
    # messages reach it when no call of its is in flight.
    servers: set[str] = field(default_factory=set)


@dataclass
class Flight:
    """A tools/call in flight: whose, on which upstream, and its request (to answer on its stream)."""

    session: AgentSession
    ctx: ServerRequestContext[Any, Any]
    token: str


@dataclass
class AgentSessions:
    sessions: OrderedDict[str, AgentSession] = field(default_factory=OrderedDict)
    flights: dict[str, list[Flight]] = field(default_factory=dict)
    dropped_logs: int = 0  # log messages that could have been any of several agents'
    # Resource subscriptions: (server, upstream URI) -> the session keys subscribed to it.
    subscribers: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def seen(self, ctx: ServerRequestContext[Any, Any], token: str) -> AgentSession:
        """The session of this request, registered or refreshed (the newest last; the oldest
        forgotten beyond MAX_SESSIONS). Its token is the one its latest request carried: a
        sampling request is decided with the token of the call it serves (`Flight.token`)."""
        key = session_key(ctx)
        if not key.startswith("mcp:"):
            # No session id (a 2026-07-28 or stateless request): nothing outlives the request.
            return AgentSession(key, ctx, token)
        s = self.sessions.pop(key, None)
        if s is None:
            s = AgentSession(key, ctx, token)
        s.ctx, s.token = ctx, token
        self.sessions[key] = s
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return s

    def forget(self, key: str) -> None:
        self.sessions.pop(key, None)
        for keys in self.subscribers.values():
            keys.discard(key)

    @contextlib.contextmanager
    def flight(self, server: str, session: AgentSession, ctx: ServerRequestContext[Any, Any]) -> Iterator[Flight]:
        f = Flight(session, ctx, session.token)
        self.flights.setdefault(server, []).append(f)
        try:
            yield f
        finally:
            flights = self.flights.get(server, [])
            if f in flights:
                flights.remove(f)
            if not flights:
                self.flights.pop(server, None)

    def attributed(self, server: str) -> tuple[Flight | None, int]:
        """The newest call in flight on `server` when all of them are one session's, and how many
        sessions have calls in flight there."""
        flights = self.flights.get(server, [])
        keys = {f.session.key for f in flights}
        return (flights[-1] if len(keys) == 1 else None), len(keys)

    def log_targets(self, server: str, level: str) -> list[tuple[AgentSession, Flight | None]]:
        """Who gets an upstream's log message at `level` (see the module's note)."""
        flight, sessions = self.attributed(server)
        rank = LOG_LEVELS.index(level) if level in LOG_LEVELS else 0
        if flight is not None:
            wanted = flight.session.log_level
            return [(flight.session, flight)] if wanted is None or LOG_LEVELS.index(wanted) <= rank else []
        if sessions:
            self.dropped_logs += 1
            return []
        return [
            (s, None)
            for s in self.sessions.values()
            if s.log_level is not None and LOG_LEVELS.index(s.log_level) <= rank and server in s.servers
        ]

    def most_verbose(self) -> str | None:
        """The most verbose level any session asked for: the level the upstreams are set to."""
        levels = [LOG_LEVELS.index(s.log_level) for s in self.sessions.values() if s.log_level in LOG_LEVELS]
        return LOG_LEVELS[min(levels)] if levels else None
