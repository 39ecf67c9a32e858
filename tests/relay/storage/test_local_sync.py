"""LocalBackend.write_many: a materialization's many files share two syncfs(2) calls (decision
0025); few files keep an fsync each. Either way every object is whole and in place on return."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloister.relay.storage import LocalBackend
from cloister.relay.storage import local as local_module

needs_syncfs = pytest.mark.skipif(local_module._SYNCFS is None, reason="no syncfs(2) here")


def items(n: int) -> list[tuple[str, bytes]]:
    return [(f"bodies/{i:03d}.args", b"body %d" % i) for i in range(n)]


@needs_syncfs
def test_many_objects_share_two_syncfs_calls(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "log")
    b.write("bodies/warm", b"x")  # creates (and syncs) the directory first
    before = b.stats.snapshot()
    b.write_many(items(40))
    after = b.stats.snapshot()
    assert after["fsyncs"] - before["fsyncs"] == 2
    assert after["object_writes"] - before["object_writes"] == 40
    for path, data in items(40):
        assert b.read(path) == data
    assert not [p for p in (tmp_path / "log" / "bodies").iterdir() if p.name.startswith(".tmp-")]
    b.close()


def test_few_objects_or_syncfs_off_sync_each_file_and_directory(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "log", syncfs_from=0)
    b.write("bodies/warm", b"x")
    before = b.stats.snapshot()
    b.write_many(items(10))
    assert b.stats.snapshot()["fsyncs"] - before["fsyncs"] == 10 + 1  # each file, then the directory
    b.close()
    b = LocalBackend(tmp_path / "log2")
    b.write("bodies/warm", b"x")
    before = b.stats.snapshot()
    b.write_many(items(3))
    assert b.stats.snapshot()["fsyncs"] - before["fsyncs"] == 3 + 1
    assert [b.read(p) for p, _ in items(3)] == [d for _, d in items(3)]
    b.close()


@needs_syncfs
def test_replacing_objects_in_a_batch(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "log")
    b.write_many(items(12))
    b.write_many([(p, d + b" v2") for p, d in items(12)])
    assert [b.read(p) for p, _ in items(12)] == [d + b" v2" for _, d in items(12)]
    b.close()
