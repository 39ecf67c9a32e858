"""docs/policy.md stays correct: its bundle validates cleanly, its snippets too, and the decisions
it describes are the ones the engine makes."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.policytools.explain import Explanation, explain, render
from cloister.policytools.validate import Validation, validate_files
from tests.policytools.conftest import REPO, messages

DOC = REPO / "docs" / "policy.md"
_BLOCK = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```$", re.S | re.M)
AT = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)


def _blocks() -> tuple[dict[str, bytes], list[str], str]:
    text = DOC.read_text()
    files: dict[str, str] = {}
    snippets: list[str] = []
    for lang, info, body in _BLOCK.findall(text):
        m = re.search(r"file=(\S+)", info)
        if m:
            files[m.group(1)] = files.get(m.group(1), "") + ("\n" if m.group(1) in files else "") + body
        elif lang == "cedar" and "snippet" in info:
            snippets.append(body)
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    out = {k: v.encode() for k, v in files.items()}
    out["issuers/corp-idp.pem"] = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return out, snippets, text


@pytest.fixture(scope="module")
def doc() -> tuple[dict[str, bytes], list[str], str]:
    return _blocks()


@pytest.fixture(scope="module")
def validation(doc: tuple[dict[str, bytes], list[str], str]) -> Validation:
    return validate_files(doc[0])


def test_the_documented_bundle_is_complete_and_valid(
    doc: tuple[dict[str, bytes], list[str], str], validation: Validation
) -> None:
    files = doc[0]
    assert {
        "bundle.toml",
        "entities.toml",
        "issuers.toml",
        "limits.toml",
        "schema.cedarschema",
        "policies/refunds.cedar",
        "policies/guardrails.cedar",
        "policies/research.cedar",
        "inputs/refunds___refund.create.json",
    } <= set(files)
    assert validation.ok and not validation.findings, messages(validation)
    assert validation.schema == "file"
    assert len(validation.policies) == 6 and len(validation.bundle.limits) == 4  # type: ignore[union-attr]


def test_every_snippet_validates_in_the_documented_bundle(doc: tuple[dict[str, bytes], list[str], str]) -> None:
    files, snippets, _ = doc
    assert len(snippets) >= 2
    for snippet in snippets:
        v = validate_files({**files, "policies/snippet.cedar": snippet.encode()})
        assert v.ok and not v.findings, (snippet, messages(v))


def doc_snippet(policy_id: str) -> str:
    return next(x for x in _blocks()[1] if f'@id("{policy_id}")' in x)


def ask(
    v: Validation,
    agent: str,
    server: str,
    tool: str,
    args: object,
    *,
    at: datetime = AT,
    attestation: str | None = "nitro",
) -> Explanation:
    return explain(
        v,
        agent=agent,
        roles=None,
        server=server,
        tool=tool,
        arguments_json=json.dumps(args),
        at=at,
        attestation=attestation,
    )


def test_the_decisions_the_guide_describes(validation: Validation) -> None:
    refund = ("refund-bot", "refunds", "refund.create")
    assert ask(validation, *refund, {"amount": 120, "customer": "c-42"}).decision == "allow"
    # Argument conditions on a permit fail closed: too large, or not a number.
    assert ask(validation, *refund, {"amount": 700, "customer": "c-42"}).code == "no-permit"
    typed_wrong = ask(validation, *refund, {"amount": "120", "customer": "c-42"})
    assert typed_wrong.code == "no-permit" and typed_wrong.evaluation_errors
    # An optional argument guarded with `has` (the snippet): absent is fine, present is checked.
    files = {**validation.files, "policies/snippet.cedar": doc_snippet("no-test-refunds").encode()}
    with_snippet = validate_files(files)
    assert ask(with_snippet, *refund, {"amount": 120, "customer": "c-42"}).decision == "allow"
    test = ask(with_snippet, *refund, {"amount": 120, "customer": "c-42", "reason": "a test"})
    assert [p["id"] for p in test.policies] == ["no-test-refunds"]
    # Time window.
    late = ask(validation, *refund, {"amount": 120, "customer": "c-42"}, at=datetime(2026, 3, 2, 19, 0, tzinfo=UTC))
    assert [p["id"] for p in late.policies] == ["refunds-in-office-hours"]
    # Attestation: a server that has not proven its pinned identity is quarantined before Cedar,
    # as in the enclave (explain runs the enclave's decide()).
    unverified = ask(validation, *refund, {"amount": 120, "customer": "c-42"}, attestation="unverified")
    assert (unverified.code, unverified.policies) == ("quarantined", [])
    # Residency: an EU agent may not call the US research server.
    abroad = ask(validation, "refund-bot", "research", "web_search", {"query": "x"})
    assert [p["id"] for p in abroad.policies] == ["eu-agents-stay-in-the-eu"]
    # Discovery: research-bot sees web_search, and nothing on refunds.
    assert ask(validation, "research-bot", "research", "web_search", {"query": "x"}).decision == "allow"
    for tool in ("customer_lookup", "refund.create"):
        assert ask(validation, "research-bot", "refunds", tool, {}).discoverable is False
    # Limits: the costs the guide lists.
    costs = {
        lim["id"]: lim["cost"]
        for lim in ask(validation, "research-bot", "research", "web_search", {"query": "x"}).limits
    }
    assert costs == {"agent-call-rate": "1", "search-spend": "0.002", "research-x402": "0"}


def test_the_explain_example_output_is_what_explain_prints(
    doc: tuple[dict[str, bytes], list[str], str], validation: Validation
) -> None:
    text = doc[2]
    example = text[text.index("$ cloister policy explain") :]
    example = example[example.index("decision:") : example.index("```")]
    out = render(
        ask(validation, "refund-bot", "refunds", "refund.create", {"amount": 700, "customer": "c-42"}, attestation=None)
    ).splitlines()
    for line in example.splitlines():
        if line.strip() and line.strip() != "...":
            assert line in out, (line, out)
