"""The witness's state directory and its logs file: created safely, refused when damaged."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cloister.verify.cosignature import Ed25519CosignatureVerifier
from cloister.witness.config import load_logs
from cloister.witness.state import (
    CHECKPOINTS_DIR,
    KEY_FILE,
    WitnessSetupError,
    WitnessState,
    decode_private_key,
    encode_private_key,
    init_state,
    origin_hash,
    write_atomic,
)

from .harness import WITNESS_NAME, Clock, Served, TestLog, key, new_state

LOG = TestLog("log.test/a", 1)


def test_init_creates_a_private_key_and_prints_a_cosignature_vkey(tmp_path: Path) -> None:
    state_dir = tmp_path / "s"
    cosigner = init_state(state_dir, "witness.test/w9")
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / KEY_FILE).stat().st_mode) == 0o600
    assert (state_dir / CHECKPOINTS_DIR).is_dir()
    assert Ed25519CosignatureVerifier.from_vkey(cosigner.vkey).key_id == cosigner.key_id
    line = (state_dir / KEY_FILE).read_text()
    assert line.startswith(f"PRIVATE+KEY+witness.test/w9+{cosigner.key_id:08x}+")
    assert decode_private_key(line).vkey == cosigner.vkey
    assert [p.name for p in state_dir.iterdir() if p.name.startswith(".")] == []  # no temp file left
    # Two inits make two different keys; a second init of one directory is refused.
    assert init_state(tmp_path / "t", "witness.test/w9").vkey != cosigner.vkey
    with pytest.raises(WitnessSetupError, match="initialised"):
        init_state(state_dir, "witness.test/w9")
    assert decode_private_key((state_dir / KEY_FILE).read_text()).vkey == cosigner.vkey


def test_init_refuses_a_bad_name(tmp_path: Path) -> None:
    for name in ("", "has space", "a+b"):
        with pytest.raises(ValueError, match="witness name"):
            init_state(tmp_path / "s", name)


def test_key_file_format_round_trip_and_refusals() -> None:
    line = encode_private_key("w.test/x", key(3))
    assert decode_private_key(line).name == "w.test/x"
    prefix = line.rsplit("+", 1)[0]
    for bad in (
        "",
        "PRIVATE+KEY+w",
        line.replace("+KEY+", "+KYE+"),
        prefix + "+AQ==",
        line.replace("w.test/x", "w.test/y"),
    ):
        with pytest.raises(ValueError):
            decode_private_key(bad)


def test_open_refuses_a_missing_or_exposed_or_damaged_key(tmp_path: Path) -> None:
    with pytest.raises(WitnessSetupError, match="run `cloister witness init`"):
        WitnessState.open(tmp_path / "none", [])
    state_dir = new_state(tmp_path)
    (state_dir / KEY_FILE).chmod(0o644)
    with pytest.raises(WitnessSetupError, match="readable by others"):
        WitnessState.open(state_dir, [])
    (state_dir / KEY_FILE).chmod(0o600)
    (state_dir / KEY_FILE).write_text("PRIVATE+KEY+x+00000000+AAAA\n")
    with pytest.raises(WitnessSetupError, match="witness.key"):
        WitnessState.open(state_dir, [])


def test_one_process_per_state_directory(tmp_path: Path) -> None:
    state_dir = new_state(tmp_path)
    first = WitnessState.open(state_dir, [])
    with pytest.raises(WitnessSetupError, match="in use"):
        WitnessState.open(state_dir, [])
    first.close()
    WitnessState.open(state_dir, []).close()
    # A key put in place by hand (no checkpoints/ yet) is enough to start.
    (state_dir / CHECKPOINTS_DIR).rmdir()
    WitnessState.open(state_dir, []).close()
    assert (state_dir / CHECKPOINTS_DIR).is_dir()


def cosign_up_to(state_dir: Path, size: int) -> None:
    served = Served(state_dir, [LOG], Clock())
    try:
        assert served.post(LOG.body(0, size)).status == 200
    finally:
        served.stop()


def test_a_damaged_record_refuses_to_start(tmp_path: Path) -> None:
    """Forgetting a size would let a rollback through: a record that does not check stops the witness."""
    state_dir = new_state(tmp_path)
    cosign_up_to(state_dir, 4)
    record = state_dir / CHECKPOINTS_DIR / origin_hash(LOG.origin)
    good = record.read_bytes()
    WitnessState.open(state_dir, [LOG.origin]).close()
    for damaged, match in [
        (good[:-5], "damaged"),
        (good.replace(b"\n4\n", b"\n5\n"), "does not verify"),
        (good.rsplit(b"\xe2\x80\x94", 1)[0], "no cosignature by this witness"),
    ]:
        record.write_bytes(damaged)
        with pytest.raises(WitnessSetupError, match=match):
            WitnessState.open(state_dir, [LOG.origin])
    # Another witness's record, or another origin's, is not this one's.
    other = new_state(tmp_path / "other", seed=43)
    cosign_up_to(other, 4)
    record.write_bytes((other / CHECKPOINTS_DIR / origin_hash(LOG.origin)).read_bytes())
    with pytest.raises(WitnessSetupError, match="no cosignature by this witness"):
        WitnessState.open(state_dir, [LOG.origin])
    record.write_bytes(good)
    (state_dir / CHECKPOINTS_DIR / origin_hash("log.test/b")).write_bytes(good)
    with pytest.raises(WitnessSetupError, match="checkpoint of 'log.test/a'"):
        WitnessState.open(state_dir, [LOG.origin, "log.test/b"])
    # A record of a log no longer configured is left alone.
    WitnessState.open(state_dir, [LOG.origin]).close()


def test_write_atomic(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_atomic(target, b"three", exclusive=True)
    assert target.read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["f"]


# --- The logs file -----------------------------------------------------------------------------


def write_logs(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "logs.toml"
    path.write_text(text)
    return path


def test_logs_file(tmp_path: Path) -> None:
    b = TestLog("log.test/b", 2)
    text = f'[[log]]\norigin = "{LOG.origin}"\nvkeys = ["{LOG.vkey}"]\n\n[[log]]\norigin = "{b.origin}"\nvkeys = ["{b.vkey}", "{LOG.vkey}"]\n'
    logs = load_logs(write_logs(tmp_path, text))
    assert {o: [k.vkey for k in keys] for o, keys in logs.items()} == {
        LOG.origin: [LOG.vkey],
        b.origin: [b.vkey, LOG.vkey],
    }


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "lists no log"),
        ("not toml [", "cannot read"),
        ('origin = "x"', "unknown keys: origin"),
        ("log = 1", "array of tables"),
        ('[[log]]\norigin = "log.test/a"', "needs vkeys"),
        ('[[log]]\nvkeys = ["x"]', "needs origin"),
        ('[[log]]\norigin = "log.test/a"\nvkeys = []', "needs vkeys"),
        ('[[log]]\norigin = "log.test/a"\nvkeys = ["nonsense"]', "verifier key"),
        ('[[log]]\norigin = "log.test/a"\nvkeys = ["VKEY"]\nvkey = "x"', "unknown keys: vkey"),
        ('[[log]]\norigin = ""\nvkeys = ["VKEY"]', "empty"),
        ('[[log]]\norigin = "a"\nvkeys = ["VKEY"]\n[[log]]\norigin = "a"\nvkeys = ["VKEY"]', "twice"),
        ('[[log]]\norigin = "log.test/a"\nvkeys = ["WKEY"]', "not an Ed25519 key"),
    ],
)
def test_bad_logs_files_are_refused(tmp_path: Path, text: str, match: str) -> None:
    from cloister.verify.cosignature import Ed25519Cosigner

    witness_vkey = Ed25519Cosigner(WITNESS_NAME, key(9)).vkey  # a cosigner key is not a log key
    path = write_logs(tmp_path, text.replace("VKEY", LOG.vkey).replace("WKEY", witness_vkey))
    with pytest.raises(WitnessSetupError, match=match):
        load_logs(path)
    with pytest.raises(WitnessSetupError, match="cannot read"):
        load_logs(tmp_path / "missing.toml")
