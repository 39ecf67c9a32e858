"""C2SP tlog-proof: proofs for every entry of the Tessera test log, layout, hostile input."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import inclusion_proof, leaf_hash
from cloister.verify.note import Ed25519NoteVerifier
from cloister.verify.tiles import TileNodeSource
from cloister.verify.tlog_proof import (
    HEADER,
    MAX_PROOF_HASHES,
    TlogProof,
    format_tlog_proof,
    parse_tlog_proof,
    verify_tlog_proof,
)

from .test_note import ALICE, BOB

TLOG = Path(__file__).resolve().parent.parent / "fixtures" / "tlog"
LOG_DIR = TLOG / "tessera_testdata_log"
LOG = json.loads((LOG_DIR / "log.json").read_text())
LOG_KEY = Ed25519NoteVerifier.from_vkey(LOG["vkey"])
ORIGIN = LOG["origin"]
ENTRIES = [e.encode() for e in LOG["entries_ascii_in_order"]]
TILES = {p: bytes.fromhex(h) for p, h in json.loads((LOG_DIR / "tiles_hex.json").read_text())["tiles"].items()}


def _checkpoint_note(size: int) -> bytes:
    return (LOG_DIR / f"checkpoint.{size}").read_bytes()


def _proof(index: int, size: int, extra: bytes | None = None) -> bytes:
    source = TileNodeSource(size, TILES.__getitem__)
    hashes = tuple(inclusion_proof(index, size, source))
    return format_tlog_proof(TlogProof(index, hashes, _checkpoint_note(size), extra))


def test_every_entry_at_every_checkpoint() -> None:
    for size in range(1, len(ENTRIES) + 1):
        for index in range(size):
            data = _proof(index, size)
            verified = verify_tlog_proof(data, [LOG_KEY], origin=ORIGIN, leaf_hash=leaf_hash(ENTRIES[index]))
            assert verified.checkpoint.size == size
            assert verified.proof.index == index
            assert verified.proof.extra is None
            assert format_tlog_proof(parse_tlog_proof(data)) == data
            # The same proof does not vouch for another entry.
            other = ENTRIES[(index + 1) % len(ENTRIES)]
            with pytest.raises(VerificationError, match="does not match"):
                verify_tlog_proof(data, [LOG_KEY], origin=ORIGIN, leaf_hash=leaf_hash(other))


def test_layout_matches_the_spec() -> None:
    data = _proof(4, 7, extra=b"opaque context")
    lines = data.split(b"\n")
    assert lines[0] == HEADER.encode()
    assert lines[1] == b"extra " + base64.b64encode(b"opaque context")
    assert lines[2] == b"index 4"
    proof = parse_tlog_proof(data)
    assert [base64.b64decode(x) for x in lines[3 : 3 + len(proof.inclusion_proof)]] == list(proof.inclusion_proof)
    assert lines[3 + len(proof.inclusion_proof)] == b""
    assert data.endswith(b"\n\n" + _checkpoint_note(7))
    assert proof.extra == b"opaque context"
    verified = verify_tlog_proof(data, [LOG_KEY], origin=ORIGIN, leaf_hash=leaf_hash(ENTRIES[4]))
    assert verified.proof.extra == b"opaque context"


def test_single_entry_tree_has_no_proof_lines() -> None:
    data = _proof(0, 1)
    assert data == HEADER.encode() + b"\nindex 0\n\n" + _checkpoint_note(1)
    verify_tlog_proof(data, [LOG_KEY], origin=ORIGIN, leaf_hash=leaf_hash(ENTRIES[0]))


def test_witness_cosignatures_are_carried_but_not_required() -> None:
    # A cosignature by a key we do not know (as from a witness) is ignored by verification.
    cosigned = _checkpoint_note(5) + BOB.sign(_checkpoint_note(5).split(b"\n\n")[0] + b"\n").to_line().encode()
    source = TileNodeSource(5, TILES.__getitem__)
    data = format_tlog_proof(TlogProof(2, tuple(inclusion_proof(2, 5, source)), cosigned))
    verified = verify_tlog_proof(data, [LOG_KEY], origin=ORIGIN, leaf_hash=leaf_hash(ENTRIES[2]))
    assert len(verified.note.signatures) == 1
    assert [s.name for s in verified.note.note.signatures] == [ORIGIN, BOB.name]


def test_checks_fail_with_named_reasons() -> None:
    data = _proof(3, 6)
    lh = leaf_hash(ENTRIES[3])
    with pytest.raises(VerificationError, match="no known key"):
        verify_tlog_proof(data, [ALICE.verifier], origin=ORIGIN, leaf_hash=lh)
    with pytest.raises(VerificationError, match="origin"):
        verify_tlog_proof(data, [LOG_KEY], origin="example.com/other", leaf_hash=lh)
    with pytest.raises(VerificationError, match="does not verify"):
        verify_tlog_proof(data.replace(b"\n6\n", b"\n7\n"), [LOG_KEY], origin=ORIGIN, leaf_hash=lh)
    with pytest.raises(VerificationError, match="not below tree size 6"):
        verify_tlog_proof(data.replace(b"index 3", b"index 6"), [LOG_KEY], origin=ORIGIN, leaf_hash=lh)
    with pytest.raises(VerificationError, match="does not match"):
        verify_tlog_proof(data.replace(b"index 3", b"index 2"), [LOG_KEY], origin=ORIGIN, leaf_hash=lh)
    with pytest.raises(VerificationError, match="leaf hash is 3 bytes"):
        verify_tlog_proof(data, [LOG_KEY], origin=ORIGIN, leaf_hash=b"abc")


H = base64.b64encode(bytes(32))
CP = _checkpoint_note(2)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "ends inside the header line"),
        (b"c2sp.org/tlog-proof@v2\nindex 0\n\n" + CP, "does not start with"),
        (b"c2sp.org/tlog-proof@v1\r\nindex 0\n\n" + CP, "longer than 22 bytes"),
        (HEADER.encode() + b"\n", "ends inside the line after the header"),
        (HEADER.encode() + b"\nindex 0\n", "ends inside the inclusion proof"),
        (HEADER.encode() + b"\nindex 0\n\n", "no checkpoint after"),
        (HEADER.encode() + b"\nindex 0\n" + H + b"\n", "ends inside the inclusion proof"),
        (HEADER.encode() + b"\n\nindex 0\n\n" + CP, "is not 'index <n>'"),
        (HEADER.encode() + b"\nIndex 0\n\n" + CP, "is not 'index <n>'"),
        (HEADER.encode() + b"\nindex  0\n\n" + CP, "without leading zeros"),
        (HEADER.encode() + b"\nindex 01\n\n" + CP, "without leading zeros"),
        (HEADER.encode() + b"\nindex -1\n\n" + CP, "without leading zeros"),
        (HEADER.encode() + b"\nindex 18446744073709551616\n\n" + CP, "does not fit in 64 bits"),
        (HEADER.encode() + b"\nextra \nindex 0\n\n" + CP, "present but empty"),
        (HEADER.encode() + b"\nextra !!\nindex 0\n\n" + CP, "extra data .* not valid base64"),
        (HEADER.encode() + b"\nextra AA==\nextra AA==\nindex 0\n\n" + CP, "is not 'index <n>'"),
        (HEADER.encode() + b"\nindex 0\nextra AA==\n\n" + CP, "proof hash 0 .* not valid base64"),
        (HEADER.encode() + b"\nindex 0\n" + H[:-1] + b"\n\n" + CP, "not valid base64"),
        (HEADER.encode() + b"\nindex 0\n" + base64.b64encode(bytes(31)) + b"\n\n" + CP, "31 bytes, want 32"),
        (HEADER.encode() + b"\nindex 0\n" + base64.b64encode(bytes(64)) + b"\n\n" + CP, "longer than 64"),
        (HEADER.encode() + b"\nindex 0\n" + (H + b"\n") * 65 + b"\n" + CP, "more than 64 inclusion proof"),
        (HEADER.encode() + b"\nindex \xff\n\n" + CP, "not ASCII"),
        (HEADER.encode() + b"\nindex 0\n\n" + b"x" * (2 << 20), "more than"),
    ],
)
def test_malformed_proofs(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        parse_tlog_proof(data)
    with pytest.raises(DecodeError, match=message):
        verify_tlog_proof(data, [LOG_KEY], origin=ORIGIN, leaf_hash=leaf_hash(b"one"))


def test_malformed_checkpoint_inside_a_proof_is_a_decode_error() -> None:
    data = HEADER.encode() + b"\nindex 0\n\nnot a note\n"
    proof = parse_tlog_proof(data)
    assert proof.checkpoint_note == b"not a note\n"
    with pytest.raises(DecodeError, match="no blank line"):
        verify_tlog_proof(data, [LOG_KEY], origin=ORIGIN, leaf_hash=leaf_hash(b"one"))


def test_at_the_caps() -> None:
    data = HEADER.encode() + b"\nindex 0\n" + (H + b"\n") * MAX_PROOF_HASHES + b"\n" + CP
    assert len(parse_tlog_proof(data).inclusion_proof) == MAX_PROOF_HASHES


def test_invalid_values_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="outside"):
        TlogProof(-1, (), CP)
    with pytest.raises(ValueError, match="proof hash 0 is 3 bytes"):
        TlogProof(0, (b"abc",), CP)
    with pytest.raises(ValueError, match="65 proof hashes"):
        TlogProof(0, (bytes(32),) * 65, CP)
    with pytest.raises(ValueError, match="no extra data is None"):
        TlogProof(0, (), CP, b"")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_proofs_only_raise_domain_errors(data: st.DataObject) -> None:
    proof = bytearray(_proof(5, 9, extra=b"ctx"))
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "delete"]))
    pos = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
    if op == "flip":
        proof[pos] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    elif op == "truncate":
        del proof[pos:]
    elif op == "extend":
        proof[pos:pos] = data.draw(st.binary(min_size=1, max_size=20))
    else:
        del proof[pos]
    try:
        verified = verify_tlog_proof(bytes(proof), [LOG_KEY], origin=ORIGIN, leaf_hash=leaf_hash(ENTRIES[5]))
    except (DecodeError, VerificationError):
        return
    # Only the unauthenticated extra data may change without failing verification.
    assert (verified.proof.index, verified.checkpoint.size) == (5, 9)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_domain_errors(data: bytes) -> None:
    for prefix in (b"", HEADER.encode() + b"\n"):
        try:
            verify_tlog_proof(prefix + data, [LOG_KEY], origin=ORIGIN, leaf_hash=leaf_hash(b"one"))
        except (DecodeError, VerificationError):
            continue
        raise AssertionError("random bytes verified")
