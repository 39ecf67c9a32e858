"""GrantGuard, as an upstream server runs it: a relay that skips the enclave, replays a grant (at
the same process, another replica or another instance), changes the arguments or the x402
payment after the grant is refused."""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from cloister.upstream.guard import GRANT_REFUSED, FileNonceStore, GrantGuard, NonceStore
from cloister.verify.attestation import TrustRoot
from cloister.verify.grant import ATTESTATION_META_KEY, GRANT_META_KEY, GrantError
from cloister.verify.x402 import X402_META_KEY
from tests.world import World, make_world

REFUNDS = "refunds-eu-1"  # the example bundle's instance ids
RESEARCH = "research-us-1"
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"


@pytest.fixture
def w(tmp_path: Path) -> World:
    return make_world(tmp_path)


def guard_for(
    w: World, server: str = "refunds", *, instance: str = REFUNDS, nonces: NonceStore | None = None
) -> GrantGuard:
    root = TrustRoot.from_pem((w.root / "mock-nsm" / "root.pem").read_bytes())
    return GrantGuard(
        server,
        trust_root=root,
        expected_pcrs={0: w.core.pcrs[0]},
        instance=instance,
        nonces=nonces,
        clock=lambda: datetime.fromtimestamp(w.clock.ms / 1000, UTC),
    )


def grant_params(w: World, args: dict[str, object]) -> dict[str, Any]:
    v = w.core.authorize(
        token=w.token("refund-bot", ["refund-agent"]),
        server="refunds",
        tool="customer_lookup",
        arguments_json=json.dumps(args).encode(),
        request_id="",
        persisted_size=len(w.log),
    )
    w.persist(v.log)
    assert v.allowed
    return call_params(w, "customer_lookup", args, v.grant)


def call_params(w: World, tool: str, args: dict[str, object], grant: bytes) -> dict[str, Any]:
    doc, _ = w.core.attest(b"n" * 16, include_checkpoint=False)
    return {
        "name": tool,
        "arguments": args,
        "_meta": {
            GRANT_META_KEY: base64.b64encode(grant).decode(),
            ATTESTATION_META_KEY: base64.b64encode(doc).decode(),
        },
    }


def refused(guard: GrantGuard, params: dict[str, Any], reason: str, match: str = "") -> None:
    with pytest.raises(MCPError) as err:
        guard.check(params)
    assert err.value.code == GRANT_REFUSED and err.value.data["reason"] == reason, err.value.message
    assert match in err.value.message


def test_a_valid_grant_is_honoured_once(w: World) -> None:
    guard = guard_for(w)
    params = grant_params(w, {"customer_id": "cus_1001"})
    guard.check(params)
    refused(guard, params, "replayed")


def test_skipping_the_enclave_is_refused(w: World) -> None:
    refused(guard_for(w), {"name": "customer_lookup", "arguments": {}}, "missing")


def test_changed_arguments_are_refused(w: World) -> None:
    params = grant_params(w, {"customer_id": "cus_1001"})
    params["arguments"] = {"customer_id": "cus_1002"}
    refused(guard_for(w), params, "wrong-arguments")


def test_another_tool_is_refused(w: World) -> None:
    params = grant_params(w, {"customer_id": "cus_1001"})
    params["name"] = "refund.create"
    refused(guard_for(w), params, "wrong-call")


def test_expired_grant_is_refused(w: World) -> None:
    params = grant_params(w, {"customer_id": "cus_1001"})
    w.clock.advance(61)
    refused(guard_for(w), params, "expired")


def test_an_enclave_with_other_code_is_not_trusted(w: World) -> None:
    root = TrustRoot.from_pem((w.root / "mock-nsm" / "root.pem").read_bytes())
    guard = GrantGuard(
        "refunds",
        trust_root=root,
        expected_pcrs={0: b"\x01" * 48},
        instance=REFUNDS,
        clock=lambda: datetime.fromtimestamp(w.clock.ms / 1000, UTC),
    )
    refused(guard, grant_params(w, {"customer_id": "cus_1001"}), "untrusted-enclave")


def test_a_grant_signed_by_another_enclave_is_refused(w: World, tmp_path: Path) -> None:
    other = make_world(tmp_path / "other")
    params = grant_params(other, {"customer_id": "cus_1001"})
    doc, _ = w.core.attest(b"n" * 16, include_checkpoint=False)
    params["_meta"][ATTESTATION_META_KEY] = base64.b64encode(doc).decode()
    refused(guard_for(w), params, "unknown-key")


# ---- single use across replicas and instances (issue 9, item 4) -----------------------------------------


def test_replayed_grant_at_another_replica_is_refused(w: World, tmp_path: Path) -> None:
    """Two replicas of refunds-eu-1 (and one restarted later) share a nonce store on their host: the
    relay forwards one grant to each, and only the first honours it."""
    nonces = tmp_path / "refunds-eu-1.nonces"
    first, second = guard_for(w, nonces=FileNonceStore(nonces)), guard_for(w, nonces=FileNonceStore(nonces))
    params = grant_params(w, {"customer_id": "cus_1001"})
    first.check(params)
    refused(second, params, "replayed", "grant was already used")
    w.clock.advance(30)  # a replica restarted within the grant's lifetime: the store is on disk
    refused(guard_for(w, nonces=FileNonceStore(nonces)), params, "replayed")
    # Another grant is honoured once too, by whichever replica gets it first.
    other = grant_params(w, {"customer_id": "cus_1002"})
    second.check(other)
    refused(first, other, "replayed")


