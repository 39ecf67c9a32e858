"""One decision for one tools/call, in numbered steps: the enclave's, and `policy explain`'s.

  1. arguments: strict JSON, size-capped, an object, nothing Cedar reads as an escape; an x402
     payment, parsed per the scheme the bundle lets the server accept and priced in its asset;
  2. identity: the bearer token (offline: the claimed agent and roles) as a principal of the bundle;
  3. server and tool: named by the bundle;
  4. quarantine: the server has proven its identity and the tool matches its pin;
  5. Cedar: the policies that can apply to the tool (log-only policy sets noted, not enforced);
  6. limits: every matching rate and spend limit has room for this call's cost.

The same steps decide the other MCP requests that reach an upstream or come from one (decision
0018), by `Call.kind`: a resource read, a prompt, and an upstream's sampling or elicitation request
(the agent it reaches is the principal). For those, step 3 needs only the server, step 4 only its
identity (their definitions are not pinned), step 5 evaluates the kind's one Cedar action
(`bundle.MCP_ACTIONS`) with the request as `context.input`, and step 6 does not apply (limits
count tool calls).

The first step that denies decides. Everything read is passed in, the time too (never a clock);
nothing here sequences, signs or charges. The enclave runs steps 1-5 (`decide_before_limits`)
outside its locks, and step 6 (`decide_limits`) under the sequencer lock with the charge and the
append, so limits stay exact under concurrency. `decide` runs all six (explain, tests).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import IntEnum
from typing import Any, Literal, Protocol

from cloister.enclave.bundle import (
    MAX_LIMIT_VALUE,
    MCP_ACTIONS,
    MCP_INPUT_SCHEMAS,
    ActionKind,
    AgentSpec,
    PolicyBundle,
    ServerSpec,
    entry_name,
)
from cloister.enclave.limits import BadCost, LimitBook, LimitCheck
from cloister.enclave.policy import PolicyEngine, Principal, cedar_escape
from cloister.verify.canonical import canonical_sha256, parse_json
from cloister.verify.entries import decimal_text, quoted
from cloister.verify.errors import DecodeError
from cloister.verify.jwt import TokenError, peek_issuer, verify_jwt
from cloister.verify.x402 import PaymentError, read_payment
from cloister.wire.contract import DenyCode

# Denials that a bundle in log-only mode logs but lets through; identity and argument problems never pass.
LOG_ONLY_CODES = frozenset({DenyCode.POLICY, DenyCode.NO_PERMIT, DenyCode.LIMIT})
# A payment is charged exactly: at most this many decimal places keep every window's sums exact.
MAX_PAYMENT_PLACES = 12


class Step(IntEnum):
    ARGUMENTS = 1
    IDENTITY = 2
    SERVER_AND_TOOL = 3
    QUARANTINE = 4
    CEDAR = 5
    LIMITS = 6


class Identity(Protocol):
    """Who is calling: `principal` returns the bundle's principal or raises TokenError."""

    def principal(self, bundle: PolicyBundle, now_ms: int) -> Principal: ...


class ServerView(Protocol):
    """What the enclave knows of upstream servers (`ServerRegistry`; offline, explain's assumptions)."""

    def refusal(self, spec: ServerSpec, tool: str, now_ms: int) -> str | None: ...

    def input_schema(self, server: str, tool: str) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True)
class Call:
    identity: Identity
    server: str
    tool: str
    arguments_json: bytes
    payment_amount: str  # a bare x402 amount (old relays, explain), "" for none; see `payment`
    now_ms: int
    payment: bytes = b""  # the x402 payment payload the call carries (JSON), b"" for none
    # What is asked (decision 0018); `tool` is then the resource URI or prompt name ("" for sampling
    # and elicitation) and `arguments_json` the request's parameters.
    kind: ActionKind = ActionKind.TOOL

    @property
    def action(self) -> str | None:
        """The Cedar action, when it is not the tool's own."""
        return MCP_ACTIONS.get(self.kind)

    @property
    def recorded_tool(self) -> str:
        """What the decision entry and the grant name as the tool (`bundle.entry_name`)."""
        return entry_name(self.kind, self.tool)


