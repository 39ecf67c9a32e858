"""`cloister policy explain`: the enclave's engine, offline, with the reasons shown."""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.enclave.bundle import read_bundle_dir
from cloister.enclave.policy import PolicyEngine
from cloister.policytools.explain import Explanation, explain, render
from cloister.policytools.validate import validate_files
from tests.policytools.conftest import cli, sign_local

AT = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)  # a Monday, 10:30 UTC

CONDITIONS = """
// EU agents may only call EU-resident servers.
@id("residency")
forbid (principal, action, resource)
unless { principal.region == resource.region };

// Refunds only in office hours (UTC).
@id("office-hours")
forbid (principal, action == Cloister::Action::"refunds___refund.create", resource)
unless { context.system.now.toTime() >= duration("9h") && context.system.now.toTime() < duration("17h") };
"""

ATTESTATION = """
// Payment tools only on servers that proved a Nitro attestation.
@id("payments-need-nitro")
forbid (principal, action, resource)
when { resource.category == "payments" && resource.attestation != "nitro" };
"""


X402 = """
[[limits]]
id = "research-payments"
kind = "spend"
per = "agent"
roles = ["research-agent"]
servers = ["research"]
cost = "x402"
max = "0.10"
window = "1d"
"""


def ask(
    bundle: Path,
    edits: dict[str, str] | None = None,
    *,
    agent: str = "refund-bot",
    roles: list[str] | None = None,
    server: str = "refunds",
    tool: str = "refund.create",
    args: object = None,
    at: datetime = AT,
    attestation: str | None = None,
    payment: str = "",
) -> Explanation:
    files = read_bundle_dir(bundle)
    for name, text in (edits or {}).items():
        files[name] = text.encode()
    v = validate_files(files)
    assert v.bundle is not None, [str(f) for f in v.findings]
    return explain(
        v,
        agent=agent,
        roles=roles,
        server=server,
        tool=tool,
        arguments_json=json.dumps({"amount": 100} if args is None else args),
        at=at,
        attestation=attestation,
        payment=payment,
    )


def test_allow_names_the_permit_its_source_and_the_limits_with_costs(bundle: Path) -> None:
    ex = ask(bundle, args={"amount": 700})
    assert (ex.decision, ex.code, ex.reason) == ("allow", "", "permitted by refund-agent-tools")
    assert ex.roles == ["refund-agent"] and ex.roles_source == "all roles granted to the agent"
    assert ex.discoverable is True and ex.considered == 2
    [p] = ex.policies
    assert (p["id"], p["effect"], p["file"], p["line"]) == ("refund-agent-tools", "permit", "policies/refunds.cedar", 2)
    assert p["source"].startswith('@id("refund-agent-tools")\npermit (') and p["source"].endswith(");")
    assert p["comment"].startswith("// Refund agents may look customers up")
    assert [(lim["id"], lim["cost"], lim["cost_source"]) for lim in ex.limits] == [
        ("refund-bot-hourly-refunds", "700", "argument:amount"),
        ("refund-agent-call-rate", "1", "call"),
    ]
    text = render(ex)
    assert "decision: ALLOW" in text
    assert "  - refund-agent-tools (permit, policies/refunds.cedar:2)" in text
    assert (
        "  - refund-bot-hourly-refunds: spend max 10000 per 1h per agent, cost argument:amount; this call costs 700"
    ) in text
    assert "what remains now is known only to the running enclave" in text


def test_forbid_names_the_forbidding_policy(bundle: Path) -> None:
    ex = ask(bundle, args={"amount": 6000})
    assert (ex.decision, ex.code, ex.reason) == ("deny", "policy", "forbidden by policy refund-single-cap")
    assert [p["id"] for p in ex.policies] == ["refund-single-cap"]
    assert 'when { context.input.amount.greaterThan(decimal("5000.0")) };' in ex.policies[0]["source"]
    assert "decision: DENY  [policy]" in render(ex)


