"""`cloister audit replay` reads snapshot entries and checks where they sit and what they claim
(docs/decisions/0016)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloister.verify.entries import SnapshotEntry, encode_entry, parse_entry
from tests.audit.clirun import cli
from tests.audit.conftest import trust
from tests.audit.logbuilder import TestLog
from tests.audit.test_replay import _crafted, _decision


def test_a_log_with_snapshots_and_a_resume_from_one_replays_clean(tmp_path: Path) -> None:
    log = TestLog(tmp_path / "log").start()
    log.load_policy()
    assert log.core is not None
    log.core.snapshot_interval = 6
    log.typical_traffic(4)
    log.restart()
    log.typical_traffic(2)
    log.write()
    kinds = [parse_entry(e) for e in log.entries]
    assert sum(isinstance(e, SnapshotEntry) for e in kinds) >= 3
    r = cli("audit", "replay", "--log", str(log.dir), *trust(log, tmp_path / "state"), "--no-progress")
    assert r.code == 0, r.out + r.err


def _snapshot(
    log: TestLog, upto: int, *, part: int = 0, parts: int = 1, open_from: int | None = None, policy: bool = True
) -> bytes:
    assert log.core is not None and log.core.policy is not None
    ps = log.core.policy
    return encode_entry(
        SnapshotEntry(
            time_ms=1_700_000_000_000 + 10,
            upto=upto,
            part=part,
            parts=parts,
            open_from=upto if open_from is None else open_from,
            policy_version=ps.version if policy else None,
            policy_sha256=ps.sha256 if policy else None,
            windows=(),
        )
    )


def _other_policy(log: TestLog) -> bytes:
    assert log.core is not None and log.core.policy is not None
    e = parse_entry(_snapshot(log, 2))
    assert isinstance(e, SnapshotEntry)
    return encode_entry(SnapshotEntry(**{**e.__dict__, "policy_version": 9}))


CASES = [
    (
        "a snapshot that sits elsewhere",
        lambda log: [_snapshot(log, 5)],
        "entry 2: a snapshot that says it sits at entry 5",
    ),
    (
        "a part without its first",
        lambda log: [_snapshot(log, 2, part=1, parts=2)],
        "entry 2: snapshot part 1 of 2 that does not continue",
    ),
    (
        "parts with two headers",
        lambda log: [_snapshot(log, 2, parts=2), _snapshot(log, 2, part=1, parts=2, open_from=1)],
        "entry 3: snapshot part 1 of 2 that does not continue",
    ),
    ("another policy", lambda log: [_other_policy(log)], "entry 2: a snapshot that names policy version 9"),
    (
        "an open decision before open_from",
        # A decision whose grant is still in its outcome window at the snapshot, and no outcome ever.
        lambda log: [_decision(log, t=1), _snapshot(log, 3, open_from=3)],
        "the snapshot says no decision before entry 3 may still get an outcome, but decision 2 could",
    ),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_snapshots_that_do_not_agree_with_the_log_are_reported(tmp_path: Path, make: object, message: str) -> None:
    log, d = _crafted(tmp_path, make)
    r = cli("audit", "replay", "--log", str(d), *trust(log, tmp_path / "state"), "--no-progress")
    assert r.code == 1, r.out + r.err
    assert message in r.err


def test_well_placed_snapshots_are_not_problems(tmp_path: Path) -> None:
    def make(log: TestLog) -> list[bytes]:
        # A two-part snapshot, a decision, a snapshot cut short (parts=2, one stored), one more.
        return [
            _snapshot(log, 2, parts=2),
            _snapshot(log, 2, part=1, parts=2),
            _decision(log, allow=False),
            _snapshot(log, 5, parts=2),
            _decision(log, allow=False),
            _snapshot(log, 7),
        ]

    log, d = _crafted(tmp_path, make)
    r = cli("audit", "replay", "--log", str(d), *trust(log, tmp_path / "state"), "--no-progress")
    assert r.code == 0, r.out + r.err
