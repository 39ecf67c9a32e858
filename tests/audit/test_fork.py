"""Forks: a log that shows a view inconsistent with one it signed before is reported loudly (exit 4).

The attacker here controls an enclave image the auditor trusts (same trust root, same PCRs) and
starts it again with the same origin: every attestation is valid, every checkpoint is properly
signed, and only the remembered checkpoint reveals the split view.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from cloister.verify.checkpoint import Checkpoint, parse_checkpoint
from cloister.verify.entries import OutcomeEntry, encode_entry, parse_entry
from cloister.verify.merkle import CompactRange, leaf_hash
from cloister.verify.note import parse_note, sign_note
from tests.audit.clirun import cli
from tests.audit.conftest import trust
from tests.audit.logbuilder import LogServer, TestLog, write_tiles


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


def _checkpoint(note: bytes) -> Checkpoint:
    return parse_checkpoint(parse_note(note).text)


def _rewritten(log: TestLog, tmp: Path, *, extra: int = 0) -> tuple[Path, bytes, TestLog]:
    """The same entries with one outcome rewritten (plus `extra` copies of it), signed by another
    enclave of the same image, whose attestation binds the forged checkpoint."""
    forger = TestLog(tmp / "forger", nsm_dir=log.nsm_dir).start()
    entries = list(log.entries)
    i = next(i for i, e in enumerate(entries) if isinstance(parse_entry(e), OutcomeEntry))
    o = parse_entry(entries[i])
    assert isinstance(o, OutcomeEntry)
    entries[i] = encode_entry(
        OutcomeEntry(
            time_ms=o.time_ms,
            decision_index=o.decision_index,
            result_sha256=b"\x02" * 32,
            error="",
            duration_us=o.duration_us,
        )
    )
    entries += [entries[i]] * extra
    tree = CompactRange()
    for e in entries:
        tree.append(leaf_hash(e))
    assert forger.core is not None
    note = sign_note(
        Checkpoint(origin=log.origin, size=len(entries), root_hash=tree.root()).to_text(), [forger.core.note_signer]
    )
    directory = tmp / "forged"
    write_tiles(directory, entries, note)
    return directory, note, forger


def _forged_attest(forger: TestLog, note: bytes):  # type: ignore[no-untyped-def]
    core = forger.core
    assert core is not None

    def attest(nonce: bytes) -> tuple[bytes, bytes]:
        return core.nsm.attestation(user_data=core.binding(note).encode(), nonce=nonce), note

    return attest


@pytest.fixture
def remembered(built: TestLog, tmp_path: Path) -> Path:
    """A state directory that remembers the built log's checkpoint."""
    state = tmp_path / "state"
    with LogServer(built.dir, built.attest) as srv:
        r = cli("audit", "checkpoint", "--log", srv.url, *trust(built, state))
        assert r.code == 0, r.err
    return state


def _assert_fork(r, old: Checkpoint, new: Checkpoint, reason: str, state: Path) -> None:  # type: ignore[no-untyped-def]
    assert r.code == 4, r.out + r.err
    assert f"FORK DETECTED: log '{old.origin}': {reason}" in r.err
    assert f"remembered: size {old.size} root {_b64(old.root_hash)}" in r.err
    assert f"served:     size {new.size} root {_b64(new.root_hash)}" in r.err
    folders = list((state / "forks").iterdir())
    assert len(folders) == 1
    assert {p.name for p in folders[0].iterdir()} == {"remembered.note", "served.note", "README.txt"}
    assert _checkpoint((folders[0] / "served.note").read_bytes()) == new
    # The fork did not replace what is remembered.
    (remembered_file,) = (state / "checkpoints").iterdir()
    assert json.loads(remembered_file.read_text())["size"] == old.size


def test_a_second_log_with_the_same_origin_is_a_fork(built: TestLog, remembered: Path, tmp_path: Path) -> None:
    other = TestLog(tmp_path / "other", nsm_dir=built.nsm_dir).start()
    other.load_policy()
    other.typical_traffic(40)
    other.write()
    assert len(other.entries) > len(built.entries)
    with LogServer(other.dir, other.attest) as srv:
        r = cli("audit", "checkpoint", "--log", srv.url, *trust(built, remembered))
        _assert_fork(
            r,
            _checkpoint(built.note),
            _checkpoint(other.note),
            f"the first {len(built.entries)} entries of the served tree hash to",
            remembered,
        )
        # Every later look still sees the fork: the remembered checkpoint is the first one.
        assert cli("audit", "inclusion", "--log", srv.url, *trust(built, remembered), "--index", "0").code == 4
    # A replay of the other log's storage (trusted through its own key entries) sees it too.
    r = cli("audit", "replay", "--log", str(other.dir), *trust(built, remembered), "--no-progress")
    assert r.code == 4 and "FORK DETECTED" in r.err


