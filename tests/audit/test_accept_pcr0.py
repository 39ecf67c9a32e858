"""Replaying a log across an image upgrade: key entries may carry an accepted earlier PCR0."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloister.audit.full_replay import key_checker
from cloister.verify.attestation import TrustRoot
from cloister.verify.entries import KeyEntry, parse_entry
from cloister.verify.errors import VerificationError
from tests.world import make_world


def test_key_entries_of_an_earlier_image_need_accept_pcr0(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    entry = parse_entry(w.log[0])
    assert isinstance(entry, KeyEntry)
    root = TrustRoot.from_pem((w.root / "mock-nsm" / "root.pem").read_bytes())
    old_image, new_image = w.core.pcrs[0], b"\x42" * 48
    empty_root = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    with pytest.raises(VerificationError, match="neither --expect-pcr 0 nor an --accept-pcr0"):
        key_checker(root, {0: new_image}, False, "cloister.test/log")(0, entry, empty_root)
    key_checker(root, {0: new_image}, False, "cloister.test/log", frozenset({old_image}))(0, entry, empty_root)
    key_checker(root, {0: old_image}, False, "cloister.test/log")(0, entry, empty_root)
