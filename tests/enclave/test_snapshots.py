"""Snapshots in the log, and a resume from the newest one in chunks (docs/decisions/0016)."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.enclave.core import EnclaveCore, PolicyRefused
from cloister.enclave.limits import MAX_WINDOWS, LimitBook, bucket_ms
from cloister.enclave.resume import ResumeRefused
from cloister.verify.entries import (
    MAX_SNAPSHOT_KEYS,
    SNAPSHOT_BUCKETS,
    DecisionEntry,
    SnapshotEntry,
    encode_entry,
    parse_entry,
)
from cloister.verify.errors import DecodeError
from tests.enclave.fastlog import AGENT, SERVER, TOOL, TailLog, fast_call, from_world, seal
from tests.enclave.test_limits import book, rate, spend
from tests.world import BUNDLE_VALIDITY_S, EPOCH, World, make_world

INTERVAL = 200
STEP_MS = 100  # 600 calls a minute: the example bundle's rate cap, so some calls are denied


def build(
    w: World, calls: int, *, interval: int = INTERVAL, keep: int = 5 * INTERVAL, full_tail: bool = False
) -> TailLog:
    """`calls` calls; with `full_tail`, more until the next snapshot is nearly due (the longest
    tail a resume reads)."""
    w.core.snapshot_interval = interval
    log = from_world(w, keep)
    n = 0
    while n < calls or (full_tail and log.size - w.core._snapshot_at < interval - 2):
        w.clock.advance(STEP_MS / 1000)
        fast_call(w.core, log, w.clock(), 1 + n % 7, n)
        n += 1
    seal(w.core, log)
    return log


def bundle(w: World) -> bytes:
    """The bundle the world loaded at its start, byte for byte (so the same hash)."""
    return w.sign_bundle(1, not_after=int(EPOCH.timestamp()) + BUNDLE_VALIDITY_S)


def resumed(
    w: World, log: TailLog, s: int | None = None, chunks: Iterator[tuple[int, list[bytes]]] | None = None
) -> EnclaveCore:
    s = log.snapshot_start() if s is None else s
    assert s is not None
    fresh = w.new_core()
    log.persist(fresh.resume_log_chunks(log.start(s), log.chunks(s) if chunks is None else chunks))
    log.persist(fresh.load_policy(bundle(w))[2])
    return fresh


def totals(core: EnclaveCore, now_ms: int) -> dict[tuple[str, str], Decimal]:
    assert core.policy is not None
    return core.policy.limits.window_totals(now_ms)


@pytest.fixture
def w(tmp_path: Path) -> World:
    return make_world(tmp_path)


def test_the_enclave_writes_a_snapshot_every_interval(w: World) -> None:
    log = build(w, 1000)
    snaps = [(i, parse_entry(log.entry(i))) for i in range(log.size - len(log.tail), log.size)]
    parts = [(i, e) for i, e in snaps if isinstance(e, SnapshotEntry)]
    assert len(parts) >= 4
    for i, e in parts:
        assert e.upto == i - e.part and e.policy_version == 1 and e.policy_sha256 == w.core.policy.sha256  # type: ignore[union-attr]
    # One before a decision, every INTERVAL entries or so (a call is a decision and an outcome).
    firsts = [i for i, e in parts if e.part == 0]
    assert all(INTERVAL <= b - a <= INTERVAL + 3 for a, b in itertools.pairwise(firsts))
    assert isinstance(parse_entry(log.entry(firsts[-1] + 1)), DecisionEntry)
    # The snapshot holds the live windows (folded), of both limits for the agent.
    last = parts[-1][1]
    assert {(lid, key) for lid, key, _ in last.windows} == {
        ("refund-bot-hourly-refunds", AGENT),
        ("refund-agent-call-rate", AGENT),
    }


def test_a_resume_from_the_newest_snapshot_rebuilds_the_live_budgets_exactly(w: World) -> None:
    log = build(w, 3000)
    live = totals(w.core, w.clock())
    s = log.snapshot_start()
    assert s is not None and log.size - s <= INTERVAL + 10  # only the tail after the snapshot is read
    fresh = resumed(w, log)
    assert totals(fresh, w.clock()) == live
    # And they decide alike from here on, over the windows' ends.
    assert fresh.policy is not None and w.core.policy is not None
    for step_s in (0, 1, 30, 61, 600, 3599, 3601):
        at = w.clock() + step_s * 1000
        for amount in (1, 50, 5000, 10000):
            args = {"customer_id": "c", "amount": amount}
            want = w.core.policy.limits.check(AGENT, SERVER, TOOL, args, at)
            got = fresh.policy.limits.check(AGENT, SERVER, TOOL, args, at)
            assert (got.ok, got.reason) == (want.ok, want.reason), (step_s, amount)


def test_folding_never_frees_budget_early() -> None:
    # A spend cap, many small charges: the folded window may count a charge longer, never shorter.
    b = book(spend("money", "agent", "1000", "1h", "argument:amount"))
    exact: list[tuple[int, Decimal]] = []
    t0 = 1_700_000_000_000
    for i in range(5 * SNAPSHOT_BUCKETS):
        t = t0 + i * 7919
        c = b.check("a", "s", "t", {"amount": 3}, t)
        if c.ok:
            b.charge("a", "s", "t", c.charges, t)
            exact.append((t, Decimal(3)))
    assert len(b._windows[("money", "a")].events) < 2 * SNAPSHOT_BUCKETS  # folded, bounded
    for dt in range(0, 3_700_000, 50_000):
        at = t0 + 5 * SNAPSHOT_BUCKETS * 7919 + dt
        held = sum((a for t, a in exact if t > at - 3_600_000), Decimal(0))
        w = b._windows[("money", "a")]
        w.expire(at - 3_600_000)
        assert (
            held
            <= w.total
            <= held + sum((a for t, a in exact if at - 3_600_000 - bucket_ms(3600) < t <= at - 3_600_000), Decimal(0))
        )


def test_resume_keeps_caps_across_restarts(w: World) -> None:
    # Long enough to exhaust the hourly spend cap: the restarted enclave allows and denies the
    # same calls as the one that stopped would have.
    log = build(w, 4000)
    fresh = resumed(w, log)
    assert fresh.policy is not None and w.core.policy is not None
    live_book, fresh_book = w.core.policy.limits, fresh.policy.limits
    assert not live_book.check(AGENT, SERVER, TOOL, {"amount": 10000}, w.clock()).ok
    seen = []
    for n in range(400):
        at = w.clock() + n * 20_000
        args = {"customer_id": "c", "amount": 3 + n % 11}
        want, got = live_book.check(AGENT, SERVER, TOOL, args, at), fresh_book.check(AGENT, SERVER, TOOL, args, at)
        assert got.ok == want.ok, n
        seen.append(got.ok)
        if got.ok:
            live_book.charge(AGENT, SERVER, TOOL, want.charges, at)
            fresh_book.charge(AGENT, SERVER, TOOL, got.charges, at)
    assert any(seen) and not all(seen)
    assert live_book.window_totals(at) == fresh_book.window_totals(at)


def test_a_tampered_snapshot_is_refused(w: World) -> None:
    log = build(w, 1000)
    s = log.snapshot_start()
    assert s is not None
    offset = s - (log.size - len(log.tail))
    snap = parse_entry(log.tail[offset])
    assert isinstance(snap, SnapshotEntry)
    lid, key, buckets = snap.windows[0]
    forged = SnapshotEntry(**{**snap.__dict__, "windows": ((lid, key, ((buckets[0][0], "0.5"),)), *snap.windows[1:])})
    log.tail[offset] = encode_entry(forged)
    with pytest.raises(ResumeRefused, match="do not hash to the checkpoint"):
        w.new_core().resume_log_chunks(log.start(s), log.chunks(s))


def test_a_snapshot_from_another_branch_is_refused(w: World, tmp_path: Path) -> None:
    log = build(w, 1000)
    other = make_world(tmp_path / "other")
    other_log = build(other, 1000)
    s = log.snapshot_start()
    assert s is not None
    theirs = other_log.snapshot_start()
    assert theirs is not None
    # Their snapshot (from their log), in place of ours at the same index.
    mine = s - (log.size - len(log.tail))
    log.tail[mine] = other_log.entry(theirs)
    with pytest.raises(ResumeRefused, match="do not hash to the checkpoint"):
        w.new_core().resume_log_chunks(log.start(s), log.chunks(s))


def test_an_omitted_snapshot_falls_back_to_history_and_budgets_are_not_reset(w: World) -> None:
    log = build(w, 1000)
    s = log.snapshot_start()
    assert s is not None
    # The host starts after the snapshot: nothing summarises what came before, so the first
    # bundle (whose windows reach back an hour) is refused rather than starting from empty budgets.
    fresh = w.new_core()
    log.persist(fresh.resume_log_chunks(log.start(s + 5), log.chunks(s + 5)))
    with pytest.raises(PolicyRefused, match="does not reach that far"):
        fresh.load_policy(bundle(w))


@pytest.mark.parametrize("how", ["swapped", "truncated", "gap", "overlap", "past the end", "too big"])
def test_chunks_out_of_order_or_truncated_are_refused(w: World, how: str) -> None:
    log = build(w, 600)
    s = log.size - 100  # a resume may start before the newest snapshot
    chunks = list(log.chunks(s, per=10))
    assert len(chunks) >= 3
    if how == "swapped":
        chunks[0], chunks[1] = chunks[1], chunks[0]
        match = "a chunk starts at entry"
    elif how == "truncated":
        chunks = chunks[:-1]
        match = "!= checkpoint size"
    elif how == "gap":
        del chunks[1]
        match = "a chunk starts at entry"
    elif how == "overlap":
        chunks.insert(1, chunks[0])
        match = "a chunk starts at entry"
    elif how == "past the end":
        chunks.append((log.size, [log.entry(log.size - 1)]))
        match = "were sent for a checkpoint of size"
    else:
        chunks = [(s, [log.entry(s)] * 5000)]
        match = "at most 4096"
    fresh = w.new_core()
    with pytest.raises(ResumeRefused, match=match):
        fresh.resume_log_chunks(log.start(s), iter(chunks))
    assert fresh.sequencer is None  # nothing installed


def test_history_must_reach_the_oldest_open_decision(w: World) -> None:
    # Decisions whose outcome never came stay open (grant expiry + 15 minutes): a resume must
    # start at the oldest, which the snapshot names, or it would refuse their outcomes.
    w.core.snapshot_interval = 50
    for _ in range(3):
        tok = w.token("refund-bot", ["refund-agent"])
        v = w.core.authorize(
            token=tok,
            server="refunds",
            tool="refund.create",
            arguments_json=json.dumps({"customer_id": "c", "amount": 1}).encode(),
            request_id="",
            persisted_size=len(w.log),
        )
        w.persist(v.log)
    open_index = len(w.log) - 1
    log = from_world(w, 10_000)
    for n in range(200):
        w.clock.advance(0.1)
        fast_call(w.core, log, w.clock(), 1, n)
    seal(w.core, log)
    s = log.snapshot_start()
    assert s is not None and s <= open_index - 2
    fresh = resumed(w, log)
    assert fresh.record_outcome(
        decision_index=open_index, result_sha256=None, error="", duration_us=1, paid_amount="", persisted_size=log.size
    )
    later = open_index + 1
    with pytest.raises(ResumeRefused, match="may still get an outcome"):
        w.new_core().resume_log_chunks(log.start(later), log.chunks(later))


def test_a_snapshot_cut_short_is_not_used(w: World) -> None:
    # The enclave stopped mid-append of a snapshot: the parts it left are not a snapshot; the
    # resume uses the one before (its history reaches back that far).
    log = build(w, 1000)
    s = log.snapshot_start()
    assert s is not None
    first = parse_entry(log.entry(s))
    assert isinstance(first, SnapshotEntry)
    cut = SnapshotEntry(**{**first.__dict__, "parts": 2})  # claims a second part that never came
    log.tail[s - (log.size - len(log.tail))] = encode_entry(cut)
    start_before = s - INTERVAL - 10
    verifier_point = w.new_core()
    # (The root no longer matches, so a real host could not do this; the verifier's rule is what
    # is checked here, on the parsed stream, through its own class.)
    from cloister.enclave.resume import ResumeVerifier

    v = ResumeVerifier(
        config=verifier_point.config,
        own_pcr0=verifier_point.pcrs[0],
        start=log.start(start_before),
        now_ms=w.clock(),
        max_open=10,
    )
    for first_index, entries in log.chunks(start_before):
        v.feed(first_index, entries)
    assert v._snapshot is not None and v._snapshot.index < s


def test_a_snapshot_waits_while_storage_lags(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # With the buffer of unpersisted entries over half full, a snapshot is postponed (a decision
    # refused for back-pressure after it would strand it); it comes once storage catches up.
    import cloister.enclave.core as core_module

    monkeypatch.setattr(core_module, "MAX_PENDING_ENTRIES", 100)
    w.core.snapshot_interval = 20
    log = from_world(w, 1000)
    for n in range(60):
        w.clock.advance(1)
        fast_call(w.core, log, w.clock(), 1, n, release=False)
    kinds = [type(parse_entry(log.entry(i))).__name__ for i in range(log.size)]
    firsts = [i for i, k in enumerate(kinds) if k == "SnapshotEntry"]
    assert firsts and max(firsts) < 50  # none once more than 50 entries wait
    assert w.core.sequencer is not None
    w.core.sequencer.release(log.size)  # the parent persisted everything
    fast_call(w.core, log, w.clock(), 1, 99)
    assert isinstance(parse_entry(log.entry(log.size - 3)), SnapshotEntry)


def test_the_key_cap_fails_closed_with_a_clear_reason() -> None:
    b: LimitBook = book(rate("calls", "agent", 5, "1m"))
    t = 1_700_000_000_000
    for i in range(MAX_WINDOWS):
        c = b.check(f"agent-{i}", "s", "t", {}, t)
        assert c.ok
        b.charge(f"agent-{i}", "s", "t", c.charges, t)
    c = b.check("one-too-many", "s", "t", {}, t)
    assert not c.ok and f"already tracks {MAX_WINDOWS} budgets" in c.reason
    # An agent that has a budget still gets its calls.
    assert b.check("agent-7", "s", "t", {}, t).ok
    # A snapshot of the full book fits the entry format's cap.
    assert len(b.snapshot(t)) == MAX_SNAPSHOT_KEYS
    # Once windows expire (folded: up to a bucket later than their charges), room comes back.
    assert not b.check("one-too-many", "s", "t", {}, t + 60_001).ok
    assert b.check("one-too-many", "s", "t", {}, t + 60_000 + bucket_ms(60)).ok


def test_a_snapshot_entry_over_the_caps_does_not_parse() -> None:
    row = ("calls", "a", ((1, "1"),))
    with pytest.raises(DecodeError, match="at most 4096 limit windows"):
        SnapshotEntry(
            time_ms=1, upto=1, part=0, parts=1, open_from=0, policy_version=None, policy_sha256=None,
            windows=(row,) * (MAX_SNAPSHOT_KEYS + 1),
        )  # fmt: skip
    many = tuple((i, "1") for i in range(1, SNAPSHOT_BUCKETS + 3))
    with pytest.raises(DecodeError, match="at most 65 buckets"):
        SnapshotEntry(
            time_ms=1, upto=1, part=0, parts=1, open_from=0, policy_version=None, policy_sha256=None,
            windows=(("calls", "a", many),),
        )  # fmt: skip
    with pytest.raises(DecodeError, match="part < parts"):
        SnapshotEntry(time_ms=1, upto=1, part=1, parts=1, open_from=0, policy_version=None, policy_sha256=None)


def _peak_resume(w: World, log: TailLog) -> int:
    s = log.snapshot_start()
    assert s is not None
    fresh = w.new_core()
    start = log.start(s)
    chunks = list(log.chunks(s))
    tracemalloc.start()
    try:
        fresh.resume_log_chunks(start, iter(chunks))
        fresh.load_policy(bundle(w))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_resume_after_50k_calls_is_as_small_as_after_2k(tmp_path: Path) -> None:
    # Several snapshots either way; both logs end with the longest tail a resume reads.
    small, big = make_world(tmp_path / "small"), make_world(tmp_path / "big")
    small_log = build(small, 2_000, interval=1_000, keep=3_000, full_tail=True)
    big_log = build(big, 50_000, interval=1_000, keep=3_000, full_tail=True)
    assert big_log.size > 20 * small_log.size // 2
    for log in (small_log, big_log):
        s = log.snapshot_start()
        assert s is not None and 990 <= log.size - s <= 1_000
    peak_small, peak_big = _peak_resume(small, small_log), _peak_resume(big, big_log)
    assert peak_big < 1.2 * peak_small, (peak_small, peak_big)
    # And the budgets came back as they were.
    fresh = resumed(big, big_log)
    assert totals(fresh, big.clock()) == totals(big.core, big.clock())


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(0, 90_000), st.integers(1, 9)), min_size=1, max_size=400),
    snapshot_every=st.integers(1, 200),
)
def test_folded_and_snapshotted_windows_never_allow_what_exact_ones_deny(
    steps: list[tuple[int, int]], snapshot_every: int
) -> None:
    # A spend cap of 100 per 10 minutes, many charges: the book that folds, and is snapshotted and
    # restored along the way (as across restarts), against an exact sliding window kept here.
    limits = spend("money", "agent", "100", "10m", "argument:amount")
    live = book(limits)
    window = 600_000
    exact: list[tuple[int, int]] = []
    t = 1_700_000_000_000
    for i, (dt, amount) in enumerate(steps):
        t += dt
        held = sum(a for at, a in exact if at > t - window)
        c = live.check("a", "s", "t", {"amount": amount}, t)
        assert not c.ok or held + amount <= 100  # never allows past the cap
        if c.ok:
            live.charge("a", "s", "t", c.charges, t)
            exact.append((t, amount))
        if i % snapshot_every == snapshot_every - 1:
            rows = live.snapshot(t)
            live = book(limits)
            live.restore(rows, t)
        # Bounded: folded windows hold at most 2 x SNAPSHOT_BUCKETS charges.
        assert all(len(w.events) < 2 * SNAPSHOT_BUCKETS for w in live._windows.values())
        # Counted at most one bucket longer than the exact window would count it.
        late = sum(a for at, a in exact if t - window - bucket_ms(600) < at)
        assert held <= sum(live.window_totals(t).values()) <= late or not exact
