"""Replay: the summary, the structure checks across entries, key introductions, worker processes."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cloister.audit.full_replay import replay_log
from cloister.audit.replay import ReplayResult
from cloister.audit.source import SourceSpec
from cloister.verify.attestation import TrustRoot
from cloister.verify.checkpoint import Checkpoint
from cloister.verify.entries import (
    OUTCOME_GRACE_MS,
    DecisionEntry,
    KeyEntry,
    OutcomeEntry,
    PolicyEntry,
    ServerEntry,
    encode_entry,
    parse_entry,
)
from cloister.verify.merkle import CompactRange, leaf_hash
from cloister.verify.note import sign_note
from tests.audit.clirun import cli
from tests.audit.conftest import trust
from tests.audit.logbuilder import LogServer, TestLog, synthetic_log, write_tiles


def test_the_summary_counts_what_parse_entry_reads(built: TestLog, tmp_path: Path) -> None:
    r = cli("audit", "replay", "--log", str(built.dir), *trust(built, tmp_path), "--no-progress", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    entries = [parse_entry(e) for e in built.entries]
    decisions = [e for e in entries if isinstance(e, DecisionEntry)]
    assert out["decisions"] == dict(Counter(d.decision for d in decisions))
    assert out["calls_by_agent"] == dict(Counter(d.agent or "(unauthenticated)" for d in decisions))
    assert out["calls_by_tool"] == dict(Counter(f"{d.server}/{d.tool}" for d in decisions))
    assert out["denials_by_code"] == dict(Counter(d.code for d in decisions if d.decision == "deny"))
    assert {"unknown-tool", "unauthenticated", "policy", "no-permit"} <= set(out["denials_by_code"])
    reasons = Counter((d.code, d.reason) for d in decisions if d.decision == "deny")
    assert {(x["code"], x["reason"]): x["count"] for x in out["denials_by_reason"]} == dict(reasons)
    assert out["outcomes"]["total"] == sum(isinstance(e, OutcomeEntry) for e in entries)
    keys = [i for i, e in enumerate(entries) if isinstance(e, KeyEntry)]
    assert [k["index"] for k in out["key_introductions"]] == keys
    assert all(k["verified"] for k in out["key_introductions"])
    assert out["key_introductions"][1]["previous_size"] == keys[1]
    assert [p["version"] for p in out["policy_versions"]] == [1]
    assert out["decoded"]["by_template"] + out["decoded"]["by_parser"] == len(entries)
    assert out["decoded"]["by_template"] > out["decoded"]["by_parser"]


def test_replay_over_http_uses_the_attested_checkpoint(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    r = cli("audit", "replay", "--log", server.url, *trust(built, tmp_path), "--no-progress", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["verified"] and out["signed_by"].startswith("audit.test/log+")
    assert out["consistency"]["status"] == "first"


def test_the_live_key_must_be_the_last_introduced_one(built: TestLog, log_copy: Path, tmp_path: Path) -> None:
    # Storage serves the log without its last key entry's enclave: a checkpoint from the old log key
    # cannot be attested by the current enclave, and vice versa. Here: an enclave whose key entry
    # is not in the log attests the log's checkpoint.
    intruder = TestLog(tmp_path / "intruder", nsm_dir=built.nsm_dir).start()
    assert intruder.core is not None
    core = intruder.core
    note = sign_note(
        Checkpoint(origin=built.origin, size=len(built.entries), root_hash=_root(built.entries)).to_text(),
        [core.note_signer],
    )

    def attest(nonce: bytes) -> tuple[bytes, bytes]:
        return core.nsm.attestation(user_data=core.binding(note).encode(), nonce=nonce), note

    with LogServer(log_copy, attest) as srv:
        r = cli("audit", "replay", "--log", srv.url, *trust(built, tmp_path), "--no-progress")
    assert r.code == 1
    assert "checkpoint: it is signed by the running enclave's key" in r.err
    assert "but the last key entry in the log (entry" in r.err


def _root(entries: list[bytes]) -> bytes:
    tree = CompactRange()
    for e in entries:
        tree.append(leaf_hash(e))
    return tree.root()


# --- A misbehaving enclave: well-signed entries whose structure is wrong -------------------


def _crafted(tmp_path: Path, make: object) -> tuple[TestLog, Path]:
    """A real start (key entry 0, policy entry 1), then entries from make(log), signed by the log key."""
    log = TestLog(tmp_path / "crafted").start()
    log.load_policy()
    assert log.core is not None and log.core.policy is not None
    log.entries += make(log)  # type: ignore[operator]
    note = sign_note(
        Checkpoint(origin=log.origin, size=len(log.entries), root_hash=_root(log.entries)).to_text(),
        [log.core.note_signer],
    )
    write_tiles(log.dir, log.entries, note)
    return log, log.dir


def _decision(log: TestLog, *, allow: bool = True, version: int | None = None, t: int = 1) -> bytes:
    assert log.core is not None and log.core.policy is not None
    ps = log.core.policy
    return encode_entry(
        DecisionEntry(
            time_ms=1_700_000_000_000 + t,
            agent="refund-bot",
            roles=("refund-agent",),
            issuer="cloister-dev",
            server="refunds",
            tool="customer_lookup",
            args_sha256=b"\x00" * 32,
            decision="allow" if allow else "deny",
            code="" if allow else "policy",
            reason="permitted" if allow else "forbidden",
            policies=(),
            policy_sha256=ps.sha256,
            policy_version=ps.version if version is None else version,
            request_id=f"q{t}",
            grant_nonce=bytes(16) if allow else None,
            grant_expiry_ms=1_700_000_060_000 if allow else None,
        )
    )


def _outcome(decision: int, t: int = 1) -> bytes:
    return encode_entry(
        OutcomeEntry(
            time_ms=1_700_000_000_000 + t, decision_index=decision, result_sha256=None, error="", duration_us=5
        )
    )


STRUCTURE_CASES = [
    (
        "outcome of an enforced deny",
        lambda log: [_decision(log, allow=False), _outcome(2)],
        "entry 3: outcome names entry 2, which is an enforced deny, not a decision that issued a grant",
    ),
    (
        "two outcomes for one decision",
        lambda log: [_decision(log), _outcome(2), _outcome(2, 2)],
        "entry 4: second outcome for decision 2",
    ),
    (
        "outcome before its decision",
        lambda log: [_outcome(3), _decision(log)],
        "entry 2: outcome names decision 3, which is not an earlier entry",
    ),
    (
        "outcome of a policy entry",
        lambda log: [_outcome(1)],
        "entry 2: outcome names entry 1, which is a policy entry, not a decision that issued a grant",
    ),
    (
        "decision under another policy version",
        lambda log: [_decision(log, version=7)],
        "entry 2: a decision under policy version 7",
    ),
    (
        "policy version going back",
        lambda log: [
            encode_entry(PolicyEntry(time_ms=1, bundle_sha256=b"\x01" * 32, version=1, signer="x", mode="enforce"))
        ],
        "entry 2: policy version 1 does not increase on version 1 (entry 1)",
    ),
    (
        "a second new-log key entry",
        lambda log: [_key_entry(log)],
        "entry 2: key entry does not verify: it starts a new log (no previous checkpoint), but 2 entries precede it",
    ),
    (
        "a key entry that claims another size",
        lambda log: [_key_entry(log, previous=(1, _root(log.entries[:1])))],
        "entry 2: key entry does not verify: it continues a checkpoint of size 1, but it is entry 2",
    ),
    (
        "a key entry that claims another root",
        lambda log: [_key_entry(log, previous=(2, b"\x07" * 32))],
        "entry 2: key entry does not verify: its previous root",
    ),
    (
        "a key entry whose document binds another key",
        lambda log: [_key_entry(log, swap_key=True, previous=(2, _root(log.entries)))],
        "entry 2: key entry does not verify: its attestation binds log key",
    ),
]


def _key_entry(log: TestLog, *, previous: tuple[int, bytes] | None = None, swap_key: bool = False) -> bytes:
    core = log.core
    assert core is not None
    doc = core.nsm.attestation(user_data=core.binding().encode(), nonce=None)
    log_key = bytes(32) if swap_key else core.log_public
    return encode_entry(
        KeyEntry(
            time_ms=1,
            attestation=doc,
            log_key=log_key,
            grant_key=core.grant_public,
            log_vkey=core.note_signer.vkey,
            previous_size=previous[0] if previous else None,
            previous_root=previous[1] if previous else None,
        )
    )


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in STRUCTURE_CASES], ids=[c[0] for c in STRUCTURE_CASES])
def test_structure_violations_are_reported(tmp_path: Path, make: object, message: str) -> None:
    log, d = _crafted(tmp_path, make)
    r = cli("audit", "replay", "--log", str(d), *trust(log, tmp_path / "state"), "--no-progress")
    assert r.code == 1, r.out + r.err
    assert message in r.err


def test_a_well_formed_crafted_log_verifies(tmp_path: Path) -> None:
    # The control for the cases above: a grant, its outcome, a server entry, a newer policy.
    def make(log: TestLog) -> list[bytes]:
        return [
            _decision(log),
            _outcome(2),
            encode_entry(ServerEntry(time_ms=1, server="refunds", kind="none", status="verified", detail="")),
        ]

    log, d = _crafted(tmp_path, make)
    r = cli("audit", "replay", "--log", str(d), *trust(log, tmp_path / "state"), "--no-progress")
    assert r.code == 0, r.err
    assert "refunds (none): verified x1" in r.out


def test_an_unverifiable_key_entry_taints_the_checkpoint(tmp_path: Path) -> None:
    log = TestLog(tmp_path / "x").start()
    log.load_policy()
    log.write()
    # Another trust root: the key entry's attestation does not verify, so nothing vouches for the key.
    other = TestLog(tmp_path / "y")
    r = cli(
        "audit",
        "replay",
        "--log",
        str(log.dir),
        "--trust-root",
        str(other.root_pem),
        "--state",
        str(tmp_path / "s"),
        "--no-progress",
    )
    assert r.code == 1
    assert "entry 0: key entry does not verify: wrong-root" in r.err
    assert "the last key entry (entry 0) does not verify, so no attested key introduces the key that signs it" in r.err


def test_an_empty_storage_directory_is_a_clear_error(tmp_path: Path, built: TestLog) -> None:
    (tmp_path / "empty").mkdir()
    r = cli("audit", "replay", "--log", str(tmp_path / "empty"), *trust(built, tmp_path), "--no-progress")
    assert r.code == 1
    assert "checkpoint: not found" in r.err


# --- Worker processes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> TestLog:
    """~17k entries: more than the 64 bundles from which replay uses worker processes."""
    return synthetic_log(tmp_path_factory.mktemp("big"), 64 * 256 + 300)


def _replay(log: TestLog, jobs: int):  # type: ignore[no-untyped-def]
    from cloister.audit import replay

    replay._worker_state.clear()
    return replay_log(
        SourceSpec(str(log.dir)),
        now=datetime.now(UTC),
        nonce=os.urandom(16),
        root=TrustRoot.from_pem(log.root_pem.read_bytes()),
        jobs=jobs,
    )


def test_worker_processes_give_the_same_result(big: TestLog) -> None:
    from cloister.audit import replay

    one = _replay(big, 1)
    assert "templates" in replay._worker_state  # decoded here
    two = _replay(big, 2)
    assert "templates" not in replay._worker_state  # decoded by the workers
    assert one.ok and two.ok
    assert one.result.root == two.result.root
    a, b = one.result.summary, two.result.summary
    assert (a.decisions, a.by_agent, a.by_tool, a.denials, a.deny_reasons, a.outcomes) == (
        b.decisions,
        b.by_agent,
        b.by_tool,
        b.denials,
        b.deny_reasons,
        b.outcomes,
    )
    assert sum(a.decisions.values()) + a.outcomes + 2 == len(big.entries)


def test_worker_processes_report_problems_with_their_location(big: TestLog, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "log"
    shutil.copytree(big.dir, d)
    bundle = d / "tile/entries/050"
    data = bytearray(bundle.read_bytes())
    data[100] ^= 1
    bundle.write_bytes(bytes(data))
    r = cli("audit", "replay", "--log", str(d), *trust(big, tmp_path / "s"), "--no-progress", "--jobs", "2")
    assert r.code == 1
    assert "tile/0/050: " in r.err


def test_the_progress_bar_draws_only_on_a_terminal() -> None:
    import io

    from cloister.audit.render import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    bar = Progress(True, tty)
    bar(0, 1000)
    bar(1000, 1000)
    bar.close()
    assert "100.0%  1,000/1,000 entries" in tty.getvalue() and tty.getvalue().endswith("\n")
    for stream, enabled in ((io.StringIO(), True), (Terminal(), False)):
        bar = Progress(enabled, stream)
        bar(5, 10)
        bar.close()
        assert stream.getvalue() == ""


# --- Allowed decisions without an outcome -------------------------------------------------------

GRANT_EXPIRY_MS = 1_700_000_060_000  # what _decision's grants say
WINDOW_END_T = GRANT_EXPIRY_MS + OUTCOME_GRACE_MS - 1_700_000_000_000  # _decision's t at the window's end


def _later(t: int) -> bytes:
    """An entry at 1_700_000_000_000 + t that closes nothing: it only moves the log's time on."""
    return encode_entry(
        ServerEntry(time_ms=1_700_000_000_000 + t, server="refunds", kind="none", status="verified", detail="")
    )


