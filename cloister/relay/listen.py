"""`subscriptions/listen` for 2026-07-28 agents (SEP-2575): the change events the relay tells
handshake-era sessions as `notifications/*/list_changed` (an upstream's lists, identity or
connection, or the policy in force changed), delivered on each agent's listen stream.

The SDK's `ListenHandler` serves the streams from an in-process bus. What the relay adds is a cap
per agent token: the SDK's only cap is relay-wide, so one agent holding every stream would shut
the others out. Only list_changed events are published: they carry nothing but "list again", and
each agent's next listing is filtered by the enclave as always. `resources/updated` is not
published here (a listener names the URIs it wants, and the handler would deliver an update of a
resource the agent may not read); handshake-era sessions get updates through their policy-checked
subscriptions.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INVALID_REQUEST

__all__ = ["MAX_LISTENS", "MAX_LISTENS_PER_TOKEN", "AgentListens"]

MAX_LISTENS = 1024  # open listen streams, relay-wide (the SDK's default)
MAX_LISTENS_PER_TOKEN = 8  # open listen streams per bearer token
MAX_BUFFERED_EVENTS = 64  # a stream whose agent stopped reading ends here (it re-listens and lists again)


class AgentListens:
    """The relay's `on_subscriptions_listen` handler and the bus its change events go out on."""

    def __init__(self, bearer: Callable[[ServerRequestContext[Any, Any]], str]) -> None:
        self._bearer = bearer  # the request's bearer token (mcp_handlers.bearer)
        self.bus = InMemorySubscriptionBus()
        self._handler = ListenHandler(self.bus, max_subscriptions=MAX_LISTENS, max_buffered_events=MAX_BUFFERED_EVENTS)
        self._open: Counter[bytes] = Counter()

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        # The door (TokenGate) admitted only a token the enclave accepted; the digest only counts.
        key = hashlib.sha256(self._bearer(ctx).encode()).digest()
        if self._open[key] >= MAX_LISTENS_PER_TOKEN:
            raise MCPError(
                INVALID_REQUEST,
                f"at most {MAX_LISTENS_PER_TOKEN} subscriptions/listen streams may be open per agent token; "
                "close one first",
            )
        self._open[key] += 1
        try:
            return await self._handler(ctx, params)
        finally:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]

    def open_streams(self) -> int:
        return sum(self._open.values())

    async def lists_changed(self) -> None:
        """Tell every listen stream that asked: tools, resources and prompts may have changed."""
        for event in (ToolsListChanged(), ResourcesListChanged(), PromptsListChanged()):
            await self.bus.publish(event)

    async def close(self) -> None:
        """End every stream gracefully (its final result frame), at shutdown."""
        self._handler.close()
