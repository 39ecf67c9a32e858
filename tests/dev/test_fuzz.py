"""A sample of the boundary fuzzer (cloister/dev/fuzz.py): every target, a few hundred inputs, one seed.

The long run is `./scripts/fuzz` (its figures are in the README); this sample keeps the harness and
the parsers honest in CI: no crash, no hang, no unclear error. The harness itself is tested too, so
the sample cannot pass vacuously: a broken target is reported as crashing, a vague message as
unclear, a slow input as a hang.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloister.dev import fuzz
from cloister.verify.errors import DecodeError

SEED = 20260302
PER_TARGET = 250

# Crashes the fuzzer found in files this change may not touch (reported; owned by other work in
# progress). The sample still runs these targets: it passes only if every failure is the known one
# (then it is an expected failure), and fails as soon as anything else shows up.
KNOWN_CRASHES: dict[str, tuple[str, ...]] = {}

# Targets whose parser is native code that can take the whole process down (cedarpy's Cedar parser
# overflows its stack on a condition nested ~700 deep): their sample runs in the CLI's worker process,
# where a native crash is a reported "died" failure instead of the end of the test session.
ISOLATED = frozenset({"bundle_load"})


@pytest.fixture(scope="module")
def fixtures() -> Iterator[fuzz.Fixtures]:
    with fuzz.fixtures(SEED) as fx:
        yield fx


def describe(result: fuzz.TargetResult) -> str:
    lines = [f"{result.target}: {result.crashes} crashes, {result.hangs} hangs, {result.unclear} unclear"]
    lines += [
        f"  {f.kind} at input {f.index} ({f.signature}): {f.error[:300]}\n{f.traceback[-1500:]}"
        for f in result.failures
    ]
    return "\n".join(lines)


def sample(name: str, fixtures: fuzz.Fixtures, out: Path) -> fuzz.TargetResult:
    if name not in ISOLATED:
        return fuzz.run_target(fuzz.build(name, fixtures), PER_TARGET, SEED)
    args = ["--per-target", str(PER_TARGET), "--seed", str(SEED), "--target", name, "--out", str(out)]
    fuzz.main([*args, "--no-minimize"])
    return fuzz.TargetResult.from_json(json.loads((out / "summary.json").read_text())["results"][0])


@pytest.mark.parametrize("name", fuzz.target_names())
def test_a_sample_of_every_target_finds_no_crash_hang_or_unclear_error(
    fixtures: fuzz.Fixtures, name: str, tmp_path: Path
) -> None:
    result = sample(name, fixtures, tmp_path)
    assert result.inputs == PER_TARGET
    assert result.accepted + result.rejected + result.crashes == PER_TARGET
    assert result.mutator_errors == 0
    assert not result.unbounded_memory, f"{name}: peak RSS grew {result.peak_rss_growth >> 20} MiB"
    known = KNOWN_CRASHES.get(name, ())
    if (
        known
        and result.failures
        and all(f.kind in ("crash", "died") and any(k in f.signature for k in known) for f in result.failures)
    ):
        pytest.xfail(f"known crash in {', '.join(known)} (reported): {result.failures[0].signature}")
    assert result.ok, describe(result)
    # Not vacuous: the sample reached both outcomes (the seeds are accepted, mutations mostly rejected).
    assert result.accepted > 0 and result.rejected > 0, (
        f"{name}: {result.accepted} accepted, {result.rejected} rejected"
    )


def broken_target(run: Callable[[bytes], None], clean: tuple[type[BaseException], ...] = (DecodeError,)) -> fuzz.Target:
    return fuzz.Target(
        "broken",
        "test",
        "a deliberately broken target",
        run,
        [b"seed", b"{}"],
        clean,
        tokens=(b"x",),
        limits=(16,),
        max_size=64,
    )


def test_the_harness_reports_an_unexpected_exception_as_a_crash_with_its_input(tmp_path: Path) -> None:
    def run(data: bytes) -> None:
        if len(data) % 2:
            raise KeyError("missing")
        raise DecodeError(f"{len(data)} bytes: clear enough")

    result = fuzz.run_target(broken_target(run), 200, 1, out=tmp_path)
    assert result.crashes > 0 and result.rejected > 0
    assert result.crashes + result.rejected == 200
    assert not result.ok
    crash = result.failures[0]
    assert crash.kind == "crash" and crash.signature.startswith("KeyError at dev/test_fuzz.py:")
    assert "KeyError: 'missing'" in crash.traceback
    assert crash.saved is not None and len(Path(crash.saved).read_bytes()) % 2 == 1
    assert bytes.fromhex(crash.data_hex) == Path(crash.saved).read_bytes()[:4096]


def test_the_harness_flags_unclear_messages_hangs_and_unbounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def vague(data: bytes) -> None:
        raise DecodeError(f"bad: 'NoneType' object has no attribute 'get' {len(data)}" if data else "")

    result = fuzz.run_target(broken_target(vague), 50, 1)
    assert result.rejected == 50 and result.unclear == 50 and result.crashes == 0
    assert not result.ok

    monkeypatch.setattr(fuzz, "HANG_S", 0.005)

    def slow(data: bytes) -> None:
        time.sleep(0.01)

    result = fuzz.run_target(broken_target(slow), 5, 1)
    assert result.hangs == 5 and result.accepted == 5 and not result.ok

    assert not fuzz.TargetResult("t", "b", peak_rss_growth=fuzz.UNBOUNDED_MEMORY + 1).ok
    assert fuzz.TargetResult("t", "b", peak_rss_growth=fuzz.UNBOUNDED_MEMORY).ok


def test_exception_groups_from_several_entry_points_are_judged_leaf_by_leaf() -> None:
    empty: dict[str, int] = {}

    def refuse(data: bytes) -> None:
        raise DecodeError("first stage refuses")

    def break_on_seed(data: bytes) -> None:
        if data == b"seed":
            empty["x"] += 1

    def both(data: bytes) -> None:
        fuzz._stages(data, (refuse, break_on_seed), (DecodeError,))

    result = fuzz.run_target(broken_target(both), 100, 3)
    assert result.crashes > 0, "a KeyError beside a clean rejection is still a crash"
    assert result.rejected > 0
    assert {"first stage refuses"} <= set(result.messages.values())


def test_inputs_are_a_function_of_seed_target_and_index(fixtures: fuzz.Fixtures) -> None:
    target = fuzz.build("log_entry", fixtures)
    first = [fuzz.generate_input(target, 5, i)[0] for i in range(50)]
    assert first == [fuzz.generate_input(target, 5, i)[0] for i in range(50)]
    assert first != [fuzz.generate_input(target, 6, i)[0] for i in range(50)]
    assert len(set(first)) > 40


def test_unclear_messages_are_python_internals_not_domain_text() -> None:
    assert fuzz.unclear_reason("") == "empty message"
    assert fuzz.unclear_reason("token is malformed: 'utf-8' codec can't decode byte 0xff") is not None
    assert fuzz.unclear_reason("unpack requires a buffer of 4 bytes") is not None
    assert fuzz.unclear_reason("Exceeds the limit (4300 digits) for integer string conversion") is not None
    assert fuzz.unclear_reason("entry field 'code': expected text, got NoneType") is None
    assert fuzz.unclear_reason("checkpoint size line (line 2) '01' is not a decimal without leading zeros") is None


def test_the_cli_runs_targets_in_workers_and_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = fuzz.main(
        ["--per-target", "40", "--seed", "2", "--target", "tile_path", "--target", "note_vkey", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "TOTAL inputs=80 " in out and "crashes=0 hangs=0 unclear=0 unbounded_memory=0 targets=2" in out
    assert (tmp_path / "summary.json").exists()
