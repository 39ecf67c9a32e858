"""A fresh enclave continues a stored log only when everything it is given proves out."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cloister.enclave.core import EnclaveCore, PolicyRefused
from cloister.enclave.resume import ResumeRefused
from cloister.verify.entries import KeyEntry, parse_entry
from cloister.verify.merkle import compact_range_hashes, inclusion_proof, leaf_hash, node_hash
from tests.world import World, make_world


def node_source(log: list[bytes]):  # type: ignore[no-untyped-def]
    levels = [[leaf_hash(e) for e in log]]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        levels.append([node_hash(prev[i], prev[i + 1]) for i in range(0, len(prev) - 1, 2)])
    return lambda level, index: levels[level][index]


def material(w: World, start: int | None = None, **over: object) -> dict[str, object]:
    log = w.log
    n = len(log)
    get = node_source(log)
    s = n if start is None else start
    key_index = max(i for i, e in enumerate(log) if isinstance(parse_entry(e), KeyEntry))
    m: dict[str, object] = dict(
        checkpoint=w.checkpoints[-1],
        range_size=s,
        range_hashes=compact_range_hashes(s, get),
        entries=log[s:],
        key_entry=log[key_index],
        key_entry_index=key_index,
        key_entry_proof=inclusion_proof(key_index, n, get),
        boundary_entry=log[s - 1] if s else b"",
        boundary_proof=inclusion_proof(s - 1, n, get) if s else [],
    )
    m.update(over)
    return m


def spend(w: World, core: EnclaveCore, amount: int) -> bool:
    tok = w.token("refund-bot", ["refund-agent"])
    v = core.authorize(
        token=tok,
        server="refunds",
        tool="refund.create",
        arguments_json=json.dumps({"customer_id": "c", "amount": amount}).encode(),
        request_id="",
        persisted_size=len(w.log),
    )
    w.persist(v.log)
    return v.allowed


@pytest.fixture
def w(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    for _ in range(10):
        assert spend(w, w.core, 1000)
    # Make sure the latest checkpoint covers everything stored, as the parent guarantees.
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    return w


def test_resume_continues_the_log_and_keeps_budgets(w: World) -> None:
    n = len(w.log)
    fresh = w.new_core()
    w.persist(fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    intro = parse_entry(w.log[n])
    assert isinstance(intro, KeyEntry) and intro.previous_size == n and intro.log_key == fresh.log_public
    # One log key per origin (sealed): the same key; a new grant key at every start.
    assert fresh.log_public == w.core.log_public and fresh.grant_public != w.core.grant_public
    # The same bundle version is accepted again (same hash) without a new policy entry...
    version, _, a = fresh.load_policy(w.sign_bundle(1))
    w.persist(a)
    assert version == 1 and len(w.log) == n + 1
    # ...and the hourly budget spent before the restart still counts.
    assert not spend(w, fresh, 1000)


def test_resume_refuses_a_rollback_of_the_policy(w: World) -> None:
    w.persist(w.core.load_policy(w.sign_bundle(2))[2])
    w.checkpoints.append(w.core.sync(len(w.log)).checkpoint.note)
    fresh = w.new_core()
    w.persist(fresh.resume_log(**material(w, start=0)))  # type: ignore[arg-type]
    with pytest.raises(PolicyRefused, match="would roll it back"):
        fresh.load_policy(w.sign_bundle(1))


def test_resume_refuses_short_history_for_limits(w: World) -> None:
    fresh = w.new_core()
    w.persist(fresh.resume_log(**material(w, start=len(w.log) - 2)))  # type: ignore[arg-type]
    with pytest.raises(PolicyRefused, match="does not reach that far"):
        fresh.load_policy(w.sign_bundle(1))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (
            lambda w, m: m.update(entries=[*m["entries"][:-1], m["entries"][-1][:-1] + b"\x00"]),
            "do not hash to the checkpoint",
        ),
        (lambda w, m: m.update(entries=m["entries"][:-1]), "entries != checkpoint size"),
        (
            lambda w, m: m.update(checkpoint=w.checkpoints[-1].replace(b"cloister.test/log\n", b"other/log\n", 1)),
            "signature|origin|known key",
        ),
        (lambda w, m: m.update(key_entry_index=1), "inclusion|proof|root"),
        (lambda w, m: m.update(key_entry=w.log[1]), "is a PolicyEntry"),
        (lambda w, m: m.update(checkpoint=w.checkpoints[1]), "inclusion proof too long"),  # an older checkpoint
        (lambda w, m: m.update(range_size=5, entries=m["entries"][5:]), "popcount|hashes"),
    ],
)
def test_resume_refuses_storage_that_does_not_prove_out(w: World, tamper, message: str) -> None:  # type: ignore[no-untyped-def]
    m = material(w, start=0)
    tamper(w, m)
    with pytest.raises(ResumeRefused, match=message):
        w.new_core().resume_log(**m)  # type: ignore[arg-type]


def test_resume_refuses_a_log_signed_by_another_image(w: World, tmp_path: Path) -> None:
    # The same log, continued by an enclave whose measured config differs: its PCR0 differs.
    w.config_path.write_text(w.config_path.read_text() + "# a different image\n")
    with pytest.raises(ResumeRefused, match="neither this image nor a predecessor"):
        w.new_core().resume_log(**material(w, start=0))  # type: ignore[arg-type]


def test_nothing_is_appended_between_a_resume_and_its_key_entry(w: World) -> None:
    """Regression (tests/e2e/test_crash.py, seed 1 under faketime): another RPC thread that saw
    the resumed core READY appended its entry before the key entry, which then did not follow
    the state it continues. The key entry now goes first; the other append waits for it."""
    n = len(w.log)
    fresh = w.new_core()
    other: list[int] = []
    make_key_entry = fresh._key_entry

    def key_entry_while_another_thread_appends(previous: Any) -> Any:
        # As an outcome arriving the moment the state is READY: an append from another thread.
        seq = fresh.sequencer
        assert seq is not None
        thread = threading.Thread(target=lambda: other.append(fresh._log(seq, [make_key_entry(None)])[0]))
        thread.start()
        for _ in range(50):  # give it 0.25 s to get in first (polled: faketime-safe)
            if other:
                break
            time.sleep(0.005)
        threads.append(thread)
        return make_key_entry(previous)

    threads: list[threading.Thread] = []
    fresh._key_entry = key_entry_while_another_thread_appends  # type: ignore[method-assign]
    append = fresh.resume_log(**material(w, start=0))  # type: ignore[arg-type]
    for t in threads:
        t.join(5)
    assert append.first_index == n  # the key entry directly follows the resumed state...
    intro = parse_entry(append.entries[-1])
    assert isinstance(intro, KeyEntry) and intro.previous_size == n
    assert other == [n + 1]  # ...and the other thread's append came after it
