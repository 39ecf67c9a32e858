"""`subscriptions/listen` for 2026-07-28 agents (SEP-2575): the change events the relay tells
handshake-era sessions as `notifications/*/list_changed` (an upstream's lists, identity or
connection, or the policy in force changed) and `notifications/resources/updated`, delivered on
each agent's listen stream.

The SDK's `ListenHandler` serves the streams from an in-process bus. What the relay adds:
- a cap per agent token (the SDK's only cap is relay-wide, so one agent holding every stream
  would shut the others out), and on the resource URIs one stream may name;
- resource URIs judged as a resources/subscribe is: only those the agent may read are honored
  (the ack says which), each upstream resource subscribed once for all its listeners and
  unsubscribed when the last one goes. list_changed events carry nothing but "list again", and
  each agent's next listing is filtered by the enclave as always.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INVALID_PARAMS, INVALID_REQUEST

__all__ = ["MAX_LISTENS", "MAX_LISTENS_PER_TOKEN", "MAX_LISTEN_URIS", "AgentListens", "Readable"]

MAX_LISTENS = 1024  # open listen streams, relay-wide (the SDK's default)
MAX_LISTENS_PER_TOKEN = 8  # open listen streams per bearer token
MAX_LISTEN_URIS = 64  # resource URIs one listen stream may name
MAX_BUFFERED_EVENTS = 64  # a stream whose agent stopped reading ends here (it re-listens and lists again)


# (the request, the URIs it names) -> (the relay URIs the agent may read, subscribed for it; a release
# to await when the stream ends). McpHandlers.listen_resources.
Readable = Callable[
    [ServerRequestContext[Any, Any], list[str]], Awaitable[tuple[list[str], Callable[[], Awaitable[None]]]]
]


class AgentListens:
    """The relay's `on_subscriptions_listen` handler and the bus its change events go out on."""

    def __init__(self, bearer: Callable[[ServerRequestContext[Any, Any]], str], readable: Readable) -> None:
        self._bearer = bearer  # the request's bearer token (mcp_handlers.bearer)
        self._readable = readable
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
        uris = list(params.notifications.resource_subscriptions or ())
        if len(uris) > MAX_LISTEN_URIS:
            raise MCPError(
                INVALID_PARAMS, f"a listen stream may name at most {MAX_LISTEN_URIS} resources, not {len(uris)}"
            )
        self._open[key] += 1
        release: Callable[[], Awaitable[None]] | None = None
        try:
            if uris:
                allowed, release = await self._readable(ctx, uris)
                notifications = params.notifications.model_copy(update={"resource_subscriptions": allowed or None})
                params = params.model_copy(update={"notifications": notifications})
            return await self._handler(ctx, params)
        finally:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]
            if release is not None:
                with anyio.CancelScope(shield=True):
                    await release()

    def open_streams(self) -> int:
        return sum(self._open.values())

    async def lists_changed(self) -> None:
        """Tell every listen stream that asked: tools, resources and prompts may have changed."""
        for event in (ToolsListChanged(), ResourcesListChanged(), PromptsListChanged()):
            await self.bus.publish(event)

    async def resource_updated(self, uri: str) -> None:
        """An upstream resource some listen stream honored changed (`uri`: the relay's URI)."""
        await self.bus.publish(ResourceUpdated(uri))

    async def close(self) -> None:
        """End every stream gracefully (its final result frame), at shutdown."""
        self._handler.close()