def test_no_permit_and_hidden_from_discovery(bundle: Path) -> None:
    ex = ask(bundle, agent="research-bot")
    assert (ex.decision, ex.code, ex.reason) == ("deny", "no-permit", "no policy permits this call")
    assert ex.policies == [] and ex.discoverable is False
    assert "is hidden from this agent's tools/list" in render(ex)
    assert ask(bundle, agent="research-bot", server="research", tool="web_search", args={}).discoverable is True


def test_a_limit_the_call_cannot_fit_even_when_empty(bundle: Path) -> None:
    limits = (bundle / "limits.toml").read_text().replace('max = "10000"', 'max = "50"')
    ex = ask(bundle, {"limits.toml": limits}, args={"amount": 100})
    assert (ex.decision, ex.code) == ("deny", "limit")
    assert ex.reason == (
        "limit 'refund-bot-hourly-refunds': this call costs 100, and its max is 50 per 1h: "
        "it cannot pass even with an empty window"
    )
    assert ex.policies[0]["id"] == "refund-agent-tools"  # Cedar allowed it


def test_arguments_cedar_cannot_compare_are_shown_as_evaluation_errors(bundle: Path) -> None:
    # A string amount: the forbid cannot be evaluated, and the enclave fails closed (decision 0006).
    ex = ask(bundle, args={"amount": "6000"})
    assert (ex.decision, ex.code, ex_ids(ex)) == ("deny", "policy", ["refund-single-cap"])
    assert "failing closed" in ex.reason
    assert ex.evaluation_errors == [
        {
            "policy": "refund-single-cap",
            "error": "error while evaluating policy `refund-single-cap`: type error: expected decimal, got string",
        }
    ]
    assert "a forbid that errors denies" in render(ex)
    # Typed by the tool's input schema (inputs/...json), an integer amount is a Long: the decimal
    # comparison errors, so it is denied too; as a number (a decimal), it passes.
    integer = {"type": "object", "properties": {"amount": {"type": "integer"}}}
    typed = ask(bundle, {"inputs/refunds___refund.create.json": json.dumps(integer)}, args={"amount": 100})
    assert (typed.code, ex_ids(typed)) == ("policy", ["refund-single-cap"])
    number = {"type": "object", "properties": {"amount": {"type": "number"}}}
    assert ask(bundle, {"inputs/refunds___refund.create.json": json.dumps(number)}, args={"amount": 100}).code == ""
    assert any("no inputs/refunds___refund.create.json" in n for n in ask(bundle).notes)
    # An amount that is not a number at all is refused by the spend limit, even where Cedar allows it.
    lenient = (
        (bundle / "policies" / "refunds.cedar")
        .read_text()
        .replace('when { context.input.amount.greaterThan(decimal("5000.0")) };', "when { false };")
    )
    bad = ask(bundle, {"policies/refunds.cedar": lenient}, args={"amount": "lots"})
    assert (bad.decision, bad.code) == ("deny", "bad-arguments")
    assert "argument 'amount' is not a number" in bad.reason


def test_identity_and_argument_denials_come_first(bundle: Path) -> None:
    assert ask(bundle, agent="ghost").code == "unknown-agent"
    assert ask(bundle, server="payroll").code == "unknown-server"
    assert ask(bundle, tool="refund.delete").code == "unknown-tool"
    wrong = ask(bundle, roles=["research-agent"])
    assert wrong.code == "unauthenticated" and "does not grant role 'research-agent'" in wrong.reason
    assert ask(bundle, args=[1, 2]).code == "bad-arguments"
    big = ask(bundle, {"bundle.toml": '[bundle]\nname = "x"\nmax_argument_bytes = 10\n'}, args={"amount": 123456789})
    assert big.code == "bad-arguments"
    # A supervisor role claimed explicitly: the agent is not granted it.
    assert ask(bundle, roles=["refund-supervisor"], tool="refund.approve_above_threshold").code == "unauthenticated"


