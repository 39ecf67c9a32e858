from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit.logbuilder import LogServer, TestLog, build_log, pcr_args


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> TestLog:
    """One real log for the session (~290 entries, two key entries). Do not modify it: copy it."""
    log = build_log(tmp_path_factory.mktemp("built"), rounds=34)
    assert 256 < len(log.entries) < 512  # a full bundle, a partial one, and a level-1 tile
    return log


@pytest.fixture
def log_copy(built: TestLog, tmp_path: Path) -> Path:
    """A copy of the built log's storage directory, free to tamper with."""
    target = tmp_path / "log"
    shutil.copytree(built.dir, target)
    return target


@pytest.fixture
def server(built: TestLog, log_copy: Path) -> Iterator[LogServer]:
    """The copy served like the relay, attested by the (honest) enclave that wrote the log."""
    with LogServer(log_copy, built.attest) as srv:
        yield srv


def trust(log: TestLog, state: Path) -> list[str]:
    return ["--trust-root", str(log.root_pem), "--state", str(state), *pcr_args(log.pcrs)]
