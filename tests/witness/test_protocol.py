"""The add-checkpoint logic without HTTP: the spec's example body, the body cap, hostile bodies."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloister.verify.merkle import consistency_proof
from cloister.witness.protocol import MAX_BODY, Refused, Witness, parse_add_checkpoint
from cloister.witness.state import WitnessState

from .harness import Clock, TestLog, new_state

SPEC = Path(__file__).resolve().parents[1] / "fixtures" / "tlog" / "witness"
LOG = TestLog("log.test/a", 1)


def test_spec_example_request_body_parses() -> None:
    """tlog-witness §add-checkpoint, "Example request body" (C2SP/C2SP @ 5ba5ee83)."""
    request = parse_add_checkpoint((SPEC / "add_checkpoint_request_example.txt").read_bytes())
    assert request.old_size == 20852014
    assert [base64.b64encode(h).decode() for h in request.proof] == [
        "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=",
        "jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=",
        "5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=",
        "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=",
    ]
    assert (request.checkpoint.origin, request.checkpoint.size) == ("example.com/behind-the-sofa", 20852163)
    # The example's proof is illustrative: an RFC 6962 proof between these sizes has 18 hashes.
    assert len(consistency_proof(20852014, 20852163, lambda level, index: bytes(32))) == 18


@pytest.fixture(scope="module")
def witness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Witness]:
    state = WitnessState.open(new_state(tmp_path_factory.mktemp("w")), [LOG.origin])
    try:
        yield Witness(state, {LOG.origin: (LOG.signer.verifier,)}, Clock())
    finally:
        state.close()


def test_the_body_cap_holds_without_http(witness: Witness) -> None:
    response = witness.add_checkpoint(b"old 0\n\n" + b"x" * MAX_BODY)
    assert response.status == 413
    with pytest.raises(Refused) as info:
        parse_add_checkpoint(b"x" * (MAX_BODY + 1))
    assert info.value.status == 413


VALID = LOG.body(0, 3)
ALLOWED = {200, 400, 403, 404, 409, 422}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(0, len(VALID)),
    insert=st.binary(max_size=8) | st.sampled_from([b"\n", b"\n\n", b"\xe2\x80\x94 ", b"=", b"+", b"\x00", b"old "]),
    drop=st.integers(0, 4),
)
def test_hostile_bodies_get_a_status_never_an_exception(witness: Witness, cut: int, insert: bytes, drop: int) -> None:
    body = VALID[:cut] + insert + VALID[cut + drop :]
    response = witness.add_checkpoint(body)
    assert response.status in ALLOWED, (body, response)
    assert response.body.endswith(b"\n")
    if response.status != 200:
        assert b"Traceback" not in response.body and len(response.body) < 2000


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=600))
def test_random_bytes_are_refused_cleanly(witness: Witness, body: bytes) -> None:
    response = witness.add_checkpoint(body)
    assert response.status in ALLOWED - {200}
