"""A signed bundle names the log it is for and a not-after time; the enclave checks both at load.

Issue 9 item 4: before, a bundle named no deployment, so with an admin key shared between
staging and production, a staging bundle with a higher version loaded in production. The
decision is docs/decisions/0012-bundle-scope-and-names.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloister.enclave.core import EnclaveCore, PolicyRefused
from cloister.verify.entries import PolicyEntry, parse_entry
from tests.enclave.test_resume import material
from tests.world import ORIGIN, World, make_world


@pytest.fixture
def w(tmp_path: Path) -> World:
    return make_world(tmp_path)


def lookup(w: World, core: EnclaveCore) -> bool:
    v = core.authorize(
        token=w.token("refund-bot", ["refund-agent"]),
        server="refunds",
        tool="customer_lookup",
        arguments_json=json.dumps({"customer_id": "c-1"}).encode(),
        request_id="",
        persisted_size=len(w.log),
    )
    w.persist(v.log)
    return v.allowed


def policy_entries(w: World) -> list[PolicyEntry]:
    return [e for e in map(parse_entry, w.log) if isinstance(e, PolicyEntry)]


def test_staging_bundle_cannot_be_loaded_in_production(w: World) -> None:
    # The same admin key signs for staging and production; staging is at a higher version.
    assert w.core.config.origin == ORIGIN == "cloister.test/log"
    before = len(w.log)
    staging = w.sign_bundle(7, {"bundle.toml": '[bundle]\nname = "staging"\nmode = "log-only"\n'}, origin="staging/log")
    with pytest.raises(
        PolicyRefused, match=r"bundle is for the log 'staging/log', not this one \('cloister.test/log'\)"
    ):
        w.core.load_policy(staging)
    # Nothing changed: the production bundle stays in force, nothing was logged.
    assert w.core.policy is not None and w.core.policy.version == 1
    assert len(w.log) == before and [e.version for e in policy_entries(w)] == [1]
    # A name that differs only in case or a trailing slash is another log too.
    for near in ("Cloister.test/log", "cloister.test/log/", "cloister.test/lo"):
        with pytest.raises(PolicyRefused, match="bundle is for the log"):
            w.core.load_policy(w.sign_bundle(7, origin=near))
    # The same content signed for this log loads.
    assert w.core.load_policy(w.sign_bundle(7))[0] == 7


def test_expired_bundle_is_refused(w: World) -> None:
    now = w.clock.seconds()
    expiring = w.sign_bundle(2, not_after=now + 60)
    w.clock.advance(61)
    with pytest.raises(PolicyRefused, match=r"bundle expired: not after .*Z, and it is .*Z; sign it again"):
        w.core.load_policy(expiring)
    assert w.core.policy is not None and w.core.policy.version == 1
    # Loadable up to and including its not-after second (the enclave's clock, not the parent's).
    last_second = w.sign_bundle(2, not_after=w.clock.seconds())
    w.clock.advance(0.999)
    assert w.core.load_policy(last_second)[0] == 2


def test_a_bundle_in_force_keeps_deciding_past_its_not_after_but_is_not_reloaded(w: World) -> None:
    w.persist(w.core.load_policy(w.sign_bundle(2, not_after=w.clock.seconds() + 3600))[2])
    w.clock.advance(2 * 3600)
    # Still in force in the running enclave: expiry is checked when a bundle is loaded.
    assert lookup(w, w.core)
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    # A restarted enclave resumes the log but cannot load the expired bundle again; it decides
    # nothing until a new version is pushed.
    fresh = w.new_core()
    w.persist(fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    with pytest.raises(PolicyRefused, match="bundle expired"):
        fresh.load_policy(w.sign_bundle(2, not_after=w.clock.seconds() - 3600))
    assert fresh.policy is None
    w.persist(fresh.load_policy(w.sign_bundle(3))[2])
    assert lookup(w, fresh)
