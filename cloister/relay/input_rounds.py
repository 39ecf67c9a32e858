"""Input rounds for 2026-07-28 agents (decision 0030): an upstream's sampling, elicitation or roots
request, made while it serves such an agent's tools/call, reaches the agent as an input round of
that call (`InputRequiredResult`), and the agent's retry (`inputResponses` and the echoed
`requestState`) carries the answer back to the upstream, whose call then completes.

The 2026-07-28 HTTP wire has no server-to-agent request: each POST is answered once. So a call
that may need input (the agent declared sampling, elicitation or roots in its request's `_meta`)
runs in a task of its own (`PendingCall`); the agent's request waits on it, and is answered with
the call's result, or, when the upstream asks something, with an input round. The upstream's
call stays pending in memory meanwhile. The round's `requestState` names it: 192 random bits, one
round, one use; the relay's record binds it to the agent (a digest of its bearer token), the
tool, the arguments and an expiry, and a retry that does not match all of them is refused
(-32602) and consumes nothing. A retry is not a new decision: it continues the call the enclave
decided once (and charged once); each input request in it was decided as the agent's
(`McpHandlers._to_agent`) before it reached the agent, and its answer is that decision's outcome.

Bounds: a round the agent does not answer within `ttl_s` abandons the call's rounds (the
upstream's request fails with "timeout"; the call ends as the upstream then ends it, within its
own deadline, and its outcome is recorded as for any call); at most `per_agent` calls of one agent
and `total` in all may be parked (a round issued and not answered, or abandoned and still
running); an input request beyond them is refused to the upstream before anything is decided.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
from mcp.server.connection import Connection
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp_types import CLIENT_CAPABILITIES_META_KEY
from mcp_types.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS
from pydantic import BaseModel, ValidationError

from cloister.relay.agent_sessions import AgentSession, AgentSessions, Flight
from cloister.relay.codes import FROM_CLOISTER, SOURCE
from cloister.relay.upstreams import UpstreamError

log = logging.getLogger("cloister.relay.rounds")

ROUND_TTL_S = 60.0  # how long a round waits for the agent's retry
MAX_PARKED_PER_AGENT = 16  # calls of one agent waiting on its retry (or abandoned, still running)
MAX_PARKED = 256  # ... of all agents
MAX_ASKS_PER_ROUND = 8  # input requests in one round; more go in the next
REQUEST_CANCELLED = -32800  # the SDK's code for a request cancelled by its client
# The call in rounds whose task this is: an upstream's request made inside that task (a 2026-07-28
# upstream's input round, driven by the SDK in the call's own task; a reply streamed on the call's
# own POST) belongs to it exactly. A handshake-era upstream's requests arrive on its session's
# own task, where this is unset, and are attributed as before (agent_sessions).
CURRENT: contextvars.ContextVar[PendingCall | None] = contextvars.ContextVar("cloister_round_call", default=None)
_INPUT_CAPABILITIES = ("sampling", "elicitation", "roots")
# What answers each input request: the first model that validates (sampling's content may be an array).
RESULT_MODELS: dict[str, tuple[type[BaseModel], ...]] = {
    "sampling/createMessage": (types.CreateMessageResult, types.CreateMessageResultWithTools),
    "elicitation/create": (types.ElicitResult,),
    "roots/list": (types.ListRootsResult,),
}


def offers_input(meta: Any) -> bool:
    """Whether a 2026-07-28 request's envelope declares sampling, elicitation or roots: only then
    may its call need an input round (otherwise it runs inline, as any call)."""
    caps = meta.get(CLIENT_CAPABILITIES_META_KEY) if isinstance(meta, dict) else None
    return isinstance(caps, dict) and any(caps.get(k) is not None for k in _INPUT_CAPABILITIES)


def agent_digest(token: str) -> bytes:
    """What binds a round to its agent: a digest of the bearer token the call was decided with
    (the relay judges no token; the enclave did, for the call)."""
    return hashlib.sha256(b"cloister/input-round/agent\0" + token.encode("utf-8", "surrogatepass")).digest()


def arguments_digest(name: str, arguments: Any) -> bytes:
    """What binds a round to its call: the tool's name and its arguments (canonical JSON)."""
    text = json.dumps([name, arguments or {}], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(b"cloister/input-round/call\0" + text.encode("ascii")).digest()


def _invalid(why: str) -> MCPError:
    return MCPError(INVALID_PARAMS, f"Invalid or expired requestState: {why}", data={SOURCE: FROM_CLOISTER})


@dataclass
class Waiter:
    """The agent's request now waiting on a call: where the call's log messages and progress go
    (`ctx.session.send_log_message`, as the SDK's context or the fast path's offer it)."""

    ctx: Any
    request_id: Any
    progress: ProgressFnT | None = None


@dataclass
class _Ask:
    key: str
    method: str
    request: dict[str, Any]  # the InputRequest as the agent gets it
    done: anyio.Event = field(default_factory=anyio.Event)
    answer: BaseModel | None = None
    error: str = ""


@dataclass
class _Round:
    state: str
    asks: list[_Ask]
    expires: float


@dataclass
class _Final:
    value: dict[str, Any] | None = None
    error: MCPError | None = None


class _Session:
    """What mcp_handlers reads of a Flight's `ctx.session` for a call in rounds."""

    can_send_request = False  # a round is no server-to-agent request

    def __init__(self, call: PendingCall) -> None:
        self.call = call
        self.protocol_version = call.version

    def check_client_capability(self, capability: types.ClientCapabilities) -> bool:
        return self.call.connection.check_capability(capability)

    async def send_log_message(
        self, level: Any, data: Any, logger: str | None = None, related_request_id: Any = None
    ) -> None:
        """To the request now waiting on the call (it applies its own opt-in); else dropped."""
        waiter = self.call.waiter
        if waiter is not None:
            rid = str(waiter.request_id) if waiter.request_id is not None else None
            await waiter.ctx.session.send_log_message(level, data, logger, related_request_id=rid)

    async def send_request(self, request: Any, result_type: Any, *args: Any, **kwargs: Any) -> Any:
        raise NoBackChannelError(request.method)


class RoundContext:
    """A Flight's `ctx` for a call in rounds (mcp_handlers finds the call through it)."""

    request_id = None
    request = None

    def __init__(self, call: PendingCall) -> None:
        self.call = call
        self.session = _Session(call)


def pending_call(ctx: Any) -> PendingCall | None:
    """The call in rounds a Flight's context belongs to, or None (an ordinary flight)."""
    return ctx.call if isinstance(ctx, RoundContext) else None


def asking_call(server: str) -> PendingCall | None:
    """The call in rounds on `server` whose own task is running this (exact attribution), or None."""
    call = CURRENT.get()
    if call is None or call.server != server or call.final is not None or call.flight is None:
        return None
    return call


class PendingCall:
    """One 2026-07-28 tools/call that may need input: running in its own task, answered to
    whichever of the agent's requests (the first, then each retry) waits on it."""

    def __init__(
        self, rounds: InputRounds, server: str, token: str, name: str, arguments: Any, version: str, meta: Any
    ) -> None:
        self.rounds = rounds
        self.server = server
        self.name = name
        self.version = version
        self.agent = agent_digest(token)
        self.call_digest = arguments_digest(name, arguments)
        self._caps = meta.get(CLIENT_CAPABILITIES_META_KEY) if isinstance(meta, dict) else None
        self._connection: Connection | None = None
        self.ctx = RoundContext(self)
        self.session = AgentSession(f"obj:{id(self)}", self.ctx, token)  # type: ignore[arg-type]
        self.flight: Flight | None = None  # while the call runs
        self.waiter: Waiter | None = None
        self.queued: list[_Ask] = []
        self.outstanding: _Round | None = None
        self.final: _Final | None = None
        self.abandoned = False
        self.scope: anyio.CancelScope | None = None
        self.asked = 0
        self._changed = anyio.Event()

    @property
    def connection(self) -> Connection:
        """The agent's capabilities as the SDK reads a request's envelope (parsed when first asked)."""
        if self._connection is None:
            self._connection = Connection.from_envelope(self.version, None, self._caps)
        return self._connection

    @property
    def parked(self) -> bool:
        """Waiting on the agent's retry, or abandoned and still running: what the caps count."""
        return self.outstanding is not None or (self.abandoned and self.final is None)

    def _wake(self) -> None:
        self._changed.set()

    # ---- the call's own task --------------------------------------------------------------------

    async def run(self, call: Callable[[ProgressFnT | None], Awaitable[dict[str, Any]]], progress: bool) -> None:
        final = _Final(error=MCPError(REQUEST_CANCELLED, "Request cancelled"))
        CURRENT.set(self)  # this task's own context (a copy): nothing outside it sees this
        try:
            with (
                anyio.CancelScope() as self.scope,
                self.rounds.agents.flight(
                    self.server,
                    self.session,
                    self.ctx,  # type: ignore[arg-type]
                ) as self.flight,
            ):
                final = _Final(value=await call(self._progress if progress else None))
        except MCPError as exc:
            final = _Final(error=exc)
        except Exception as exc:
            log.exception("a call in input rounds failed in the relay")
            final = _Final(error=MCPError(INTERNAL_ERROR, f"relay error: {exc!r}"[:500]))
        finally:
            self.final = final
            self._wake()
            if self.waiter is None and self.outstanding is None:
                self.rounds.drop(self)

    async def _progress(self, progress: float, total: float | None, message: str | None) -> None:
        waiter = self.waiter
        if waiter is not None and waiter.progress is not None:
            await waiter.progress(progress, total, message)

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    # ---- the agent's requests -------------------------------------------------------------------

    async def serve(self, waiter: Waiter) -> dict[str, Any]:
        """The answer to the agent's request now waiting: the call's result, or the next round."""
        self.waiter = waiter
        try:
            while True:
                if self.final is not None:
                    self.rounds.drop(self)
                    if self.final.error is not None:
                        raise self.final.error
                    assert self.final.value is not None
                    return self.final.value
                if self.queued:
                    return self._issue()
                self._changed = anyio.Event()
                await self._changed.wait()
        except anyio.get_cancelled_exc_class():
            self.cancel()  # the agent went away mid-call: the call is cancelled, as without rounds
            raise
        finally:
            self.waiter = None

    def _issue(self) -> dict[str, Any]:
        asks, self.queued = self.queued[:MAX_ASKS_PER_ROUND], self.queued[MAX_ASKS_PER_ROUND:]
        state = secrets.token_urlsafe(24)
        self.outstanding = _Round(state, asks, anyio.current_time() + self.rounds.ttl_s)
        self.rounds.by_state[state] = (self, self.outstanding)
        self.rounds.stats["rounds"] += 1
        return {
            "resultType": "input_required",
            "inputRequests": {a.key: a.request for a in asks},
            "requestState": state,
        }

    def answer(self, rnd: _Round, answers: list[tuple[_Ask, BaseModel]]) -> None:
        self.rounds.by_state.pop(rnd.state, None)
        self.outstanding = None
        self.rounds.stats["answered"] += 1
        for ask, value in answers:
            ask.answer = value
            ask.done.set()

    # ---- the upstream's requests ----------------------------------------------------------------

    def refusal(self) -> str:
        """Why an input request of the upstream may not become a round now ("" when it may)."""
        if self.abandoned:
            return "the agent abandoned this call's input rounds"
        if self.final is not None:
            return "the call has ended"
        if len(self.queued) >= MAX_ASKS_PER_ROUND:
            return f"{len(self.queued)} of its input requests already wait for the agent's next round"
        others = [c for c in self.rounds.calls.values() if c is not self and c.parked]
        if len(others) >= self.rounds.total:
            return f"{len(others)} calls are waiting on their agents' input (the relay's cap)"
        mine = sum(1 for c in others if hmac.compare_digest(c.agent, self.agent))
        if mine >= self.rounds.per_agent:
            return f"this agent has {mine} calls waiting on its input (the cap per agent)"
        return ""

    async def ask(self, method: str, params: dict[str, Any] | None) -> BaseModel:
        """Put an input request in the call's next round and wait for the agent's answer to it.
        Fails (UpstreamError) when it is not answered within the round's time: the call's rounds
        are then abandoned."""
        self.asked += 1
        request: dict[str, Any] = {"method": method}
        if params is not None:
            request["params"] = params
        ask = _Ask(f"cloister-{self.asked}", method, request)
        self.queued.append(ask)
        self._wake()
        try:
            with anyio.move_on_after(self.rounds.ttl_s):
                await ask.done.wait()
        finally:
            if ask in self.queued:  # cancelled by the upstream before it went out
                self.queued.remove(ask)
        if not ask.done.is_set():
            self.abandon(f"the agent did not answer the {method} input round within {self.rounds.ttl_s:g}s")
            raise UpstreamError(
                "timeout", f"the agent did not answer the {method} input round within {self.rounds.ttl_s:g}s"
            )
        if ask.answer is None:
            raise UpstreamError("unavailable", ask.error or f"the {method} input round was not answered")
        return ask.answer

    def abandon(self, why: str) -> None:
        """No retry will come: the call's rounds end (its other input requests fail with `why`)."""
        if self.abandoned:
            return
        self.abandoned = True
        self.rounds.stats["abandoned"] += 1
        pending = list(self.queued)
        if self.outstanding is not None:
            self.rounds.by_state.pop(self.outstanding.state, None)
            pending += self.outstanding.asks
            self.outstanding = None
        self.queued.clear()
        for ask in pending:
            if not ask.done.is_set():
                ask.error = why
                ask.done.set()
        if self.final is not None and self.waiter is None:
            self.rounds.drop(self)


class InputRounds:
    """The calls of 2026-07-28 agents in input rounds, and their rounds by `requestState`."""

    def __init__(
        self,
        agents: AgentSessions,
        *,
        ttl_s: float = ROUND_TTL_S,
        per_agent: int = MAX_PARKED_PER_AGENT,
        total: int = MAX_PARKED,
    ) -> None:
        self.agents = agents
        self.ttl_s = ttl_s
        self.per_agent = per_agent
        self.total = total
        self.calls: dict[int, PendingCall] = {}
        self.by_state: dict[str, tuple[PendingCall, _Round]] = {}
        self.stats = {"calls": 0, "rounds": 0, "answered": 0, "abandoned": 0, "refused_retries": 0}
        self._tasks: set[asyncio.Future[None]] = set()

    def drop(self, call: PendingCall) -> None:
        self.calls.pop(id(call), None)
        if call.outstanding is not None:
            self.by_state.pop(call.outstanding.state, None)

    def _sweep(self) -> None:
        """Forget ended calls whose round expired unanswered (a live one expires through its ask)."""
        now = anyio.current_time()
        for call in list(self.calls.values()):
            if call.final is not None and call.outstanding is not None and now >= call.outstanding.expires:
                self.drop(call)

    async def start(
        self,
        server: str,
        token: str,
        name: str,
        arguments: Any,
        version: str,
        meta: Any,
        call: Callable[[ProgressFnT | None], Awaitable[dict[str, Any]]],
        waiter: Waiter,
    ) -> dict[str, Any]:
        """A new call that may need input: run it in its own task and answer the first request."""
        self._sweep()
        pending = PendingCall(self, server, token, name, arguments, version, meta)
        self.calls[id(pending)] = pending
        self.stats["calls"] += 1
        task = asyncio.ensure_future(pending.run(call, waiter.progress is not None))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await pending.serve(waiter)

    async def resume(
        self, token: str, name: str, arguments: Any, state: Any, responses: Any, waiter: Waiter
    ) -> dict[str, Any]:
        """The agent's retry of a call with its answers: delivered, then the next answer."""
        found = self.by_state.get(state) if isinstance(state, str) else None
        if found is None:
            self.stats["refused_retries"] += 1
            raise _invalid(
                "it names no input round pending on this relay (not one it issued, altered, already "
                "answered, expired, or issued before a restart); call the tool again"
            )
        call, rnd = found
        if not hmac.compare_digest(call.agent, agent_digest(token)):
            self.stats["refused_retries"] += 1
            raise _invalid("it was issued to another agent (the retry's bearer token differs)")
        if not hmac.compare_digest(call.call_digest, arguments_digest(name, arguments)):
            self.stats["refused_retries"] += 1
            raise _invalid("it was issued for another call: a retry repeats the tool name and arguments exactly")
        if anyio.current_time() >= rnd.expires:
            call.abandon("the agent's retry came after the round expired")
            raise _invalid(f"it expired ({self.ttl_s:g}s after it was issued); call the tool again")
        answers = _answers(rnd, responses)
        call.answer(rnd, answers)
        return await call.serve(waiter)


def _answers(rnd: _Round, responses: Any) -> list[tuple[_Ask, BaseModel]]:
    """The agent's answer to every input request of the round, each as its method's result."""
    if not isinstance(responses, dict):
        raise MCPError(
            INVALID_PARAMS,
            f"inputResponses must answer the round's input requests {[a.key for a in rnd.asks]}",
            data={SOURCE: FROM_CLOISTER},
        )
    out: list[tuple[_Ask, BaseModel]] = []
    for ask in rnd.asks:
        raw = responses.get(ask.key)
        model = _parse(ask.method, raw) if isinstance(raw, dict) else None
        if model is None:
            raise MCPError(
                INVALID_PARAMS,
                f"inputResponses[{ask.key!r}] is missing or is not a valid answer to {ask.method}",
                data={SOURCE: FROM_CLOISTER},
            )
        out.append((ask, model))
    return out


def _parse(method: str, raw: dict[str, Any]) -> BaseModel | None:
    for model in RESULT_MODELS.get(method, ()):
        try:
            return model.model_validate(raw, by_name=False)
        except ValidationError:
            continue
    return None


def wire_responses(responses: Any) -> Any:
    """The SDK's typed `inputResponses` as the JSON the agent sent (validated again per method)."""
    if not isinstance(responses, dict):
        return responses
    return {
        k: v.model_dump(mode="json", by_alias=True, exclude_none=True) if isinstance(v, BaseModel) else v
        for k, v in responses.items()
    }