@dataclass(frozen=True)
class State:
    """The state a decision reads. `engine` has the servers' attestation levels set."""

    bundle: PolicyBundle
    engine: PolicyEngine
    servers: ServerView
    limits: LimitBook


@dataclass
class Decision:
    """What `decide` found: built by the steps below, each filling in what it found."""

    mode: Literal["enforce", "log-only"]
    args_sha256: bytes
    code: str = ""  # "" when allowed, else a DenyCode
    denial: str = ""  # why, when denied
    step: int = 0  # the Step that denied; 0 when allowed
    principal: Principal | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    payment: Decimal | None = None  # what the call's x402 payment is charged, in its asset's units
    payment_sha256: bytes | None = None  # its payload's canonical SHA-256, bound into the grant
    policy_ids: tuple[str, ...] = ()
    shadow_note: str = ""  # what log-only policy sets say about an allowed call
    limit_check: LimitCheck | None = None

    @property
    def allowed(self) -> bool:
        return not self.code

    @property
    def log_only(self) -> bool:
        """A denial that the bundle's log-only mode logs as a denial but lets through."""
        return self.mode == "log-only" and self.code in LOG_ONLY_CODES

    @property
    def goes_through(self) -> bool:
        return not self.code or (self.mode == "log-only" and self.code in LOG_ONLY_CODES)

    @property
    def reason(self) -> str:
        if self.code:
            return self.denial
        return "; ".join(filter(None, (f"permitted by {', '.join(self.policy_ids)}", self.shadow_note)))

    @property
    def charges(self) -> dict[str, str]:
        """What an allowed call charges, per limit id (as the decision entry records it)."""
        if not self.allowed or self.limit_check is None:
            return {}
        return {k: decimal_text(v) for k, v in self.limit_check.charges.items() if v}

    def deny(self, code: DenyCode, reason: str) -> None:
        self.code, self.denial = code, reason


def decide(call: Call, state: State) -> Decision:
    """The whole decision, steps 1-6."""
    return decide_limits(call, decide_before_limits(call, state), state.limits)


def decide_before_limits(call: Call, state: State) -> Decision:
    """Steps 1-5."""
    d = Decision(
        mode="log-only" if state.bundle.settings.mode == "log-only" else "enforce",
        args_sha256=hashlib.sha256(call.arguments_json).digest(),
    )
    for number, step in _STEPS:
        step(d, call, state)
        if d.code:
            d.step = number
            break
    return d


# 1. Arguments, and the x402 payment.
def _arguments(d: Decision, call: Call, state: State) -> None:
    try:
        parsed = parse_json(
            call.arguments_json or b"{}", what="arguments", max_bytes=state.bundle.settings.max_argument_bytes
        )
        if not isinstance(parsed, dict):
            raise DecodeError("arguments: must be a JSON object")
    except DecodeError as exc:
        d.deny(DenyCode.BAD_ARGUMENTS, str(exc))
        return
    escape = cedar_escape(parsed)
    if escape is not None:
        d.deny(
            DenyCode.BAD_ARGUMENTS,
            f"arguments: {escape} is a Cedar escape (object members starting with '__' are refused: Cedar "
            "would read the object as an entity or extension value, not the data the upstream receives)",
        )
        return
    d.arguments, d.args_sha256 = parsed, canonical_sha256(parsed)
    if call.kind is not ActionKind.TOOL and (call.payment or call.payment_amount):
        d.deny(DenyCode.BAD_ARGUMENTS, f"x402 payment: only a tools/call can carry one, not a {call.kind.value}")
    elif call.payment:
        _payment(d, call, state)
    elif call.payment_amount:
        _bare_amount(d, call, state)


