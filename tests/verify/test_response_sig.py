"""cloister.verify.response_sig: the checked-in vectors, the result-hash rule, the verdicts, and
what a forger or a hostile host can and cannot make pass."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.response_sig import (
    RESPONSE_SIG_META_KEY,
    ResponseCheck,
    ResponseStatus,
    UpstreamBinding,
    parse_upstream_binding,
    response_message,
    response_verdict,
    result_sha256,
    sign_response,
    signature_from_meta,
    verify_response,
    without_signature,
)
from cloister.wire import contract

VECTORS = json.loads((Path(__file__).parents[1] / "fixtures" / "response_sig" / "vectors.json").read_text())["vectors"]


def raw(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["nonce"][:8])
def test_vectors(v: dict[str, Any]) -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["seed"]))
    nonce, digest = bytes.fromhex(v["nonce"]), bytes.fromhex(v["result_sha256"])
    assert raw(key).hex() == v["public_key"]
    # The hash is the same before signing and after (the signature is not part of what it covers).
    assert result_sha256(v["result"]) == digest
    assert result_sha256(v["signed_result"]) == digest
    assert response_message(nonce, digest).hex() == v["message"]
    assert sign_response(key, nonce, digest).hex() == v["signature"]
    sig = signature_from_meta(v["signed_result"]["_meta"])
    assert sig is not None and sig.hex() == v["signature"]
    verify_response(bytes.fromhex(v["public_key"]), sig, nonce, digest)


def test_meta_key_is_the_contracts() -> None:
    assert contract.RESPONSE_SIG_META_KEY == RESPONSE_SIG_META_KEY == "dev.cloister/response-sig"


def test_without_signature_drops_only_the_signature_and_an_empty_meta() -> None:
    other = {"_meta": {"a": 1, RESPONSE_SIG_META_KEY: "x"}, "content": []}
    assert without_signature(other) == {"_meta": {"a": 1}, "content": []}
    assert without_signature({"_meta": {RESPONSE_SIG_META_KEY: "x"}, "content": []}) == {"content": []}
    # An empty _meta before signing hashes like no _meta: signing adds the key to it.
    assert result_sha256({"_meta": {}, "content": []}) == result_sha256({"content": []})
    assert other["_meta"] == {"a": 1, RESPONSE_SIG_META_KEY: "x"}  # the input is not changed


def test_the_hash_covers_everything_but_the_signature() -> None:
    base = {"content": [{"type": "text", "text": "refunded 120"}], "isError": False}
    changed = [
        {**base, "isError": True},
        {**base, "content": [{"type": "text", "text": "refunded 1200"}]},
        {**base, "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "evil"}}},
        {**base, "structuredContent": {"amount": 120}},
    ]
    assert len({result_sha256(base), *(result_sha256(c) for c in changed)}) == 1 + len(changed)


def test_verify_refuses_another_nonce_result_or_key() -> None:
    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    nonce, digest = b"\x01" * 16, b"\x02" * 32
    sig = sign_response(key, nonce, digest)
    verify_response(raw(key), sig, nonce, digest)
    for args in (
        (raw(key), sig, b"\x03" * 16, digest),  # another call's nonce: a replayed signature
        (raw(key), sig, nonce, b"\x04" * 32),  # another result
        (raw(other), sig, nonce, digest),  # another server's key
        (raw(key), bytes(64), nonce, digest),
    ):
        with pytest.raises(VerificationError, match="does not verify"):
            verify_response(*args)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((b"\x00" * 31, b"\x00" * 64, b"\x00" * 16, b"\x00" * 32), "response key must be 32 bytes"),
        ((b"\x00" * 32, b"\x00" * 63, b"\x00" * 16, b"\x00" * 32), "signature must be 64 bytes"),
        ((b"\x00" * 32, b"\x00" * 64, b"\x00" * 15, b"\x00" * 32), "nonce must be 16 bytes"),
        ((b"\x00" * 32, b"\x00" * 64, b"\x00" * 16, b"\x00" * 33), "result hash must be 32 bytes"),
    ],
)
def test_verify_refuses_malformed_input(args: tuple[bytes, bytes, bytes, bytes], match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        verify_response(*args)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({RESPONSE_SIG_META_KEY: 5}, "base64 text"),
        ({RESPONSE_SIG_META_KEY: "A" * 200}, "base64 text"),
        ({RESPONSE_SIG_META_KEY: "not base64!"}, "not valid base64"),
        ({RESPONSE_SIG_META_KEY: base64.b64encode(b"x" * 63).decode()}, "must hold 64 bytes"),
    ],
)
def test_signature_from_meta_refuses_malformed(meta: dict[str, Any], match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        signature_from_meta(meta)


def test_signature_from_meta_absent() -> None:
    assert signature_from_meta(None) is None
    assert signature_from_meta({"other": 1}) is None
    assert signature_from_meta("not a map") is None


def _check(**kw: Any) -> ResponseCheck:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
    base: dict[str, Any] = {
        "required": True,
        "response_key": raw(key),
        "nonce": b"\x01" * 16,
        "result_hash": b"\x02" * 32,
        "signature": sign_response(key, b"\x01" * 16, b"\x02" * 32),
    }
    return ResponseCheck(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "status"),
    [
        ({}, ResponseStatus.VERIFIED),
        ({"required": False}, ResponseStatus.NOT_REQUIRED),
        ({"required": False, "signature": bytes(64)}, ResponseStatus.NOT_REQUIRED),
        ({"result_hash": None}, ResponseStatus.NO_RESULT),
        ({"signature": None}, ResponseStatus.MISSING),
        ({"signature": bytes(64)}, ResponseStatus.INVALID),
        ({"signature": b"junk"}, ResponseStatus.INVALID),
        ({"nonce": b"\x09" * 16}, ResponseStatus.INVALID),
        ({"result_hash": b"\x09" * 32}, ResponseStatus.INVALID),
        ({"response_key": bytes(32)}, ResponseStatus.INVALID),
        ({"response_key": None}, ResponseStatus.UNCHECKED),
        ({"response_key": None, "signature": b"junk"}, ResponseStatus.INVALID),
    ],
)
def test_verdicts(kw: dict[str, Any], status: ResponseStatus) -> None:
    assert response_verdict(_check(**kw)) is status


def test_upstream_binding_round_trip_and_refusals() -> None:
    key = b"\x05" * 32
    data = UpstreamBinding(key).encode()
    assert parse_upstream_binding(data) == UpstreamBinding(key)
    for bad, match in [
        (None, "no user_data"),
        (b"\xff", "not well-formed CBOR"),
        (cbor2.dumps({"f": "cloister-enclave/1", "response_key": key}), "not a cloister-upstream/1"),
        (cbor2.dumps({"f": "cloister-upstream/1", "response_key": key[:31]}), "32-byte"),
        (cbor2.dumps({"f": "cloister-upstream/1", "response_key": key, "x": 1}, canonical=True), "extra fields"),
        (cbor2.dumps({"response_key": key, "f": "cloister-upstream/1"}), "deterministic"),
    ]:
        with pytest.raises(DecodeError, match=match):
            parse_upstream_binding(bad)
