"""C2SP tlog-cosignature (Ed25519, cosignature/v1): the spec's examples, signing, verifying, quorums."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.verify.checkpoint import Checkpoint, parse_checkpoint, verify_checkpoint
from cloister.verify.cosignature import (
    ALG_COSIGNATURE_V1,
    MAX_TIMESTAMP,
    CosignaturePolicy,
    Ed25519CosignatureVerifier,
    Ed25519Cosigner,
    cosignature_key_id,
    cosigned_message,
    verify_cosignature_line,
    verify_cosignatures,
)
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.merkle import leaf_hash, root_from_leaf_hashes
from cloister.verify.note import (
    Ed25519NoteSigner,
    Note,
    NoteSignature,
    ed25519_key_id,
    format_note,
    parse_note,
    sign_note,
    verify_note,
)

SPEC = Path(__file__).resolve().parent.parent / "fixtures" / "tlog" / "witness"
EM = "\N{EM DASH}"


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


LOG = Ed25519NoteSigner("log.example/a", _key(1))
W1 = Ed25519Cosigner("witness.example/w1", _key(11))
W2 = Ed25519Cosigner("witness.example/w2", _key(12))
W3 = Ed25519Cosigner("witness.example/w3", _key(13))
CHECKPOINT = Checkpoint("log.example/a", 5, root_from_leaf_hashes([leaf_hash(b"%d" % i) for i in range(5)]))
TEXT = CHECKPOINT.to_text()
T = 1_700_000_000


def line(sig: NoteSignature) -> str:
    return sig.to_line()


# --- The spec's examples (tests/fixtures/tlog/witness, C2SP/C2SP @ 5ba5ee83) -------------------


def test_spec_signed_message_example_is_what_we_sign() -> None:
    """tlog-cosignature §Ed25519 signed message: the example message, byte for byte."""
    example = (SPEC / "cosigned_message_example.txt").read_bytes()
    note = parse_note((SPEC / "cosignature_example.note").read_bytes())
    assert cosigned_message(note.text, 1679315147) == example


def test_spec_cosignature_example_carries_the_example_timestamp() -> None:
    """The example checkpoint's cosignature line: key ID, then u64 big-endian 1679315147, then 64 bytes."""
    note = parse_note((SPEC / "cosignature_example.note").read_bytes())
    assert parse_checkpoint(note.text).size == 20852163
    log_sig, cosig = note.signatures
    assert (log_sig.name, len(log_sig.signature)) == ("example.com/behind-the-sofa", 64)
    assert cosig.name == "witness.example.com/w1"
    assert cosig.key_id == 0x8D66CF3F
    assert len(cosig.signature) == 8 + 64
    assert int.from_bytes(cosig.signature[:8], "big") == 1679315147
    # The spec publishes no public key for witness.example.com/w1: a key of that name that is not
    # the example's has another key ID, so the line is not that key's cosignature.
    stranger = Ed25519CosignatureVerifier("witness.example.com/w1", _key(99).public_key())
    with pytest.raises(VerificationError, match="key ID 8d66cf3f"):
        verify_cosignature_line(cosig.to_line(), note.text, stranger)
    policy = CosignaturePolicy((stranger,), 1)
    with pytest.raises(VerificationError, match="cosigned by 0 of the 1"):
        verify_cosignatures((SPEC / "cosignature_example.note").read_bytes(), policy)


def test_spec_add_checkpoint_response_example_lines_are_cosignature_shaped() -> None:
    """tlog-witness's example response: three signature lines of 4 + 8 + 64 bytes each.

    They are placeholders (random bytes): two carry a timestamp above 2**63 - 1, which a verifier
    refuses before checking any signature; the third fails as a signature.
    """
    body = (SPEC / "add_checkpoint_response_example.txt").read_bytes()
    checkpoint = (SPEC / "cosignature_example.note").read_bytes()
    sigs = parse_note(parse_note(checkpoint).text + b"\n" + body).signatures
    assert [(s.name, len(s.signature)) for s in sigs] == [
        ("witness.example/w1", 72),
        ("witness.example/w1", 72),
        ("witness.example/w2", 72),
    ]
    any_key = Ed25519CosignatureVerifier("witness.example/w1", _key(98).public_key())
    text = parse_note(checkpoint).text
    for sig, expect in zip(sigs, ["above 2\\*\\*63 - 1", "above 2\\*\\*63 - 1", "does not verify"], strict=True):
        with pytest.raises(VerificationError, match=expect):
            any_key.verify_timestamped(text, sig.signature)


# --- Keys --------------------------------------------------------------------------------------


