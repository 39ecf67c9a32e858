"""The signed bundle format (cloister/verify/bundle.py): the payload names its log and its expiry."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.verify.bundle import (
    ALG_EDDSA,
    FORMAT,
    MAX_NOT_AFTER,
    admin_key_id,
    origin_problem,
    pack_payload,
    read_bundle_header,
    read_bundle_scope,
    sign_bundle,
    unsigned_files,
    verify_bundle,
)
from cloister.verify.cose import encode_cose_sign1
from cloister.verify.errors import DecodeError, VerificationError

ORIGIN = "cloister.example.com/log/prod-1"
NOT_AFTER = 1_780_000_000  # 2026-05-28T20:26:40Z
FILES = {"bundle.toml": b"[bundle]\n", "policies/a.cedar": b""}
ADMIN = ed25519.Ed25519PrivateKey.generate()
KEYS = {admin_key_id(ADMIN.public_key()): ADMIN.public_key()}


def signed_payload(body: dict[str, Any], key: ed25519.Ed25519PrivateKey = ADMIN) -> bytes:
    kid = admin_key_id(key.public_key()).encode()
    return encode_cose_sign1({1: ALG_EDDSA, 4: kid}, {}, cbor2.dumps(body, canonical=True), key.sign, tagged=True)


def test_the_payload_carries_origin_and_not_after_under_the_signature() -> None:
    data = sign_bundle(FILES, 3, ADMIN, origin=ORIGIN, not_after=NOT_AFTER)
    signed = verify_bundle(data, KEYS, origin=ORIGIN, now_ms=NOT_AFTER * 1000 + 999)  # the last loadable instant
    assert (signed.version, signed.origin, signed.not_after, dict(signed.files)) == (3, ORIGIN, NOT_AFTER, FILES)
    body = cbor2.loads(pack_payload(FILES, 3, origin=ORIGIN, not_after=NOT_AFTER))
    assert body == {"format": FORMAT, "version": 3, "origin": ORIGIN, "not_after": NOT_AFTER, "files": FILES}
    assert FORMAT == "cloister-bundle/2"
    # The local tools read them unverified.
    assert read_bundle_header(data)[0] == 3 and read_bundle_scope(data) == (ORIGIN, NOT_AFTER)
    assert unsigned_files(data) == FILES


def test_a_bundle_for_another_origin_or_past_its_not_after_is_refused() -> None:
    data = sign_bundle(FILES, 3, ADMIN, origin="cloister.example.com/log/staging", not_after=NOT_AFTER)
    with pytest.raises(VerificationError, match=r"bundle is for the log 'cloister.example.com/log/staging', not this"):
        verify_bundle(data, KEYS, origin=ORIGIN, now_ms=0)
    # Origins compare exactly: no case folding, no trailing slash.
    for near in (ORIGIN.upper(), ORIGIN + "/", ORIGIN[:-1]):
        with pytest.raises(VerificationError, match="bundle is for the log"):
            verify_bundle(sign_bundle(FILES, 3, ADMIN, origin=near, not_after=NOT_AFTER), KEYS, origin=ORIGIN, now_ms=0)
    good = sign_bundle(FILES, 3, ADMIN, origin=ORIGIN, not_after=NOT_AFTER)
    with pytest.raises(VerificationError, match=r"bundle expired: not after 2026-05-28T20:26:40Z, and it is 2026-05"):
        verify_bundle(good, KEYS, origin=ORIGIN, now_ms=NOT_AFTER * 1000 + 1000)


def test_a_bundle_in_the_old_format_is_refused_with_how_to_re_sign_it() -> None:
    old = signed_payload({"format": "cloister-bundle/1", "version": 9, "files": FILES})
    with pytest.raises(
        VerificationError, match=r"^bundle names no origin .*re-sign it with cloister policy sign --origin"
    ):
        verify_bundle(old, KEYS, origin=ORIGIN, now_ms=0)
    assert read_bundle_scope(old) == (None, None) and read_bundle_header(old)[0] == 9


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"origin": None}, "bundle origin: an origin must be a non-empty string"),
        ({"origin": ""}, "bundle origin: an origin must be a non-empty string"),
        ({"origin": "a\nb"}, "one line of printable characters"),
        ({"not_after": None}, "bundle not_after must be Unix seconds"),
        ({"not_after": 0}, "bundle not_after must be Unix seconds"),
        ({"not_after": MAX_NOT_AFTER + 1}, "bundle not_after must be Unix seconds"),
        ({"not_after": True}, "bundle not_after must be Unix seconds"),
        ({"not_after": "1780000000"}, "bundle not_after must be Unix seconds"),
        ({"extra": 1}, r"bundle payload has unknown fields \['extra'\]"),
    ],
)
def test_a_signed_payload_with_a_bad_scope_is_a_decode_error(edit: dict[str, Any], message: str) -> None:
    body: dict[str, Any] = {"format": FORMAT, "version": 2, "origin": ORIGIN, "not_after": NOT_AFTER, "files": FILES}
    body.update(edit)
    with pytest.raises(DecodeError, match=message):
        verify_bundle(signed_payload({k: v for k, v in body.items() if v is not None}), KEYS, origin=ORIGIN, now_ms=0)


def test_signing_refuses_what_no_enclave_could_load() -> None:
    for origin in ("", " x", "x ", "a\tb", "x" * 256):
        assert origin_problem(origin) is not None
        with pytest.raises(DecodeError, match="bundle origin"):
            pack_payload(FILES, 1, origin=origin, not_after=NOT_AFTER)
    for not_after in (0, -1, MAX_NOT_AFTER + 1):
        with pytest.raises(DecodeError, match="bundle not_after"):
            pack_payload(FILES, 1, origin=ORIGIN, not_after=not_after)
    assert origin_problem(ORIGIN) is None and origin_problem("x" * 255) is None