def test_log_only_mode_lets_denials_through(bundle: Path) -> None:
    ex = ask(bundle, {"bundle.toml": '[bundle]\nname = "x"\nmode = "log-only"\n'}, args={"amount": 6000})
    assert (ex.decision, ex.code, ex.enforced) == ("deny", "policy", False)
    assert "log-only mode: logged as a denial, but the call goes through" in render(ex)
    # Identity problems are enforced even in log-only mode.
    assert ask(bundle, {"bundle.toml": '[bundle]\nname = "x"\nmode = "log-only"\n'}, agent="ghost").enforced


def test_residency_and_time_window(bundle: Path) -> None:
    edits = {"policies/conditions.cedar": CONDITIONS}
    # refund-bot is in the EU, and so is the refunds server; research is in the US.
    eu = ask(bundle, edits)
    assert eu.decision == "allow", eu.reason
    cross = ask(bundle, edits, server="research", tool="web_search", args={})
    assert (cross.code, ex_ids(cross)) == ("policy", ["residency"])
    # Outside office hours.
    late = ask(bundle, edits, at=datetime(2026, 3, 2, 20, 0, tzinfo=UTC))
    assert (late.code, ex_ids(late)) == ("policy", ["office-hours"])


@pytest.mark.skipif(not hasattr(PolicyEngine, "set_server_levels"), reason="no server attestation levels here")
def test_attestation_level(bundle: Path) -> None:
    edits = {"policies/attestation.cedar": ATTESTATION}
    # By default the server is taken to have proven what the bundle pins for it: here, nothing.
    unproven = ask(bundle, edits)
    assert (unproven.code, ex_ids(unproven), unproven.attestation) == ("policy", ["payments-need-nitro"], "none")
    proven = ask(bundle, edits, attestation="nitro")
    assert proven.decision == "allow" and "resource.attestation = 'nitro'" in render(proven)


def test_a_server_that_has_not_proven_its_pinned_identity_is_quarantined(bundle: Path) -> None:
    pcr0 = "ab" * 48
    entities = (
        (bundle / "entities.toml")
        .read_text()
        .replace(
            'tools = ["customer_lookup", "transaction_history", "refund.create", "refund.approve_above_threshold"]\n'
            'identity = { kind = "none" }',
            'tools = ["customer_lookup", "transaction_history", "refund.create", "refund.approve_above_threshold"]\n'
            f'identity = {{ kind = "nitro", pcrs = {{ "0" = "{pcr0}" }} }}',
        )
    )
    edits = {"entities.toml": entities, "policies/attestation.cedar": ATTESTATION}
    # By default the pinned identity is taken as proven: Cedar sees resource.attestation "nitro".
    proven = ask(bundle, edits)
    assert (proven.decision, proven.attestation) == ("allow", "nitro"), proven.reason
    # Not proven: the enclave quarantines the server before Cedar, and so does explain.
    for level in ("unverified", "tls"):
        q = ask(bundle, edits, attestation=level)
        assert (q.decision, q.code, q.policies, q.considered) == ("deny", "quarantined", [], 0)
        assert q.reason == (
            f"server 'refunds' is quarantined: it has not proven its nitro identity "
            f"(resource.attestation taken as {level!r})"
        )
        assert q.enforced and q.attestation == level and q.limits == []
        assert "decision: DENY  [quarantined]" in render(q) and "limits: none apply" not in render(q)
    # Quarantine comes after identity and before Cedar, as in the enclave.
    assert ask(bundle, edits, attestation="unverified", agent="ghost").code == "unknown-agent"
    assert ask(bundle, edits, attestation="unverified", args={"amount": 6000}).code == "quarantined"
    # In log-only mode a quarantined call is still refused.
    log_only = ask(
        bundle, {**edits, "bundle.toml": '[bundle]\nname = "x"\nmode = "log-only"\n'}, attestation="unverified"
    )
    assert (log_only.code, log_only.enforced) == ("quarantined", True)