def test_key_id_uses_the_cosignature_type_byte() -> None:
    pub = W1.verifier.public_bytes
    want = hashlib.sha256(b"witness.example/w1\n\x04" + pub).digest()[:4]
    assert W1.key_id == cosignature_key_id(W1.name, pub) == int.from_bytes(want, "big")
    # The same key and name as a plain note key (0x01) has another ID.
    assert ed25519_key_id(W1.name, pub) != W1.key_id


def test_vkey_round_trip_and_format() -> None:
    vkey = W1.vkey
    name, hex_id, b64 = vkey.split("+", 2)
    assert (name, hex_id) == (W1.name, f"{W1.key_id:08x}")
    raw = base64.b64decode(b64)
    assert raw[0] == ALG_COSIGNATURE_V1 == 0x04
    assert raw[1:] == W1.verifier.public_bytes
    back = Ed25519CosignatureVerifier.from_vkey(vkey)
    assert (back.name, back.key_id, back.vkey) == (W1.name, W1.key_id, vkey)


def test_vkey_of_another_type_or_malformed_is_refused() -> None:
    with pytest.raises(DecodeError, match="signature type 0x01"):
        Ed25519CosignatureVerifier.from_vkey(Ed25519NoteSigner(W1.name, _key(11)).vkey)
    name, hex_id, b64 = W1.vkey.split("+", 2)
    other_id = f"{(W1.key_id + 1) % (1 << 32):08x}"
    bad = [
        (f"{name}+{other_id}+{b64}", "does not match"),
        (f"{name}+{hex_id.upper()}+{b64}", "8 lowercase hex"),
        (f"{name}+{hex_id}", "is not '<name>"),
        (f"{name}+{hex_id}+{b64[:-4]}", "base64|holds"),
        (f"+{hex_id}+{b64}", "empty"),
    ]
    for vkey, match in bad:
        with pytest.raises(DecodeError, match=match):
            Ed25519CosignatureVerifier.from_vkey(vkey)


# --- Cosign and verify one line ----------------------------------------------------------------


def test_round_trip_returns_the_timestamp() -> None:
    sig = W1.cosign(TEXT, T)
    assert (sig.name, sig.key_id) == (W1.name, W1.key_id)
    assert sig.signature[:8] == T.to_bytes(8, "big")
    assert verify_cosignature_line(line(sig), TEXT, W1.verifier) == T
    assert verify_cosignature_line(line(sig).rstrip("\n").encode(), TEXT, W1.verifier) == T
    # The signature is plain Ed25519 over the spec's message.
    W1.verifier.public_key.verify(sig.signature[8:], cosigned_message(TEXT, T))


def test_cosigned_note_verifies_with_the_log_key_and_with_a_note_verifier() -> None:
    """tlog-witness: a client MAY append the lines to the checkpoint and use note verification."""
    note = format_note(Note(TEXT, (LOG.sign(TEXT), W1.cosign(TEXT, T))))
    assert verify_checkpoint(note, [LOG.verifier], origin="log.example/a").checkpoint == CHECKPOINT
    verified = verify_note(note, [W1.verifier])
    assert [s.name for s in verified.signatures] == [W1.name]


def test_tampered_cosignature_is_refused() -> None:
    sig = W1.cosign(TEXT, T)
    for i in (0, 7, 8, 40, 71):
        blob = bytearray(sig.signature)
        blob[i] ^= 0x01
        forged = NoteSignature(sig.name, sig.key_id, bytes(blob))
        with pytest.raises(VerificationError, match="does not verify|above 2"):
            verify_cosignature_line(line(forged), TEXT, W1.verifier)


def test_other_checkpoint_or_extension_lines_are_covered() -> None:
    sig = W1.cosign(TEXT, T)
    other = Checkpoint(CHECKPOINT.origin, 6, CHECKPOINT.root_hash).to_text()
    with pytest.raises(VerificationError, match="does not verify"):
        verify_cosignature_line(line(sig), other, W1.verifier)
    with_ext = Checkpoint(CHECKPOINT.origin, 5, CHECKPOINT.root_hash, ("ext line",)).to_text()
    sig_ext = W1.cosign(with_ext, T)
    assert verify_cosignature_line(line(sig_ext), with_ext, W1.verifier) == T
    with pytest.raises(VerificationError, match="does not verify"):
        verify_cosignature_line(line(sig_ext), TEXT, W1.verifier)