def test_a_smaller_log_is_a_fork(built: TestLog, remembered: Path, tmp_path: Path) -> None:
    other = TestLog(tmp_path / "other", nsm_dir=built.nsm_dir).start()
    other.load_policy()
    other.write()
    with LogServer(other.dir, other.attest) as srv:
        r = cli("audit", "checkpoint", "--log", srv.url, *trust(built, remembered))
    _assert_fork(
        r,
        _checkpoint(built.note),
        _checkpoint(other.note),
        f"the served tree has {len(other.entries)} entries, fewer than the {len(built.entries)}",
        remembered,
    )


def test_a_rewritten_history_of_the_same_size_is_a_fork(built: TestLog, remembered: Path, tmp_path: Path) -> None:
    directory, note, forger = _rewritten(built, tmp_path)
    with LogServer(directory, _forged_attest(forger, note)) as srv:
        r = cli("audit", "checkpoint", "--log", srv.url, *trust(built, remembered))
    _assert_fork(
        r,
        _checkpoint(built.note),
        _checkpoint(note),
        f"two different roots for the same size {len(built.entries)}",
        remembered,
    )


def test_a_rewritten_and_extended_history_is_a_fork(built: TestLog, remembered: Path, tmp_path: Path) -> None:
    directory, note, forger = _rewritten(built, tmp_path, extra=5)
    with LogServer(directory, _forged_attest(forger, note)) as srv:
        r = cli("audit", "checkpoint", "--log", srv.url, *trust(built, remembered))
    _assert_fork(
        r,
        _checkpoint(built.note),
        _checkpoint(note),
        f"the first {len(built.entries)} entries of the served tree hash to",
        remembered,
    )


def test_the_forged_log_verifies_for_a_fresh_auditor(built: TestLog, tmp_path: Path) -> None:
    # Without memory, a valid attestation is all there is: which is why checkpoints are remembered.
    directory, note, forger = _rewritten(built, tmp_path, extra=1)
    with LogServer(directory, _forged_attest(forger, note)) as srv:
        assert cli("audit", "checkpoint", "--log", srv.url, *trust(built, tmp_path / "fresh")).code == 0


# --- A log that grows honestly, across an enclave restart -----------------------------------


@pytest.fixture
def growing(tmp_path: Path) -> TestLog:
    log = TestLog(tmp_path / "growing").start()
    log.load_policy()
    log.typical_traffic(2)
    log.write()
    return log


def test_growth_and_restarts_are_consistent(growing: TestLog, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LogServer(growing.dir, growing.attest) as srv:
        first = cli("audit", "checkpoint", "--log", srv.url, *trust(growing, state), "--json")
        assert first.code == 0 and json.loads(first.out)["consistency"]["status"] == "first"
        growing.typical_traffic(3)
        growing.restart()  # a new enclave, new keys: trusted by measurement
        growing.typical_traffic(1)
        growing.write()
        r = cli("audit", "checkpoint", "--log", srv.url, *trust(growing, state), "--json")
        assert r.code == 0, r.err
        out = json.loads(r.out)
        assert out["consistency"]["status"] == "extended"
        assert out["consistency"]["remembered_size"] == json.loads(first.out)["size"]
        assert out["consistency"]["proof"]
    r = cli("audit", "replay", "--log", str(growing.dir), *trust(growing, state), "--no-progress")
    assert r.code == 0, r.err
    assert "same as the remembered checkpoint" in r.out


def test_tampered_tiles_during_a_consistency_check_are_not_a_fork(growing: TestLog, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LogServer(growing.dir, growing.attest) as srv:
        assert cli("audit", "checkpoint", "--log", srv.url, *trust(growing, state)).code == 0
        size = len(growing.entries)
        growing.typical_traffic(2)
        growing.write()
        tile = next((growing.dir / "tile" / "0").glob("000.p/*"))
        data = bytearray(tile.read_bytes())
        data[(size - 2) * 32] ^= 1  # a hash inside the remembered tree
        tile.write_bytes(bytes(data))
        r = cli("audit", "checkpoint", "--log", srv.url, *trust(growing, state))
    assert r.code == 1, r.err
    assert "do not match the served checkpoint itself" in r.err and "tile/0/000.p/" in r.err
    assert "FORK" not in r.err


def test_a_corrupt_state_file_is_reported(growing: TestLog, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LogServer(growing.dir, growing.attest) as srv:
        assert cli("audit", "checkpoint", "--log", srv.url, *trust(growing, state)).code == 0
        (f,) = (state / "checkpoints").iterdir()
        record = json.loads(f.read_text())
        record["size"] += 1
        f.write_text(json.dumps(record))
        r = cli("audit", "checkpoint", "--log", srv.url, *trust(growing, state))
    assert r.code == 1
    assert f"the remembered checkpoint {f} is corrupt" in r.err