def test_x402_payments_are_decided_as_the_enclave_charges_them(bundle: Path) -> None:
    edits = {"limits.toml": (bundle / "limits.toml").read_text() + X402}
    research = functools.partial(
        ask, bundle, agent="research-bot", server="research", tool="web_search", args={"query": "q"}
    )
    # No payment: the call passes while budget remains (the upstream will name its price).
    unpaid = research(edits)
    assert unpaid.decision == "allow" and unpaid.payment is None
    assert [(lim["id"], lim["cost"]) for lim in unpaid.limits] == [("research-payments", "0")]
    paid = research(edits, payment="0.06")
    assert paid.decision == "allow" and paid.limits[0]["cost"] == "0.06"
    assert "payment:  x402 0.06" in render(paid)
    over = research(edits, payment="0.25")
    assert (over.decision, over.code) == ("deny", "limit")
    assert over.reason == (
        "limit 'research-payments': this call costs 0.25, and its max is 0.10 per 1d: "
        "it cannot pass even with an empty window"
    )
    for bad in ("abc", "-1", "0", "NaN"):
        refused = research(edits, payment=bad)
        assert (refused.code, refused.reason) == (
            "bad-arguments",
            f"x402 payment amount {bad!r} is not a positive decimal",
        )
    # Over the cap in log-only mode: logged as a denial, the call goes through.
    lenient = research({**edits, "bundle.toml": '[bundle]\nname = "x"\nmode = "log-only"\n'}, payment="0.25")
    assert (lenient.code, lenient.enforced) == ("limit", False)
    r = cli(
        "explain",
        "--bundle",
        str(bundle),
        "--agent",
        "research-bot",
        "--server",
        "research",
        "--tool",
        "web_search",
        "--args",
        '{"query": "q"}',
        "--payment",
        "abc",
        "--at",
        "2026-03-02T10:30:00Z",
    )
    assert r.returncode == 1 and "decision: DENY  [bad-arguments]" in r.stdout, r.stderr


def ex_ids(ex: Explanation) -> list[str]:
    return [p["id"] for p in ex.policies]


def test_cli_text_json_signed_bundle_and_args_file(bundle: Path, tmp_path: Path) -> None:
    r = cli(
        "explain",
        "--bundle",
        str(bundle),
        "--agent",
        "refund-bot",
        "--server",
        "refunds",
        "--tool",
        "refund.create",
        "--args",
        '{"amount": 6000}',
        "--at",
        "2026-03-02T10:30:00Z",
    )
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith("decision: DENY  [policy]\nreason:   forbidden by policy refund-single-cap\n")
    signed = tmp_path / "b.signed"
    signed.write_bytes(sign_local(read_bundle_dir(bundle), 3, ed25519.Ed25519PrivateKey.generate()))
    (tmp_path / "args.json").write_text('{"amount": 10}')
    j = cli(
        "explain",
        "--json",
        "--bundle",
        str(signed),
        "--agent",
        "refund-bot",
        "--role",
        "refund-agent",
        "--server",
        "refunds",
        "--tool",
        "refund.create",
        "--args",
        f"@{tmp_path / 'args.json'}",
    )
    assert j.returncode == 0, j.stderr
    out = json.loads(j.stdout)
    assert out["decision"] == "allow" and out["roles_source"] == "--role"
    assert out["notes"][0].startswith(f"bundle: {signed} (version 3, signed by key ")
    assert "its signature is not checked here" in out["notes"][0]
    assert [lim["cost"] for lim in out["limits"]] == ["10", "1"]
    bad_at = cli("explain", "--bundle", str(bundle), "--agent", "a", "--server", "s", "--tool", "t", "--at", "noon")
    assert bad_at.returncode == 2 and "not an ISO 8601 time" in bad_at.stderr
    (bundle / "entities.toml").write_text("[roles\n")
    broken = cli("explain", "--bundle", str(bundle), "--agent", "a", "--server", "s", "--tool", "t")
    assert broken.returncode == 2 and "entities.toml:1" in broken.stderr
