"""C2SP signed notes: published vectors, signing, and malformed or hostile notes."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.note import (
    MAX_NOTE_SIZE,
    MAX_SIGNATURES,
    Ed25519NoteSigner,
    Ed25519NoteVerifier,
    Note,
    NoteSignature,
    ed25519_key_id,
    format_note,
    parse_note,
    sign_note,
    verify_note,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tlog" / "signed_note"
VECTORS = json.loads((FIXTURES / "vectors.json").read_text())["vectors"]

EM = "\N{EM DASH}"


def signer_from_go_private_key(skey: str) -> Ed25519NoteSigner:
    """Test helper: golang.org/x/mod/sumdb/note's `PRIVATE+KEY+<name>+<id>+<base64(0x01||seed)>`."""
    private, key, name, key_id, b64 = skey.split("+", 4)
    assert (private, key) == ("PRIVATE", "KEY")
    raw = base64.b64decode(b64)
    assert raw[0] == 1 and len(raw) == 33
    signer = Ed25519NoteSigner(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
    assert f"{signer.key_id:08x}" == key_id
    return signer


@pytest.mark.parametrize("vec", VECTORS, ids=[v["id"] for v in VECTORS])
def test_published_vectors_verify(vec: dict[str, Any]) -> None:
    raw = (FIXTURES / "raw" / f"{vec['id']}.note").read_bytes()
    assert raw == vec["note_text_utf8"].encode("utf-8")
    verifiers = [Ed25519NoteVerifier.from_vkey(k) for k in vec["verifier_keys"]]
    for v, k in zip(verifiers, vec["verifier_keys"], strict=True):
        assert v.vkey == k
    verified = verify_note(raw, verifiers)
    assert vec["expect"]["valid"] is True
    got = [(s.name, f"{s.key_id:08x}") for s in verified.signatures]
    assert got == [(s["name"], s["key_id"]) for s in vec["expect"]["verified_signatures"]]
    assert raw.startswith(verified.text)
    assert format_note(verified.note) == raw


def test_sum_golang_org_checkpoint_verifies_with_the_go_command_key() -> None:
    raw = (FIXTURES / "raw" / "sumdb_6476701.note").read_bytes()
    key = Ed25519NoteVerifier.from_vkey("sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8")
    verified = verify_note(raw, [key])
    assert verified.text == b"go.sum database tree\n6476701\nmb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=\n"


def test_signing_is_deterministic_and_reproduces_the_go_example() -> None:
    vec = next(v for v in VECTORS if v["id"] == "x_mod_peter_neumann")
    signer = signer_from_go_private_key(
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
    )
    assert signer.vkey == vec["verifier_keys"][0]
    note = vec["note_text_utf8"].encode("utf-8")
    text = parse_note(note).text
    assert sign_note(text, [signer]) == note


def test_key_id_is_the_spec_hash() -> None:
    v = Ed25519NoteVerifier.from_vkey(VECTORS[0]["verifier_keys"][0])
    pub = base64.b64decode(VECTORS[0]["verifier_keys"][0].split("+", 2)[2])[1:]
    assert ed25519_key_id(v.name, pub) == v.key_id == 0x530D903A


# --- Signing and verifying our own notes -------------------------------------------------------


def _signer(name: str, seed: int) -> Ed25519NoteSigner:
    return Ed25519NoteSigner(name, Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


ALICE = _signer("alice.example/log", 1)
BOB = _signer("bob.example/witness", 2)
MALLORY = _signer("alice.example/log", 3)  # same name as ALICE, different key (and key ID)
TEXT = b"hello\n\nworld\n"


def test_round_trip_with_several_signers() -> None:
    note = sign_note(TEXT, [ALICE, BOB])
    verified = verify_note(note, [ALICE.verifier])
    assert verified.text == TEXT
    assert [s.name for s in verified.signatures] == [ALICE.name]
    assert len(verified.note.signatures) == 2
    both = verify_note(note, [BOB.verifier, ALICE.verifier])
    assert {s.name for s in both.signatures} == {ALICE.name, BOB.name}


def test_text_may_end_with_blank_lines() -> None:
    text = b"a\n\n\n"
    note = sign_note(text, [ALICE])
    assert verify_note(note, [ALICE.verifier]).text == text


def test_unknown_keys_are_ignored_even_if_they_share_a_name_or_an_id() -> None:
    note = sign_note(TEXT, [MALLORY, ALICE])
    verified = verify_note(note, [ALICE.verifier])
    assert [(s.name, s.key_id) for s in verified.signatures] == [(ALICE.name, ALICE.key_id)]
    # Same key ID, other name: not this key, ignored (the bogus signature is never checked).
    forged = NoteSignature("other.example", ALICE.key_id, b"\0" * 64)
    note2 = format_note(Note(TEXT, (forged, ALICE.sign(TEXT))))
    assert len(verify_note(note2, [ALICE.verifier]).signatures) == 1


def test_no_known_key_is_a_verification_error() -> None:
    note = sign_note(TEXT, [MALLORY, BOB])
    with pytest.raises(VerificationError, match="signed by no known key"):
        verify_note(note, [ALICE.verifier])
    with pytest.raises(VerificationError, match="known: none"):
        verify_note(note, [])


def test_tampered_text_fails() -> None:
    note = sign_note(TEXT, [ALICE])
    with pytest.raises(VerificationError, match="does not verify"):
        verify_note(note.replace(b"world", b"w0rld"), [ALICE.verifier])


def test_bad_signature_by_a_known_key_rejects_the_note_even_with_a_good_one() -> None:
    good = ALICE.sign(TEXT)
    bad = NoteSignature(ALICE.name, ALICE.key_id, bytes(64))
    note = format_note(Note(TEXT, (good, bad)))
    with pytest.raises(VerificationError, match="does not verify"):
        verify_note(note, [ALICE.verifier])
    short = NoteSignature(ALICE.name, ALICE.key_id, b"\1" * 63)
    with pytest.raises(VerificationError, match="63 bytes"):
        verify_note(format_note(Note(TEXT, (short,))), [ALICE.verifier])


def test_duplicate_verifiers_are_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="share key name"):
        verify_note(sign_note(TEXT, [ALICE]), [ALICE.verifier, ALICE.verifier])


# --- Malformed notes ---------------------------------------------------------------------------

GOOD = sign_note(b"line one\nline two\n", [ALICE])
SIG_LINE = GOOD.split(b"\n\n")[1]


@pytest.mark.parametrize(
    ("note", "message"),
    [
        (b"", "does not end with a newline"),
        (GOOD[:-1], "does not end with a newline"),
        (GOOD.replace(b"\n\n", b"\n"), "no blank line"),
        (b"text\n\n", "no signature lines"),
        (GOOD + b"\n", "no signature lines"),
        (GOOD.replace("\N{EM DASH}".encode(), b"-"), "em dash"),
        (GOOD.replace("\N{EM DASH} ".encode(), "\N{EM DASH}".encode()), "em dash"),
        (GOOD.replace(b"alice.example/log ", b"alice.example/log  "), "key name> <base64"),
        (GOOD.replace(b"alice.example/log", b"alice+log"), "forbidden character '\\+'"),
        (GOOD.replace(b"alice.example/log", "alice\N{NO-BREAK SPACE}log".encode()), "forbidden character"),
        (GOOD[:-2] + b"!\n", "not valid base64"),
        (GOOD.replace(SIG_LINE, SIG_LINE.rstrip(b"\n=") + b"\n"), "not valid base64"),
        (GOOD.replace(b"line one", b"line\tone"), "control character '\\\\t' at byte offset 4"),
        (GOOD.replace(b"line one", b"line\rone"), "control character"),
        (GOOD.replace(b"line one", b"line \xff"), "not valid UTF-8 at byte offset 5"),
        ("t\n\n\N{EM DASH} k AAAA\n".encode(), "need a 4-byte key ID and more"),
        ("t\n\n\N{EM DASH}  AAAAAA==\n".encode(), "key name is empty"),
    ],
)
def test_malformed_notes_are_decode_errors(note: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        parse_note(note)
    with pytest.raises(DecodeError, match=message):
        verify_note(note, [ALICE.verifier])


def test_non_canonical_base64_is_rejected() -> None:
    # 5 bytes -> "AAAAAAA=": the last character carries 2 padding bits; "AAAAAAB=" sets one.
    with pytest.raises(DecodeError, match="not canonical base64"):
        parse_note("t\n\n\N{EM DASH} k AAAAAAB=\n".encode())
    parse_note("t\n\n\N{EM DASH} k AAAAAAA=\n".encode())


def test_oversize_note() -> None:
    text = b"x" * (MAX_NOTE_SIZE - 10) + b"\n"
    with pytest.raises(DecodeError, match="more than 1048576"):
        parse_note(text + b"\n" + SIG_LINE)
    with pytest.raises(DecodeError, match="more than 1048576"):
        ALICE.sign(b"x" * MAX_NOTE_SIZE + b"\n")


def test_too_many_signatures() -> None:
    lines = [BOB.sign(TEXT).to_line() for _ in range(MAX_SIGNATURES)]
    at_cap = TEXT + b"\n" + "".join([ALICE.sign(TEXT).to_line(), *lines[1:]]).encode()
    assert len(verify_note(at_cap, [ALICE.verifier]).note.signatures) == MAX_SIGNATURES
    over = TEXT + b"\n" + "".join([ALICE.sign(TEXT).to_line(), *lines]).encode()
    with pytest.raises(DecodeError, match=f"{MAX_SIGNATURES + 1} signature lines, more than"):
        verify_note(over, [ALICE.verifier])


def test_overlong_signature_line() -> None:
    blob = base64.b64encode(bytes(20_000)).decode()
    with pytest.raises(DecodeError, match=r"signature on line 3 is .* characters, more than"):
        parse_note(f"t\n\n{EM} k {blob}\n".encode())


def test_signature_line_numbers_point_into_the_note() -> None:
    note = b"a\nb\n\n" + SIG_LINE + "\N{EM DASH} k !!!!\n".encode()
    with pytest.raises(DecodeError, match="signature on line 5"):
        parse_note(note)


# --- Verifier keys -----------------------------------------------------------------------------

VKEY = ALICE.vkey


@pytest.mark.parametrize(
    ("vkey", "message"),
    [
        ("alice.example/log", "is not '<name>\\+<key id>\\+<base64 key>'"),
        ("alice.example/log+0011", "is not '<name>"),
        (VKEY.replace(f"{ALICE.key_id:08x}", f"{ALICE.key_id:08X}"), "8 lowercase hex"),
        (VKEY.replace(f"{ALICE.key_id:08x}", f"{ALICE.key_id ^ 1:08x}"), "does not match its key"),
        (VKEY.replace("alice.example/log", "bob.example/log"), "does not match its key"),
        ("+00000000+" + VKEY.split("+", 2)[2], "name is empty"),
        ("a b+00000000+" + VKEY.split("+", 2)[2], "forbidden character"),
        (VKEY.split("+", 2)[0] + f"+{ALICE.key_id:08x}+" + "Ag" + VKEY.split("+", 2)[2][2:], "not an Ed25519"),
        (VKEY[:-1], "not valid base64"),
        (VKEY.split("+", 2)[0] + f"+{ALICE.key_id:08x}+AQ==", "got 1 bytes starting with 01"),
    ],
)
def test_bad_verifier_keys(vkey: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        Ed25519NoteVerifier.from_vkey(vkey)


def test_signer_names_are_checked() -> None:
    with pytest.raises(DecodeError, match="forbidden character"):
        Ed25519NoteSigner("a+b", Ed25519PrivateKey.generate())
    with pytest.raises(DecodeError, match="empty"):
        Ed25519NoteSigner("", Ed25519PrivateKey.generate())


def test_signer_and_verifier_expose_the_same_key() -> None:
    v = Ed25519NoteVerifier.from_vkey(ALICE.vkey)
    assert (v.name, v.key_id) == (ALICE.name, ALICE.key_id)
    assert "alice.example/log" in repr(ALICE) and "alice.example/log" in repr(v)


# --- Garbage never crashes ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_domain_errors(data: bytes) -> None:
    with contextlib.suppress(DecodeError, VerificationError):
        verify_note(data, [ALICE.verifier])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_notes_only_raise_domain_errors(data: st.DataObject) -> None:
    note = bytearray(sign_note(TEXT, [BOB, ALICE]))
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
        verified = verify_note(bytes(note), [ALICE.verifier])
    except (DecodeError, VerificationError):
        return
    # A mutation that still verifies must not have changed what ALICE signed.
    assert verified.text == TEXT


def test_signature_values_are_checked() -> None:
    with pytest.raises(DecodeError, match="forbidden character"):
        NoteSignature("a b", 1, b"x")
    with pytest.raises(DecodeError, match="not a uint32"):
        NoteSignature("a", 2**32, b"x")
    with pytest.raises(DecodeError, match="signature is empty"):
        NoteSignature("a", 1, b"")
