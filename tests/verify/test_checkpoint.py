"""C2SP tlog-checkpoint: real checkpoints (sum.golang.org, Tessera test log) and strict parsing."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.verify.checkpoint import (
    MAX_CHECKPOINT_LINE,
    MAX_EXTENSION_LINES,
    Checkpoint,
    parse_checkpoint,
    verify_checkpoint,
)
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import EMPTY_ROOT, leaf_hash, root_from_leaf_hashes
from cloister.verify.note import Ed25519NoteVerifier, parse_note, sign_note

from .test_note import ALICE, BOB, signer_from_go_private_key

TLOG = Path(__file__).resolve().parent.parent / "fixtures" / "tlog"
LOG_DIR = TLOG / "tessera_testdata_log"
LOG = json.loads((LOG_DIR / "log.json").read_text())
LOG_KEY = Ed25519NoteVerifier.from_vkey(LOG["vkey"])
ENTRIES = [e.encode() for e in LOG["entries_ascii_in_order"]]

SUMDB_KEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"


def test_sum_golang_org_checkpoint() -> None:
    note = (TLOG / "signed_note" / "raw" / "sumdb_6476701.note").read_bytes()
    verified = verify_checkpoint(note, [Ed25519NoteVerifier.from_vkey(SUMDB_KEY)], origin="go.sum database tree")
    cp = verified.checkpoint
    assert cp == Checkpoint(
        origin="go.sum database tree",
        size=6476701,
        root_hash=base64.b64decode("mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk="),
    )
    assert cp.to_text() == verified.note.text
    # The key name (sum.golang.org) is not the origin: allowed, the spec only says SHOULD.
    assert verified.note.signatures[0].name == "sum.golang.org"


@pytest.mark.parametrize("size", range(len(ENTRIES) + 1))
def test_tessera_checkpoints_verify_and_match_the_entries(size: int) -> None:
    note = (LOG_DIR / f"checkpoint.{size}").read_bytes()
    cp = verify_checkpoint(note, [LOG_KEY], origin=LOG["origin"]).checkpoint
    assert cp.size == size
    assert cp.extensions == ()
    assert cp.root_hash == root_from_leaf_hashes([leaf_hash(e) for e in ENTRIES[:size]])
    if size == 0:
        assert cp.root_hash == EMPTY_ROOT


def test_latest_checkpoint_is_checkpoint_15() -> None:
    assert (LOG_DIR / "checkpoint").read_bytes() == (LOG_DIR / "checkpoint.15").read_bytes()


def test_re_signing_reproduces_tessera_checkpoints_byte_for_byte() -> None:
    signer = signer_from_go_private_key(LOG["test_only_private_key_published_in_script"])
    assert signer.vkey == LOG["vkey"]
    for size in range(len(ENTRIES) + 1):
        note = (LOG_DIR / f"checkpoint.{size}").read_bytes()
        cp = parse_checkpoint(parse_note(note).text)
        assert sign_note(cp.to_text(), [signer]) == note


def test_wrong_origin_or_key_is_a_verification_error() -> None:
    note = (LOG_DIR / "checkpoint.3").read_bytes()
    with pytest.raises(VerificationError, match=r"origin 'example\.com/log/testdata' is not the expected"):
        verify_checkpoint(note, [LOG_KEY], origin="example.com/other")
    with pytest.raises(VerificationError, match="no known key"):
        verify_checkpoint(note, [ALICE.verifier], origin=LOG["origin"])
    tampered = note.replace(b"\n3\n", b"\n4\n")
    with pytest.raises(VerificationError, match="does not verify"):
        verify_checkpoint(tampered, [LOG_KEY], origin=LOG["origin"])


def test_signature_is_checked_before_the_text_is_parsed() -> None:
    # A malformed checkpoint signed by an unknown key is a signature failure, not a parse error.
    note = sign_note(b"origin\n007\nnot base64\n", [BOB])
    with pytest.raises(VerificationError, match="no known key"):
        verify_checkpoint(note, [ALICE.verifier], origin="origin")
    signed = sign_note(b"origin\n007\nnot base64\n", [ALICE])
    with pytest.raises(DecodeError, match="without leading zeros"):
        verify_checkpoint(signed, [ALICE.verifier], origin="origin")


def test_round_trip_with_extensions() -> None:
    cp = Checkpoint("example.com/log", 42, bytes(range(32)), ("ext one", "ext two"))
    text = cp.to_text()
    assert text == b"example.com/log\n42\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\next one\next two\n"
    assert parse_checkpoint(text) == cp
    note = sign_note(text, [ALICE])
    assert verify_checkpoint(note, [ALICE.verifier], origin="example.com/log").checkpoint == cp


ROOT_B64 = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("o\n1\n", "2 lines, need origin"),
        ("\n1\n" + ROOT_B64 + "\n", "origin line \\(line 1\\) is empty"),
        ("o\n01\n" + ROOT_B64 + "\n", "without leading zeros"),
        ("o\n+1\n" + ROOT_B64 + "\n", "without leading zeros"),
        ("o\n 1\n" + ROOT_B64 + "\n", "without leading zeros"),
        ("o\n1_000\n" + ROOT_B64 + "\n", "without leading zeros"),
        ("o\n\u0661\n" + ROOT_B64 + "\n", "without leading zeros"),  # ARABIC-INDIC DIGIT ONE
        ("o\n-1\n" + ROOT_B64 + "\n", "without leading zeros"),
        ("o\n\n" + ROOT_B64 + "\n", "without leading zeros"),
        ("o\n18446744073709551616\n" + ROOT_B64 + "\n", "does not fit in 64 bits"),
        ("o\n123456789012345678901\n" + ROOT_B64 + "\n", "without leading zeros"),
        ("o\n1\n" + ROOT_B64[:-1] + "\n", "not valid base64"),
        ("o\n1\n" + base64.b64encode(bytes(31)).decode() + "\n", "31 bytes, want 32"),
        ("o\n1\n" + ROOT_B64[:-2] + "B=\n", "not canonical"),
        ("o\n1\n" + ROOT_B64 + "\n\n", "extension line \\(line 4\\) is empty"),
        ("o\n1\n" + ROOT_B64 + "\next\n\nmore\n", "extension line \\(line 5\\) is empty"),
        ("o\n1\n" + ROOT_B64, "does not end with a newline"),
        ("o\x7f\x01\n1\n" + ROOT_B64 + "\n", "control character"),
        ("o" * (MAX_CHECKPOINT_LINE + 1) + "\n1\n" + ROOT_B64 + "\n", "longer than 4096"),
        ("o\n1\n" + ROOT_B64 + "\n" + "e\n" * (MAX_EXTENSION_LINES + 1), "33 extension lines"),
    ],
)
def test_malformed_checkpoints(text: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        parse_checkpoint(text.encode())


def test_at_the_caps() -> None:
    text = "o" * MAX_CHECKPOINT_LINE + "\n18446744073709551615\n" + ROOT_B64 + "\n" + "e\n" * MAX_EXTENSION_LINES
    cp = parse_checkpoint(text.encode())
    assert cp.size == 2**64 - 1 and len(cp.extensions) == MAX_EXTENSION_LINES
    assert parse_checkpoint(b"o\n0\n" + ROOT_B64.encode() + b"\n").size == 0
    # Origins need not be URLs: spaces are fine (sum.golang.org uses one).
    assert parse_checkpoint(("a b+c\n0\n" + ROOT_B64 + "\n").encode()).origin == "a b+c"


def test_invalid_checkpoint_values_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="empty"):
        Checkpoint("", 1, bytes(32))
    with pytest.raises(ValueError, match="control character"):
        Checkpoint("a\nb", 1, bytes(32))
    with pytest.raises(ValueError, match="outside"):
        Checkpoint("a", -1, bytes(32))
    with pytest.raises(ValueError, match="outside"):
        Checkpoint("a", 2**64, bytes(32))
    with pytest.raises(ValueError, match="33 bytes"):
        Checkpoint("a", 1, bytes(33))
    with pytest.raises(ValueError, match="extension line 2 is empty"):
        Checkpoint("a", 1, bytes(32), ("x", ""))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_checkpoint_notes_only_raise_domain_errors(data: st.DataObject) -> None:
    note = bytearray((LOG_DIR / "checkpoint.7").read_bytes())
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "delete"]))
    pos = data.draw(st.integers(min_value=0, max_value=len(note) - 1))
    if op == "flip":
        note[pos] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    elif op == "truncate":
        del note[pos:]
    elif op == "extend":
        note[pos:pos] = data.draw(st.binary(min_size=1, max_size=20))
    else:
        del note[pos]
    try:
        cp = verify_checkpoint(bytes(note), [LOG_KEY], origin=LOG["origin"]).checkpoint
    except (DecodeError, VerificationError):
        return
    assert cp.size == 7


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_checkpoint_text_only_raises_decode_error(text: bytes) -> None:
    try:
        cp = parse_checkpoint(text)
    except DecodeError:
        return
    assert parse_checkpoint(cp.to_text()) == cp