def test_grant_for_another_instance_is_refused(w: World) -> None:
    """The bundle binds refunds' grants to instance refunds-eu-1: an instance with another id (a
    staging copy, another region) refuses them, and so does a guard that names no instance."""
    params = grant_params(w, {"customer_id": "cus_1001"})
    refused(guard_for(w, instance="refunds-us-1"), params, "wrong-audience", "not 'refunds-us-1'")
    refused(guard_for(w, instance=""), params, "wrong-audience", "this upstream names no instance")
    guard_for(w).check(params)  # refunds-eu-1 itself
    # A bundle that names no instance for refunds gives grants bound to none, which an upstream
    # configured as an instance refuses rather than honour them at every instance.
    entities = (w.bundle_dir / "entities.toml").read_text().replace(f'instance = "{REFUNDS}"\n', "")
    w.persist(w.core.load_policy(w.sign_bundle(2, {"entities.toml": entities}))[2])
    unbound = grant_params(w, {"customer_id": "cus_1001"})
    refused(guard_for(w), unbound, "wrong-audience", "bound to no upstream instance")
    guard_for(w, instance="").check(unbound)


def paid_search(w: World, payment: dict[str, Any] | None) -> dict[str, Any]:
    """What the enclave grants research-bot for a deep_search with this payment, as the upstream gets it."""
    v = w.core.authorize(
        token=w.token("research-bot", ["research-agent"]),
        server="research",
        tool="deep_search",
        arguments_json=b'{"query": "q"}',
        request_id="",
        persisted_size=len(w.log),
        payment=json.dumps(payment).encode() if payment is not None else b"",
    )
    w.persist(v.log)
    assert v.allowed, v.reason
    params = call_params(w, "deep_search", {"query": "q"}, v.grant)
    if payment is not None:
        params["_meta"][X402_META_KEY] = payment
    return params


def usdc(value: str, nonce: str, now_s: int) -> dict[str, Any]:
    auth = {
        "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66",
        "to": PAY_TO,
        "value": value,
        "validAfter": str(now_s - 60),
        "validBefore": str(now_s + 600),
        "nonce": "0x" + nonce * 32,
    }
    accepted = {"scheme": "exact", "network": "eip155:84532", "amount": value, "asset": USDC, "payTo": PAY_TO}
    return {"x402Version": 2, "accepted": accepted, "payload": {"signature": "0x" + "2d" * 65, "authorization": auth}}


def test_call_with_a_different_payment_than_granted_is_refused(w: World) -> None:
    """A host between relay and upstream swaps the payment after the enclave charged it: the grant
    binds the payment's hash and amount, so research refuses the call."""
    now = w.clock.seconds()
    granted = paid_search(w, usdc("50000", "a1", now))  # 0.05 USDC, charged against the 0.10 cap
    guard = guard_for(w, "research", instance=RESEARCH)
    for swapped in (usdc("250000", "a1", now), usdc("50000", "b2", now)):  # 0.25; or another 0.05
        refused(guard, {**granted, "_meta": {**granted["_meta"], X402_META_KEY: swapped}}, "wrong-payment", "differs")
    unpaid_meta = {k: v for k, v in granted["_meta"].items() if k != X402_META_KEY}
    refused(guard, {**granted, "_meta": unpaid_meta}, "wrong-payment", "binds an x402 payment (charged 0.05)")
    # A grant for an unpaid call (the upstream's chance to answer -32402) carries no payment either.
    unpaid = paid_search(w, None)
    with_payment = {**unpaid, "_meta": {**unpaid["_meta"], X402_META_KEY: usdc("250000", "c3", now)}}
    refused(guard, with_payment, "wrong-payment", "the enclave charged no payment for this call")
    guard.check(granted)  # exactly the payment granted: honoured (once)
    refused(guard, granted, "replayed")


# ---- FileNonceStore ----------------------------------------------------------------------------------------


def test_a_file_nonce_store_redeems_each_nonce_once_under_contention(tmp_path: Path) -> None:
    stores = [FileNonceStore(tmp_path / "nonces") for _ in range(4)]
    wins: list[int] = []
    start = threading.Barrier(8)

    def race(i: int) -> None:
        start.wait()
        for n in range(50):
            if stores[i % 4].redeem(n.to_bytes(16, "big"), 2_000, 1_000):
                wins.append(n)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == list(range(50))


def test_a_file_nonce_store_forgets_a_nonce_only_after_its_grant_expired(tmp_path: Path) -> None:
    store = FileNonceStore(tmp_path / "nonces", sweep_every_ms=0, keep_ms=60_000)
    assert store.redeem(b"\x01" * 16, 10_000, 1_000)
    (tmp_path / "nonces" / ("02" * 16)).write_bytes(b"")  # being written by another process
    assert not store.redeem(b"\x01" * 16, 10_000, 69_000)  # expired, but within the clock slack: kept
    assert store.redeem(b"\x03" * 16, 200_000, 70_000)  # this sweep deletes the first
    assert sorted(p.name for p in (tmp_path / "nonces").iterdir()) == ["02" * 16, "03" * 16]


def test_a_file_nonce_store_that_cannot_write_refuses(tmp_path: Path) -> None:
    store = FileNonceStore(tmp_path / "nonces", sweep_every_ms=10**9)
    assert store.redeem(b"\x01" * 16, 10_000, 1_000)  # swept now; the next sweep is far away
    sweeping = FileNonceStore(tmp_path / "nonces")
    (tmp_path / "nonces" / ("01" * 16)).unlink()
    (tmp_path / "nonces").rmdir()
    (tmp_path / "nonces").write_text("not a directory")  # the store is gone: nothing can be recorded
    for s, message in ((store, "cannot record the grant's nonce"), (sweeping, "cannot read the redeemed nonces")):
        with pytest.raises(GrantError, match=message) as err:
            s.redeem(b"\x02" * 16, 10_000, 1_000)
        assert err.value.reason == "replay-store-unavailable"
