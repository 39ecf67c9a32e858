"""COSE_Sign1 parsing, Sig_structure and encoding (RFC 9052 §4.2, §4.4)."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cloister.verify.cose import CoseSign1, encode_cose_sign1, parse_cose_sign1, sig_structure
from cloister.verify.errors import DecodeError

MAX = 1 << 16


def _signed(tagged: bool) -> tuple[bytes, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    data = encode_cose_sign1({1: -8}, {4: b"kid"}, b"hello", key.sign, tagged=tagged)
    return data, key


@pytest.mark.parametrize("tagged", [False, True])
def test_round_trip_and_verify(tagged: bool) -> None:
    data, key = _signed(tagged)
    msg = parse_cose_sign1(data, max_size=MAX)
    assert isinstance(msg, CoseSign1)
    assert msg.tagged is tagged
    assert msg.protected == bytes.fromhex("a10127")  # {1: -8}
    assert msg.protected_map == {1: -8}
    assert msg.unprotected == {4: b"kid"}
    assert msg.payload == b"hello"
    key.public_key().verify(msg.signature, sig_structure(msg.protected, msg.payload))
    assert data[0] == (0xD2 if tagged else 0x84)


def test_sig_structure_bytes() -> None:
    # ["Signature1", h'a10127', h'', h'6869'] written out by hand.
    expected = bytes.fromhex("84" + "6a" + b"Signature1".hex() + "43a10127" + "40" + "426869")
    assert sig_structure(bytes.fromhex("a10127"), b"hi") == expected
    with_aad = sig_structure(b"", b"", b"\x01")
    assert with_aad == bytes.fromhex("846a") + b"Signature1" + bytes.fromhex("40410140")


def test_protected_bytes_kept_exactly_as_received() -> None:
    # A non-minimal encoding of {1: -8} (key as a one-byte uint): a re-encoding would differ,
    # and the signature must be checked over the received bytes.
    odd = bytes.fromhex("a1180127")
    key = Ed25519PrivateKey.generate()
    sig = key.sign(sig_structure(odd, b"p"))
    data = cbor2.dumps([odd, {}, b"p", sig])
    msg = parse_cose_sign1(data, max_size=MAX)
    assert msg.protected == odd
    assert msg.protected_map == {1: -8}
    key.public_key().verify(msg.signature, sig_structure(msg.protected, msg.payload))
    with pytest.raises(InvalidSignature):
        key.public_key().verify(msg.signature, sig_structure(cbor2.dumps({1: -8}), msg.payload))


def test_empty_protected_is_empty_map() -> None:
    data = encode_cose_sign1({}, {}, b"x", lambda _: b"s", tagged=False)
    msg = parse_cose_sign1(data, max_size=MAX)
    assert msg.protected == b""
    assert msg.protected_map == {}


def test_independent_producer_pycose() -> None:
    """A message made by pycose parses and verifies with our Sig_structure.

    (The reverse direction is not tested: pycose 1.1 cannot decode tagged messages under
    cbor2 6, which returns the tag content as a tuple.)
    """
    from pycose.algorithms import EdDSA
    from pycose.headers import Algorithm
    from pycose.keys.curves import Ed25519
    from pycose.keys.okp import OKPKey
    from pycose.messages.sign1message import Sign1Message

    cose_key = OKPKey.generate_key(crv=Ed25519)
    msg = Sign1Message(phdr={Algorithm: EdDSA}, payload=b"from pycose")
    msg.key = cose_key
    data = msg.encode(tag=True)
    parsed = parse_cose_sign1(data, max_size=MAX)
    assert parsed.tagged and parsed.payload == b"from pycose"
    pub = Ed25519PublicKey.from_public_bytes(cose_key.x)
    pub.verify(parsed.signature, sig_structure(parsed.protected, parsed.payload))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"", b""])), "unexpected CBOR tag 98"),
        (cbor2.dumps({1: 2}), "not an array of 4"),
        (cbor2.dumps(cbor2.CBORTag(18, b"")), "not an array of 4"),
        (cbor2.dumps([b"", {}, b""]), "not an array of 4"),
        (cbor2.dumps([b"", {}, b"", b"", b""]), "not an array of 4"),
        (cbor2.dumps([{}, {}, b"", b""]), "protected header [0]"),
        (cbor2.dumps([b"", None, b"", b""]), "unprotected header [1] is null"),
        (cbor2.dumps([b"", [], b"", b""]), "unprotected header [1] is array"),
        (cbor2.dumps([b"", {}, None, b""]), "detached payloads"),
        (cbor2.dumps([b"", {}, b"", "sig"]), "signature [3]"),
        (cbor2.dumps([b"\x80", {}, b"", b""]), "does not encode a map"),
        (cbor2.dumps([b"\xa1\x01", {}, b"", b""]), "protected header: not well-formed"),
        (cbor2.dumps([b"\xa0\x00", {}, b"", b""]), "protected header: 1 trailing"),
        (cbor2.dumps([b"", {}, b"", b""]) + b"\x00", "1 trailing bytes"),
        (b"", "not well-formed"),
        (b"\x84\x40\xa0", "not well-formed"),
        (b"\xff\xff", "not well-formed"),
    ],
)
def test_rejects(data: bytes, fragment: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_cose_sign1(data, max_size=MAX)
    assert fragment in str(info.value)


def test_cause_is_chained() -> None:
    with pytest.raises(DecodeError) as info:
        parse_cose_sign1(b"\x84\x40", max_size=MAX)
    assert info.value.__cause__ is not None


def test_size_cap() -> None:
    data, _ = _signed(False)
    parse_cose_sign1(data, max_size=len(data))
    with pytest.raises(DecodeError, match="exceeds the limit"):
        parse_cose_sign1(data, max_size=len(data) - 1)