def test_wrong_key_and_wrong_name_are_refused() -> None:
    sig = W1.cosign(TEXT, T)
    impostor = Ed25519Cosigner(W1.name, _key(66))  # same name, other key: other key ID
    with pytest.raises(VerificationError, match="key ID"):
        verify_cosignature_line(line(impostor.cosign(TEXT, T)), TEXT, W1.verifier)
    with pytest.raises(VerificationError, match="not by the witness"):
        verify_cosignature_line(line(sig), TEXT, W2.verifier)
    # The right name and key ID with another key's signature: the signature fails.
    relabelled = NoteSignature(W1.name, W1.key_id, impostor.cosign(TEXT, T).signature)
    with pytest.raises(VerificationError, match="does not verify"):
        verify_cosignature_line(line(relabelled), TEXT, W1.verifier)


def test_wrong_type_byte_is_refused() -> None:
    """A plain note signature (type 0x01) by the witness's own key and name is not a cosignature."""
    plain = Ed25519NoteSigner(W1.name, _key(11)).sign(TEXT)
    with pytest.raises(VerificationError, match="key ID"):
        verify_cosignature_line(line(plain), TEXT, W1.verifier)
    # Relabelled with the 0x04 key ID: 64 bytes are not a timestamped signature.
    relabelled = NoteSignature(W1.name, W1.key_id, plain.signature)
    with pytest.raises(VerificationError, match="64 bytes, want 72"):
        verify_cosignature_line(line(relabelled), TEXT, W1.verifier)
    # A timestamp in front of a signature over the bare text: the header is missing, it fails.
    bare = T.to_bytes(8, "big") + _key(11).sign(b"time %d\n" % T + TEXT)
    with pytest.raises(VerificationError, match="does not verify"):
        verify_cosignature_line(line(NoteSignature(W1.name, W1.key_id, bare)), TEXT, W1.verifier)


def test_timestamp_bounds() -> None:
    for bad in (0, -1, MAX_TIMESTAMP + 1):
        with pytest.raises(ValueError, match="outside"):
            W1.cosign(TEXT, bad)
    assert verify_cosignature_line(line(W1.cosign(TEXT, MAX_TIMESTAMP)), TEXT, W1.verifier) == MAX_TIMESTAMP
    # A well-signed cosignature with timestamp 2**63 is still refused (§Format: MUST NOT exceed).
    ts = MAX_TIMESTAMP + 1
    message = b"cosignature/v1\ntime %d\n" % ts + TEXT
    blob = ts.to_bytes(8, "big") + _key(11).sign(message)
    with pytest.raises(VerificationError, match="above 2"):
        verify_cosignature_line(line(NoteSignature(W1.name, W1.key_id, blob)), TEXT, W1.verifier)


def test_only_checkpoints_are_cosigned() -> None:
    with pytest.raises(DecodeError):
        W1.cosign(b"not a checkpoint\n", T)
    with pytest.raises(DecodeError):
        verify_cosignature_line(line(W1.cosign(TEXT, T)), b"not a checkpoint\n", W1.verifier)


def test_malformed_lines_are_decode_errors() -> None:
    good = line(W1.cosign(TEXT, T))
    bad_lines = (
        good.replace(EM, "-"),
        good + good,
        "\n" + good,  # would move the blank line: the signed text would no longer be the checkpoint's
        good.replace(" ", "  ", 1),
        f"{EM} {W1.name} !!!!\n",
    )
    for bad in bad_lines:
        with pytest.raises(DecodeError):
            verify_cosignature_line(bad, TEXT, W1.verifier)