def _replay_at(log: TestLog, now: datetime) -> ReplayResult:
    return replay_log(
        SourceSpec(str(log.dir)), now=now, nonce=os.urandom(16), root=TrustRoot.from_pem(log.root_pem.read_bytes())
    ).result


AFTER_ALL = datetime(2024, 1, 1, tzinfo=UTC)  # later than every entry of these logs


def test_an_allowed_decision_without_an_outcome_past_its_window_is_a_problem(tmp_path: Path) -> None:
    # Decision 2 never got an outcome; decision 3 did; the log goes on past decision 2's window.
    log, d = _crafted(
        tmp_path, lambda log: [_decision(log), _decision(log, t=2), _outcome(3, 3), _later(WINDOW_END_T + 1)]
    )
    result = _replay_at(log, AFTER_ALL)
    assert (result.missing_outcomes, result.missing_outcome_indexes, result.open_decisions) == (1, [2], 0)
    assert [str(p) for p in result.problems] == [
        "entry 2: allowed decision 2 has no outcome, and none can come: its grant expired at "
        "2023-11-14T22:14:20Z, more than 15 minutes before the log's last entry (2023-11-14T22:29:20Z)"
    ]
    r = cli("audit", "replay", "--log", str(d), *trust(log, tmp_path / "state"), "--no-progress", "--json")
    assert r.code == 1, r.err
    out = json.loads(r.out)
    assert not out["verified"] and not out["ok"]
    assert (out["missing_outcomes"], out["missing_outcome_indexes"], out["open_decisions"]) == (1, [2], 0)
    assert "allowed decision 2 has no outcome" in r.err and "FAILED: 1 problem(s)" in r.err


