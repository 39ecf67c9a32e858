"""The enclave's measured config must match the NSM it runs on (issue 9 item 6).

Before, an enclave on a real `/dev/nsm` accepted `trust_root = "mock:..."`: it would then trust
resume material and predecessors attested by a mock CA, whose key sits on a developer's disk.
Now the image's entry point refuses a mock root and the development launcher refuses `aws`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import cloister.dev.enclave as dev_enclave
import cloister.enclave.__main__ as image_main
from cloister.dev.mock_nsm import MockNsm
from cloister.enclave.config import EnclaveConfig, load_config
from cloister.enclave.nsm import Nsm
from cloister.verify.errors import DecodeError

ADMIN = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def write_config(tmp: Path, trust_root: str | None, origin: str = "cloister.test/log") -> Path:
    MockNsm(tmp / "mock-nsm", {}).root_pem()
    path = tmp / "enclave.toml"
    root = f'trust_root = "{trust_root}"\n' if trust_root is not None else ""
    path.write_text(f'origin = "{origin}"\nadmin_keys = ["{ADMIN}"]\n{root}unsafe_unwitnessed = true\n')
    return path


@pytest.fixture(autouse=True)
def _keep_switch_interval() -> Iterator[None]:
    before = sys.getswitchinterval()  # run() lowers it for the enclave's bridge
    yield
    sys.setswitchinterval(before)


def no_nsm(_config: EnclaveConfig) -> tuple[Nsm, dict[int, bytes]]:
    raise AssertionError("the NSM was opened with a config that should have been refused")


def test_mock_root_is_refused_on_real_nsm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "mock:mock-nsm/root.pem")
    with pytest.raises(DecodeError, match=r"trust_root 'mock:mock-nsm/root.pem' is a mock root, refused on the real"):
        load_config(config, mock_nsm=False)
    # The image's entry point (real NSM) stops before it opens /dev/nsm: one line, exit 2.
    listen = f"unix:{tmp_path / 'e.sock'}"
    assert image_main.run(listen, config, workers=1, nsm_factory=no_nsm, mock=False) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a mock root, refused on the real NSM" in err, err
    assert image_main.main(["--listen", listen, "--config", str(config)]) == 2
    assert "is a mock root, refused on the real NSM" in capsys.readouterr().err
    # With the mock NSM it is the right root.
    assert load_config(config, mock_nsm=True).trust_root.name == "mock NSM root"


def test_aws_root_is_refused_with_mock_nsm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for spec in ("aws", None):  # trust_root defaults to aws
        config = write_config(tmp_path, spec)
        with pytest.raises(DecodeError, match=r"trust_root 'aws' with the mock NSM"):
            load_config(config, mock_nsm=True)
        monkeypatch.setattr(dev_enclave, "MockNsm", no_nsm)
        argv = ["--listen", f"unix:{tmp_path / 'e.sock'}", "--config", str(config), "--mock-nsm", str(tmp_path)]
        assert dev_enclave.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "trust_root 'aws' with the mock NSM" in err, err
        assert load_config(config, mock_nsm=False).trust_root.name != "mock NSM root"


def test_other_roots_and_origins_are_refused(tmp_path: Path) -> None:
    for spec in ("AWS", "mock", "file:root.pem", ""):
        with pytest.raises(DecodeError, match="trust_root must be 'aws' or 'mock:<root.pem>'"):
            load_config(write_config(tmp_path, spec), mock_nsm=True)
    # The origin follows the rule bundles are signed with (cloister.verify.bundle.origin_problem).
    for origin in ("", " padded", "x" * 256, "tab\\there"):
        with pytest.raises(DecodeError, match="origin: "):
            load_config(write_config(tmp_path, "aws", origin=origin), mock_nsm=False)
