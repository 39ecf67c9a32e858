"""Every allowed call gets one outcome with real processes: the official MCP client cancels a slow
call (notifications/cancelled), and the relay stops with a call in flight (SIGTERM)."""

from __future__ import annotations

import signal
import time
from typing import Any

import anyio
import anyio.to_thread
import httpx2

from cloister.verify.entries import DecisionEntry, OutcomeEntry, parse_entry
from cloister.verify.tiles import parse_entry_bundle
from tests.e2e.conftest import Stack
from tests.e2e.procs import stop, wait_for
from tests.e2e.protocol_stack import stored_entries
from tests.e2e.test_relay import client


def logged(stack: Stack) -> list[Any]:
    """Every entry of the log, read back through the relay's log API."""
    out: list[Any] = []
    with httpx2.Client() as h:
        att = h.get(f"{stack.relay_url}/log/attestation", params={"nonce": "00" * 16}).json()
        size = int(att["checkpoint"].splitlines()[1])
        for n in range(0, -(-size // 256)):
            width = min(256, size - n * 256)
            path = f"tile/entries/{n:03d}" + (f".p/{width}" if width < 256 else "")
            out += [parse_entry(e) for e in parse_entry_bundle(h.get(f"{stack.relay_url}/log/{path}").content)]
    return out


def sleep_calls(entries: list[Any]) -> list[tuple[int, list[OutcomeEntry]]]:
    """Each allowed call of slow/sleep: its decision's index and the outcomes that name it."""
    return [
        (i, [o for o in entries if isinstance(o, OutcomeEntry) and o.decision_index == i])
        for i, e in enumerate(entries)
        if isinstance(e, DecisionEntry) and e.tool == "sleep" and e.decision == "allow"
    ]


async def call_then_cancel(stack: Stack, seconds: float, after: float) -> None:
    async with client(stack, stack.token()) as c:
        with anyio.move_on_after(after) as scope:
            await c.call_tool("slow___sleep", {"seconds": seconds})
        assert scope.cancelled_caught


def test_a_call_the_client_cancels_gets_its_outcome(stack: Stack) -> None:
    # The upstream would answer after 1.5 s (its timeout is 2 s); the client gives up after 0.5 s.
    anyio.run(call_then_cancel, stack, 1.5, 0.5)
    wait_for(lambda: [len(o) for _, o in sleep_calls(logged(stack))] == [1], 10, "the cancelled call's outcome")
    [(_, [outcome])] = sleep_calls(logged(stack))
    assert outcome.error == "cancelled by the client" and outcome.result_sha256 is None
    # When the upstream's answer would have come, nothing more is recorded for that decision.
    time.sleep(2)
    assert [len(o) for _, o in sleep_calls(logged(stack))] == [1]
    assert stack.health()["ready"] is True


def test_a_relay_stopping_mid_call_records_the_outcome_before_it_closes(stack: Stack) -> None:
    # Runs last in this module: it stops the relay. A call is in flight when SIGTERM arrives.
    async def in_flight() -> None:
        async def call() -> None:
            with anyio.move_on_after(10):
                try:
                    async with client(stack, stack.token()) as c:
                        await c.call_tool("slow___sleep", {"seconds": 1.8})
                except Exception:  # the relay went away under the call: what matters is its log
                    pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            # The upstream's own record of the call, polled off the event loop.
            await anyio.to_thread.run_sync(
                wait_for, lambda: len(stack.forwarded()) >= 2, 5, "the call to reach the upstream"
            )
            stack.relay.send_signal(signal.SIGTERM)

    assert len(stack.forwarded()) == 1  # the cancelled call of the test above
    try:
        anyio.run(in_flight)
        stack.relay.wait(15)
    finally:
        stop(stack.relay)

    calls = sleep_calls(stored_entries(stack.tmp / "state" / "log"))
    assert [len(o) for _, o in calls] == [1, 1], calls
    print("outcome of the call in flight at SIGTERM:", calls[1][1][0].error or "(a result)")