@settings(max_examples=40, deadline=None)
@given(ts=st.integers(1, MAX_TIMESTAMP), size=st.integers(0, 2**64 - 1), flip=st.integers(0, 72 * 8 - 1))
def test_round_trip_and_any_bit_flip(ts: int, size: int, flip: int) -> None:
    text = Checkpoint("log.example/a", size, CHECKPOINT.root_hash).to_text()
    sig = W2.cosign(text, ts)
    assert verify_cosignature_line(line(sig), text, W2.verifier) == ts
    blob = bytearray(sig.signature)
    blob[flip // 8] ^= 1 << (flip % 8)
    with pytest.raises(VerificationError):
        W2.verifier.verify_timestamped(text, bytes(blob))


# --- Quorum policies ---------------------------------------------------------------------------


def cosigned(*sigs: NoteSignature, text: bytes = TEXT) -> bytes:
    return format_note(Note(text, (LOG.sign(text), *sigs)))


POLICY = CosignaturePolicy((W1.verifier, W2.verifier, W3.verifier), 2)


def test_quorum_met_returns_who_cosigned_and_when() -> None:
    note = cosigned(W1.cosign(TEXT, T), W3.cosign(TEXT, T + 5))
    assert verify_cosignatures(note, POLICY) == {W1.name: T, W3.name: T + 5}
    all_three = cosigned(W1.cosign(TEXT, T), W2.cosign(TEXT, T), W3.cosign(TEXT, T))
    assert set(verify_cosignatures(all_three, POLICY)) == {W1.name, W2.name, W3.name}
    assert CosignaturePolicy.from_vkeys([W1.vkey, W2.vkey], 2).quorum == 2


def test_quorum_not_met() -> None:
    with pytest.raises(VerificationError, match=r"cosigned by 1 of the 2 .*missing: witness.example/w2, witness"):
        verify_cosignatures(cosigned(W1.cosign(TEXT, T)), POLICY)
    # One witness sending two lines still counts once.
    twice = cosigned(W1.cosign(TEXT, T), W1.cosign(TEXT, T + 1))
    with pytest.raises(VerificationError, match="cosigned by 1 of the 2"):
        verify_cosignatures(twice, POLICY)
    # Only the log's signature: nobody cosigned.
    with pytest.raises(VerificationError, match="cosigned by 0 of the 2"):
        verify_cosignatures(sign_note(TEXT, [LOG]), POLICY)


def test_unknown_cosigners_and_other_types_are_ignored() -> None:
    stranger = Ed25519Cosigner("witness.example/other", _key(70))
    # A line shaped like an ML-DSA-44 (type 0x06) cosignature by w1's name: unknown key ID, ignored.
    mldsa_like = NoteSignature(W1.name, 0x01020304, b"\x00" * 2428)
    plain = Ed25519NoteSigner(W2.name, _key(12)).sign(TEXT)  # w2's key as a 0x01 note key: ignored
    note = cosigned(stranger.cosign(TEXT, T), mldsa_like, plain, W1.cosign(TEXT, T), W3.cosign(TEXT, T))
    assert set(verify_cosignatures(note, POLICY)) == {W1.name, W3.name}
    with pytest.raises(VerificationError, match="cosigned by 1 of the 2"):
        verify_cosignatures(cosigned(stranger.cosign(TEXT, T), mldsa_like, plain, W1.cosign(TEXT, T)), POLICY)


def test_a_bad_cosignature_by_a_policy_witness_rejects_the_note() -> None:
    bad = NoteSignature(W2.name, W2.key_id, W2.cosign(TEXT, T).signature[:-1] + b"\x00")
    note = cosigned(W1.cosign(TEXT, T), W3.cosign(TEXT, T), bad)
    with pytest.raises(VerificationError, match="witness.example/w2.*does not verify"):
        verify_cosignatures(note, POLICY)


def test_cosignatures_of_another_checkpoint_do_not_count() -> None:
    other = Checkpoint(CHECKPOINT.origin, 6, CHECKPOINT.root_hash).to_text()
    note = cosigned(W1.cosign(other, T), W2.cosign(other, T))
    with pytest.raises(VerificationError, match="does not verify"):
        verify_cosignatures(note, POLICY)


def test_future_timestamps_refused_with_not_after() -> None:
    note = cosigned(W1.cosign(TEXT, T), W2.cosign(TEXT, T + 100))
    assert len(verify_cosignatures(note, POLICY, not_after=T + 100)) == 2
    with pytest.raises(VerificationError, match="after"):
        verify_cosignatures(note, POLICY, not_after=T + 99)


def test_policy_refuses_bad_quorums_and_shared_keys() -> None:
    with pytest.raises(ValueError, match="quorum 0"):
        CosignaturePolicy((W1.verifier,), 0)
    with pytest.raises(ValueError, match="quorum 2"):
        CosignaturePolicy((W1.verifier,), 2)
    with pytest.raises(ValueError, match="share a name"):
        CosignaturePolicy((W1.verifier, Ed25519CosignatureVerifier(W1.name, _key(50).public_key())), 1)
    # One key under two names: the message does not commit to the name, so one cosignature would
    # count twice. Shown here, then refused by the policy.
    alias = Ed25519CosignatureVerifier("witness.example/alias", _key(11).public_key())
    sig = W1.cosign(TEXT, T)
    copied = NoteSignature(alias.name, alias.key_id, sig.signature)
    assert verify_cosignature_line(line(copied), TEXT, alias) == T
    with pytest.raises(ValueError, match="share a public key"):
        CosignaturePolicy((W1.verifier, alias), 2)


def test_note_that_is_not_a_checkpoint_is_a_decode_error() -> None:
    note = sign_note(b"hello\n", [LOG])
    with pytest.raises(DecodeError):
        verify_cosignatures(note, POLICY)
