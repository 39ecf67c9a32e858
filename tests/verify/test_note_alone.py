"""`Ed25519NoteSigner.sign_note_alone`, the log's one-signer note on every append: byte for byte
what `sign_note(text, [signer])` makes, refusing the same texts."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloister.verify.errors import DecodeError
from cloister.verify.note import Ed25519NoteSigner, NoteSignature, sign_note, verify_note


@pytest.mark.parametrize("name", ["cloister.test/log", "example.com/ünï", "a"])
@pytest.mark.parametrize(
    "text", [b"origin\n1\nAAAA\n", b"x\n", "ünïcode\nlines\n".encode(), b"origin\n" + b"y" * 5000 + b"\n"]
)
def test_sign_note_alone_is_sign_note(name: str, text: bytes) -> None:
    signer = Ed25519NoteSigner(name, Ed25519PrivateKey.generate())
    note = signer.sign_note_alone(text)
    assert note == sign_note(text, [signer])  # Ed25519 signatures are deterministic
    assert verify_note(note, [signer.verifier]).text == text


@pytest.mark.parametrize("text", [b"no final newline", b"control \x01\n", b"\xff\n"])
def test_sign_note_alone_refuses_what_sign_note_refuses(text: bytes) -> None:
    signer = Ed25519NoteSigner("log", Ed25519PrivateKey.generate())
    with pytest.raises(DecodeError):
        sign_note(text, [signer])
    with pytest.raises(DecodeError):
        signer.sign_note_alone(text)


def test_a_subclass_that_signs_its_own_way_is_used() -> None:
    class Other(Ed25519NoteSigner):
        def sign(self, text: bytes) -> NoteSignature:
            return NoteSignature(self.name, self.key_id, b"\x01" * 64)

    signer = Other("log", Ed25519PrivateKey.generate())
    assert signer.sign_note_alone(b"t\n") == sign_note(b"t\n", [signer])
    assert signer.sign_note_alone(b"t\n").endswith(NoteSignature("log", signer.key_id, b"\x01" * 64).to_line().encode())