@pytest.mark.parametrize(
    ("last_t", "now"),
    [
        (WINDOW_END_T, AFTER_ALL),  # the log's last entry is at the window's very end
        (WINDOW_END_T + 1, datetime.fromtimestamp(GRANT_EXPIRY_MS / 1000, UTC)),  # judged as of an earlier now
    ],
    ids=["within the window", "as of an earlier now"],
)
def test_decisions_still_within_their_outcome_window_are_open(tmp_path: Path, last_t: int, now: datetime) -> None:
    log, _ = _crafted(tmp_path, lambda log: [_decision(log), _decision(log, t=2), _outcome(3, 3), _later(last_t)])
    result = _replay_at(log, now)
    assert result.problem_count == 0, result.problems
    assert (result.missing_outcomes, result.open_decisions) == (0, 1)
    assert result.outcomes_as_of_ms == min(1_700_000_000_000 + last_t, int(now.timestamp() * 1000))


def test_an_open_decision_still_verifies_and_is_counted(tmp_path: Path) -> None:
    log, d = _crafted(tmp_path, lambda log: [_decision(log), _later(5)])
    r = cli("audit", "replay", "--log", str(d), *trust(log, tmp_path / "state"), "--no-progress", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["verified"] and (out["missing_outcomes"], out["open_decisions"]) == (0, 1)