def _payment(d: Decision, call: Call, state: State) -> None:
    """The x402 payload, read as the scheme the server accepts it defines; charged exactly that."""
    spec = state.bundle.servers.get(call.server)
    if spec is None:
        return  # step 3 denies the call
    if not spec.x402:
        d.deny(
            DenyCode.BAD_ARGUMENTS,
            f"x402 payment: server {call.server!r} accepts no x402 payments in the policy bundle "
            "(its `x402` list of accepted payments is empty)",
        )
        return
    try:
        charge = read_payment(call.payment, spec.x402, now_s=call.now_ms // 1000, server=f"server {call.server!r}")
    except PaymentError as exc:
        d.deny(DenyCode.BAD_ARGUMENTS, str(exc))
        return
    exponent = charge.amount.as_tuple().exponent
    if charge.amount > MAX_LIMIT_VALUE or (isinstance(exponent, int) and -exponent > MAX_PAYMENT_PLACES):
        d.deny(
            DenyCode.BAD_ARGUMENTS,
            f"x402 payment: {charge.amount} is beyond what budgets count exactly "
            f"(at most {MAX_LIMIT_VALUE} and {MAX_PAYMENT_PLACES} decimal places)",
        )
        return
    d.payment, d.payment_sha256 = charge.amount, charge.payment.sha256


def _bare_amount(d: Decision, call: Call, state: State) -> None:
    """A bare amount (no payload): refused for a server that names the payments it accepts."""
    spec = state.bundle.servers.get(call.server)
    if spec is not None and spec.x402:
        d.deny(
            DenyCode.BAD_ARGUMENTS,
            f"x402 payment: server {call.server!r} names the payments it accepts, so a bare amount is not "
            "charged: send the x402 payment payload",
        )
        return
    try:
        d.payment = Decimal(call.payment_amount[:40])
        if not d.payment.is_finite() or d.payment <= 0:
            raise ArithmeticError
    except ArithmeticError:
        d.payment = None
        d.deny(DenyCode.BAD_ARGUMENTS, f"x402 payment amount {call.payment_amount[:40]!r} is not a positive decimal")


# 2. Identity.
def _identity(d: Decision, call: Call, state: State) -> None:
    try:
        d.principal = call.identity.principal(state.bundle, call.now_ms)
    except TokenError as exc:
        code = DenyCode.UNKNOWN_AGENT if exc.reason == "unknown-agent" else DenyCode.UNAUTHENTICATED
        d.deny(code, f"{exc.reason}: {exc}")


# 3. The server and the tool are the bundle's (for the other kinds, the server).
def _server_and_tool(d: Decision, call: Call, state: State) -> None:
    spec = state.bundle.servers.get(call.server)
    if spec is None:
        d.deny(DenyCode.UNKNOWN_SERVER, f"server {quoted(call.server)} is not in the policy bundle")
    elif call.kind in (ActionKind.RESOURCE, ActionKind.PROMPT) and not call.tool:
        d.deny(
            DenyCode.BAD_ARGUMENTS,
            f"a {call.kind.value} must name its {'URI' if call.kind is ActionKind.RESOURCE else 'prompt'}",
        )
    elif call.kind is ActionKind.TOOL and call.tool not in spec.tools:
        d.deny(DenyCode.UNKNOWN_TOOL, f"tool {quoted(call.tool)} is not a tool of server {call.server!r} in the bundle")


# 4. Quarantine: an unproven server identity, a drifted or unreported pinned tool.
def _quarantine(d: Decision, call: Call, state: State) -> None:
    tool = call.tool if call.kind is ActionKind.TOOL else ""  # only tools are pinned
    refusal = state.servers.refusal(state.bundle.servers[call.server], tool, call.now_ms)
    if refusal is not None:
        d.deny(DenyCode.QUARANTINED, refusal)


# 5. Cedar, on the tool's slice of policies.
def _cedar(d: Decision, call: Call, state: State) -> None:
    assert d.principal is not None
    now = datetime.fromtimestamp(call.now_ms / 1000, UTC)
    action = call.action
    schema = state.servers.input_schema(call.server, call.tool) if action is None else MCP_INPUT_SCHEMAS.get(call.kind)
    cedar = state.engine.evaluate(d.principal, call.server, call.tool, d.arguments, now, schema, action=action)
    d.policy_ids = cedar.policy_ids
    if not cedar.allowed:
        d.deny(DenyCode(cedar.code), cedar.reason)
    else:
        d.shadow_note = state.engine.shadow_verdict(
            d.principal, call.server, call.tool, d.arguments, now, schema, action=action
        )


_STEPS = (
    (Step.ARGUMENTS, _arguments),
    (Step.IDENTITY, _identity),
    (Step.SERVER_AND_TOOL, _server_and_tool),
    (Step.QUARANTINE, _quarantine),
    (Step.CEDAR, _cedar),
)


# 6. Limits. Checks, never charges; `LimitBook.check` drops expired charges from its windows, so
#    the enclave calls this under the sequencer lock. Completes `d`, steps 1-5's decision.
def decide_limits(call: Call, d: Decision, limits: LimitBook) -> Decision:
    p = d.principal
    if d.code or p is None or call.kind is not ActionKind.TOOL:
        return d
    try:
        # By the roles the bundle grants the agent, never by those its token chose to present.
        d.limit_check = limits.check(p.agent, call.server, call.tool, d.arguments, call.now_ms, d.payment)
    except BadCost as exc:
        d.deny(DenyCode.BAD_ARGUMENTS, str(exc))
        d.step = Step.LIMITS
        return d
    if not d.limit_check.ok:
        d.deny(DenyCode.LIMIT, d.limit_check.reason)
        d.step = Step.LIMITS
    return d


# ---- identity: a token's (the enclave caches it, core._CachedToken), or offline a claimed one --


def principal_from_token(bundle: PolicyBundle, token: str, now_ms: int) -> tuple[Principal, int]:
    """The principal a token names, and when the token expires (seconds); raises TokenError."""
    if not token:
        raise TokenError("missing", "no bearer token: send 'Authorization: Bearer <JWT>'")
    iss = peek_issuer(token)
    issuer = bundle.issuers.get(iss)
    if issuer is None:
        raise TokenError("unknown-issuer", f"token issuer {quoted(iss)} is not trusted by the policy bundle")
    if not issuer.audience:  # a bundle parsed without the log's origin (never in the enclave)
        raise TokenError("no-audience", f"issuer {iss!r} has no audience: its tokens cannot be checked")
    verified = verify_jwt(
        token,
        issuer.keys,
        issuer=issuer.issuer,
        audience=issuer.audience,
        now=now_ms // 1000,
        max_lifetime_s=issuer.max_lifetime_s,
    )
    spec = registered(bundle, verified.subject)
    if iss not in spec.issuers:
        raise TokenError(
            "issuer-not-bound", f"issuer {iss!r} may not mint tokens for agent {verified.subject!r} (entities.toml)"
        )
    raw_roles = verified.claims.get(issuer.roles_claim, [])
    if isinstance(raw_roles, str):
        raw_roles = raw_roles.split()
    if not isinstance(raw_roles, list) or not all(isinstance(r, str) for r in raw_roles):
        raise TokenError("malformed", f"token claim {issuer.roles_claim!r} must be a list of role names")
    return granted(spec, verified.subject, raw_roles, iss), verified.expires_at


def registered(bundle: PolicyBundle, agent: str) -> AgentSpec:
    spec = bundle.agents.get(agent)
    if spec is None:
        raise TokenError("unknown-agent", f"agent {quoted(agent)} is not registered in the policy bundle")
    return spec


def granted(spec: AgentSpec, agent: str, roles: Sequence[str], issuer: str) -> Principal:
    for role in roles:
        if role not in spec.roles:
            raise TokenError("role-not-granted", f"the bundle does not grant role {quoted(role)} to agent {agent!r}")
    return Principal(agent=agent, roles=frozenset(roles), issuer=issuer)
