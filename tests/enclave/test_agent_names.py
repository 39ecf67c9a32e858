"""Agent names are token subjects: the forms real identity providers issue are accepted, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloister.enclave.core import PolicyRefused
from cloister.verify.entries import DecisionEntry, parse_entry
from tests.world import World, make_world

# Subjects as Auth0 (and Okta's Auth0) issue them: "<connection>|<id>", SAML connections with a
# second "|"; Keycloak issues UUIDs, Entra ID base64url object ids (both already fitted).
AUTH0_SUBJECTS = ("auth0|65a1f0c2e4b0d1a2b3c4d5e6", "google-oauth2|104331240234567891234", "samlp|corp|jo@example.com")


def _with_agents(w: World, names: tuple[str, ...]) -> bytes:
    text = (w.bundle_dir / "entities.toml").read_text()
    extra = "".join(f'\n[agents.{json.dumps(n)}]\nroles = ["refund-agent"]\nregion = "eu"\n' for n in names)
    return w.sign_bundle(2, {"entities.toml": text + extra})


@pytest.mark.parametrize("subject", AUTH0_SUBJECTS)
def test_an_auth0_user_subject_is_an_agent_that_gets_decisions(tmp_path: Path, subject: str) -> None:
    w = make_world(tmp_path)
    w.persist(w.core.load_policy(_with_agents(w, AUTH0_SUBJECTS))[2])
    v = w.core.authorize(
        token=w.token(subject, ["refund-agent"]),
        server="refunds",
        tool="customer_lookup",
        arguments_json=b'{"customer_id":"cus_1001"}',
        request_id="t",
        persisted_size=len(w.log),
    )
    w.persist(v.log)
    assert v.allowed, v.reason
    entry = parse_entry(w.log[v.log_index])
    assert isinstance(entry, DecisionEntry) and entry.agent == subject


@pytest.mark.parametrize(
    "name",
    ["auth0 |x", "|auth0", "auth0|\n", "a" * 129, "auth0|x\u0000", "auth0|\u00e9"],
    ids=["space", "leading-bar", "newline", "too-long", "nul", "non-ascii"],
)
def test_other_agent_names_are_still_refused(tmp_path: Path, name: str) -> None:
    w = make_world(tmp_path)
    with pytest.raises(PolicyRefused, match="is not a valid name"):
        w.core.load_policy(_with_agents(w, (name,)))


def test_a_bar_is_still_refused_in_role_names(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    text = (w.bundle_dir / "entities.toml").read_text().replace("[roles]\n", '[roles]\n"ops|admin" = {}\n', 1)
    with pytest.raises(PolicyRefused, match="role 'ops|admin' is not a valid name"):
        w.core.load_policy(w.sign_bundle(2, {"entities.toml": text}))
