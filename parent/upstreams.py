"""MCP client connections from the relay to the upstream servers (official SDK).

One long-lived session per upstream, shared by all agents (the SDK multiplexes concurrent
requests). A session that breaks (process exit, network) is re-established with backoff;
while it is down, calls fail fast with `UpstreamUnavailable`. Every call has a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, cast

import anyio
import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import CONNECTION_CLOSED

from cloister.verify.errors import CloisterError
from parent.config import UpstreamConfig

log = logging.getLogger("cloister.relay.upstreams")
MAX_TOOLS_PAGES = 50


class UpstreamError(CloisterError):
    """An upstream call failed. `kind` is "unavailable", "timeout" or "error"."""

    def __init__(self, kind: str, message: str, *, code: int | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.data = data


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.name = config.name
        self.tools: list[types.Tool] = []
        self.state = "connecting"
        self.last_error = ""
        self._client: Client | None = None
        self._broken = anyio.Event()
        self._stop = anyio.Event()
        self._ready = anyio.Event()

    def _target(self) -> str | StdioServerParameters:
        if self.config.url:
            return self.config.url
        env = {**os.environ, **self.config.env}
        return StdioServerParameters(command=self.config.command[0], args=list(self.config.command[1:]), env=env,
                                     cwd=str(self.config.cwd) if self.config.cwd else None)

    async def run(self) -> None:
        """Keep a session open until stopped, reconnecting with backoff."""
        backoff = 0.2
        while not self._stop.is_set():
            try:
                async with Client(self._target(), cache=None, read_timeout_seconds=self.config.timeout_s) as client:
                    tools = await self._list_tools(client)
                    self._client, self.tools, self.state, self.last_error = client, tools, "up", ""
                    self._broken = anyio.Event()
                    self._ready.set()
                    backoff = 0.2
                    log.info("upstream %s connected: %d tools", self.name, len(tools))
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._wait_then_cancel, tg)
            except Exception as exc:  # any transport failure: mark down and retry
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("upstream %s unavailable: %s", self.name, self.last_error)
            finally:
                self._client = None
                if self.state == "up":
                    log.warning("upstream %s disconnected", self.name)
                self.state = "down" if not self._stop.is_set() else "stopped"
                self._ready.set()
            if self._stop.is_set():
                break
            with anyio.move_on_after(backoff):
                await self._stop.wait()
            backoff = min(backoff * 2, 5.0)

    async def _wait_then_cancel(self, tg: anyio.abc.TaskGroup) -> None:
        async with anyio.create_task_group() as inner:
            async def stop_on(event: anyio.Event) -> None:
                await event.wait()
                inner.cancel_scope.cancel()

            inner.start_soon(stop_on, self._stop)
            inner.start_soon(stop_on, self._broken)
        tg.cancel_scope.cancel()

    async def _list_tools(self, client: Client) -> list[types.Tool]:
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_TOOLS_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    async def wait_ready(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self._ready.wait()

    async def call(self, tool: str, arguments: dict[str, Any], meta: dict[str, Any]) -> types.CallToolResult:
        client = self._client
        if client is None:
            why = self.last_error or "connecting"
            raise UpstreamError("unavailable", f"upstream {self.name!r} is unavailable: {why}")
        try:
            with anyio.fail_after(self.config.timeout_s):
                return await client.call_tool(tool, arguments, meta=cast(types.RequestParamsMeta, meta))
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"upstream {self.name!r} did not answer within {self.config.timeout_s:g}s") \
                from exc
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                # The transport died under the call (process exit, dropped stream): reconnect.
                self._broken.set()
                raise UpstreamError("unavailable", f"upstream {self.name!r} closed the connection during the call") \
                    from exc
            raise UpstreamError("error", f"upstream {self.name!r} refused the call: {exc.message}", code=exc.code,
                                data=exc.data) from exc
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError) as exc:
            self._broken.set()
            raise UpstreamError("unavailable", f"upstream {self.name!r} connection failed: {exc!r}") from exc

    def stop(self) -> None:
        self._stop.set()


class Upstreams:
    def __init__(self, configs: tuple[UpstreamConfig, ...]) -> None:
        self.by_name = {c.name: Upstream(c) for c in configs}

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        for u in self.by_name.values():
            tg.start_soon(u.run)

    async def wait_ready(self, timeout: float) -> None:
        with contextlib.suppress(Exception):
            async with anyio.create_task_group() as tg:
                for u in self.by_name.values():
                    tg.start_soon(u.wait_ready, timeout)

    def stop(self) -> None:
        for u in self.by_name.values():
            u.stop()

    def candidates(self) -> list[tuple[str, str]]:
        return [(u.name, t.name) for u in self.by_name.values() for t in u.tools]

    def status(self) -> dict[str, dict[str, Any]]:
        return {u.name: {"state": u.state, "tools": len(u.tools), "error": u.last_error}
                for u in self.by_name.values()}
