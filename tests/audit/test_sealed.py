"""Sealed bodies (cloister.audit.sealed): RFC 9180 HPKE base mode, checked against RFC 9180's
vectors (Appendix A.2.1, tests/audit/vectors) and the independent implementation in
`cryptography`; both envelopes' binding to one entry, kind, key (and CLS2's to its sequence
number); the CLS2 sealer's rotation, the opener's context cache, and the relay's stored bodies."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import cloister.audit.sealed as sealed_module
from cloister.audit.bodies import check_body
from cloister.audit.sealed import (
    INFO,
    MAGIC,
    MAGIC_V2,
    MAX_SEQ,
    BodyOpener,
    BodySealer,
    RecipientContext,
    SealedBodyV2,
    hpke_open,
    hpke_seal,
    is_sealed,
    key_id,
    open_body,
    parse_sealed,
    seal_body,
    setup_base_r,
    setup_base_s,
)
from cloister.relay.enclave_client import EnclaveClient
from cloister.relay.state import RelayState
from cloister.relay.storage import LocalBackend, LogWriter
from cloister.verify.canonical import canonical_json, canonical_sha256
from cloister.verify.errors import DecodeError, VerificationError
from tests.relay.inprocess import relay_config

hpke = pytest.importorskip("cryptography.hazmat.primitives.hpke", reason="cryptography without HPKE")
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
BODY = b'{"card":"4242-4242-4242-4242"}'


def test_our_hpke_and_cryptographys_open_each_others_messages() -> None:
    key = X25519PrivateKey.generate()
    enc, ct = hpke_seal(key.public_key(), INFO, b"", BODY)
    assert SUITE.decrypt(enc + ct, key, info=INFO) == BODY
    theirs = SUITE.encrypt(BODY, key.public_key(), info=INFO)
    assert hpke_open(key, theirs[:32], INFO, b"", theirs[32:]) == BODY


def test_a_sealed_body_opens_only_for_its_entry_kind_and_key() -> None:
    key = X25519PrivateKey.generate()
    sealed = seal_body(key.public_key(), 7, "args", BODY)
    assert is_sealed(sealed) and not is_sealed(BODY) and BODY not in sealed
    assert parse_sealed(sealed).key_id == key_id(key.public_key()) and sealed.startswith(MAGIC)
    assert len(sealed) == len(BODY) + 4 + 8 + 32 + 16
    assert open_body(key, 7, "args", sealed) == BODY
    for index, kind in ((8, "args"), (7, "result")):  # moved to another entry, or passed off as a result
        with pytest.raises(VerificationError, match="does not authenticate"):
            open_body(key, index, kind, sealed)
    with pytest.raises(VerificationError, match="sealed to auditor key"):
        open_body(X25519PrivateKey.generate(), 7, "args", sealed)
    for i in (4, 12, 44, len(sealed) - 1):  # any flipped byte: header, key id, enc, ciphertext, tag
        tampered = bytearray(sealed)
        tampered[i] ^= 1
        with pytest.raises((VerificationError, DecodeError)):
            open_body(key, 7, "args", bytes(tampered))
    # Two seals of the same body differ (a fresh ephemeral key each): equal bodies do not show.
    assert seal_body(key.public_key(), 7, "args", BODY) != sealed


def test_malformed_envelopes_and_arguments_are_refused() -> None:
    key = X25519PrivateKey.generate()
    with pytest.raises(DecodeError, match="does not start with"):
        parse_sealed(BODY)
    with pytest.raises(DecodeError, match="shorter than its header"):
        parse_sealed(MAGIC + b"\x00" * 40)
    with pytest.raises(ValueError, match="kind"):
        seal_body(key.public_key(), 1, "other", BODY)
    with pytest.raises(ValueError, match="2\\*\\*64"):
        seal_body(key.public_key(), 1 << 64, "args", BODY)
    # A low-order point as the encapsulated key gives no usable secret.
    low_order = MAGIC + key_id(key.public_key()) + b"\x00" * 32 + b"\x00" * 16
    with pytest.raises(VerificationError):
        open_body(key, 1, "args", low_order)


# ---- CLS2: one HPKE sender context for many bodies (decision 0032) -----------------------------

VECTORS = json.loads((Path(__file__).parent / "vectors" / "rfc9180_a2_base.json").read_text())


def _hex(name: str) -> bytes:
    return bytes.fromhex(VECTORS["setup"][name])


def test_the_vectors_are_rfc9180_a2_base_mode() -> None:
    setup = VECTORS["setup"]
    assert (setup["mode"], setup["kem_id"], setup["kdf_id"], setup["aead_id"]) == (0, 32, 1, 3)
    assert [e["seq"] for e in VECTORS["encryptions"]] == [0, 1, 2, 4, 255, 256]


def test_sender_context_matches_rfc9180_a2_1_at_every_sequence_number() -> None:
    sk_e = X25519PrivateKey.from_private_bytes(_hex("skEm"))
    pk_r = X25519PrivateKey.from_private_bytes(_hex("skRm")).public_key()
    assert sk_e.public_key().public_bytes_raw() == _hex("pkEm") and pk_r.public_bytes_raw() == _hex("pkRm")
    enc, ctx = setup_base_s(pk_r, _hex("info"), ephemeral=sk_e)
    assert (enc, ctx.key, ctx.base_nonce, ctx.seq) == (_hex("enc"), _hex("key"), _hex("base_nonce"), 0)
    wanted = {e["seq"]: e for e in VECTORS["encryptions"]}
    # The RFC's vectors are the messages numbered 0..256 of one context, AAD "Count-<seq>".
    for seq in range(max(wanted) + 1):
        ct = ctx.seal(f"Count-{seq}".encode(), bytes.fromhex(wanted[0]["pt"]))
        if seq in wanted:
            assert bytes.fromhex(wanted[seq]["aad"]) == f"Count-{seq}".encode()
            assert ct.hex() == wanted[seq]["ct"], seq
    assert ctx.seq == max(wanted) + 1


def test_recipient_context_opens_rfc9180_a2_1_in_any_order() -> None:
    ctx = setup_base_r(_hex("enc"), X25519PrivateKey.from_private_bytes(_hex("skRm")), _hex("info"))
    assert (ctx.key, ctx.base_nonce) == (_hex("key"), _hex("base_nonce"))
    for e in reversed(VECTORS["encryptions"]):
        seq, aad, ct = e["seq"], bytes.fromhex(e["aad"]), bytes.fromhex(e["ct"])
        assert ctx.open(seq, aad, ct) == bytes.fromhex(e["pt"])
        with pytest.raises(VerificationError, match="does not authenticate"):
            ctx.open(seq + 1, aad, ct)  # its nonce is base_nonce XOR seq: another seq is another nonce
        with pytest.raises(VerificationError, match="does not authenticate"):
            ctx.open(seq, aad + b"!", ct)


def test_context_code_and_cryptographys_single_shot_agree_at_seq_0_without_aad() -> None:
    key = X25519PrivateKey.generate()
    enc, ctx = setup_base_s(key.public_key(), INFO)
    first, second = ctx.seal(b"", BODY), ctx.seal(b"", BODY)
    assert SUITE.decrypt(enc + first, key, info=INFO) == BODY
    with pytest.raises(InvalidTag):  # message 1 has another nonce: single shot (seq 0) cannot open it
        SUITE.decrypt(enc + second, key, info=INFO)
    theirs = SUITE.encrypt(BODY, key.public_key(), info=INFO)
    assert setup_base_r(theirs[:32], key, INFO).open(0, b"", theirs[32:]) == BODY


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _sealer(key: X25519PrivateKey, **kw: Any) -> tuple[BodySealer, FakeClock]:
    clock = FakeClock()
    return BodySealer(key.public_key(), clock=clock, **kw), clock


def _enc_seq(sealed: bytes) -> tuple[bytes, int]:
    parsed = parse_sealed(sealed)
    assert isinstance(parsed, SealedBodyV2)
    return parsed.enc, parsed.seq


def test_a_cls2_body_has_the_documented_layout_and_aad() -> None:
    key = X25519PrivateKey.generate()
    sealer, _ = _sealer(key)
    sealer.seal(3, "result", b"{}")
    sealed = sealer.seal(7, "args", BODY)
    kid = key_id(key.public_key())
    assert sealed[:4] == MAGIC_V2 == b"CLS2" and sealed[4:12] == kid and len(sealed) == len(BODY) + 4 + 8 + 32 + 8 + 16
    assert struct.unpack(">Q", sealed[44:52]) == (1,)
    parsed = parse_sealed(sealed)
    assert isinstance(parsed, SealedBodyV2) and parsed.version == 2
    assert (parsed.key_id, parsed.enc, parsed.seq, parsed.ciphertext) == (kid, sealed[12:44], 1, sealed[52:])
    # Spelled out here, independently of the module: aad = "CLS2" | key id | index (u64) | kind (1 args).
    aad = b"CLS2" + kid + struct.pack(">QB", 7, 1)
    assert setup_base_r(parsed.enc, key, b"cloister sealed body v1").open(1, aad, parsed.ciphertext) == BODY
    assert is_sealed(sealed) and BODY not in sealed


def test_a_cls2_body_opens_only_for_its_entry_kind_key_and_seq() -> None:
    key = X25519PrivateKey.generate()
    sealer, _ = _sealer(key)
    first, sealed = sealer.seal(7, "args", BODY), sealer.seal(7, "result", BODY)
    assert open_body(key, 7, "args", first) == BODY and open_body(key, 7, "result", sealed) == BODY
    for index, kind in ((8, "result"), (7, "args"), (6, "result")):
        with pytest.raises(VerificationError, match="does not authenticate"):
            open_body(key, index, kind, sealed)
    with pytest.raises(VerificationError, match="sealed to auditor key"):
        open_body(X25519PrivateKey.generate(), 7, "result", sealed)
    # Any flipped bit anywhere (magic, key id, enc, seq, ciphertext, tag) fails.
    for i in range(len(sealed)):
        for bit in (0x01, 0x80):
            tampered = bytearray(sealed)
            tampered[i] ^= bit
            with pytest.raises((VerificationError, DecodeError)):
                open_body(key, 7, "result", bytes(tampered))
    # Moved to another seq of its context (the first body's, or past the end), it fails.
    for seq in (0, 2, MAX_SEQ):
        moved = sealed[:44] + struct.pack(">Q", seq) + sealed[52:]
        with pytest.raises(VerificationError, match="does not authenticate"):
            open_body(key, 7, "result", moved)
    # Swapped ciphertexts of one context fail at each other's seq.
    with pytest.raises(VerificationError):
        open_body(key, 7, "result", sealed[:52] + first[52:])


def test_cls1_and_cls2_cannot_be_passed_off_as_each_other() -> None:
    """At seq 0 a CLS2 body has CLS1's key and nonce (same suite, info and enc): only the magic
    in the aad tells them apart, so it must be there."""
    key = X25519PrivateKey.generate()
    sealer, _ = _sealer(key)
    v2 = sealer.seal(7, "args", BODY)
    assert _enc_seq(v2)[1] == 0
    as_v1 = MAGIC + v2[4:44] + v2[52:]
    with pytest.raises(VerificationError, match="does not authenticate"):
        open_body(key, 7, "args", as_v1)
    v1 = seal_body(key.public_key(), 7, "args", BODY)
    as_v2 = MAGIC_V2 + v1[4:44] + struct.pack(">Q", 0) + v1[44:]
    with pytest.raises(VerificationError, match="does not authenticate"):
        open_body(key, 7, "args", as_v2)
    # Only the magic relabelled (the layout left as it was): fails too.
    for forged in (MAGIC_V2 + v1[4:], MAGIC + v2[4:]):
        with pytest.raises((VerificationError, DecodeError)):
            open_body(key, 7, "args", forged)


def test_a_new_context_after_max_bodies() -> None:
    key = X25519PrivateKey.generate()
    sealer, _ = _sealer(key, max_bodies=3)
    bodies = [sealer.seal(i, "args", BODY) for i in range(7)]
    got = [_enc_seq(b) for b in bodies]
    assert [seq for _, seq in got] == [0, 1, 2, 0, 1, 2, 0]
    encs = [enc for enc, _ in got]
    assert len({encs[0], encs[3], encs[6]}) == 3 and encs[0] == encs[1] == encs[2] and encs[3] == encs[5]
    assert [open_body(key, i, "args", b) for i, b in enumerate(bodies)] == [BODY] * 7


def test_a_new_context_after_max_age_of_the_injected_clock() -> None:
    key = X25519PrivateKey.generate()
    sealer, clock = _sealer(key, max_age_s=60.0)
    a = _enc_seq(sealer.seal(1, "args", BODY))
    clock.now += 59.9
    b = _enc_seq(sealer.seal(2, "args", BODY))
    assert b == (a[0], 1)
    clock.now += 0.1  # 60 s after the context was set up
    c = _enc_seq(sealer.seal(3, "args", BODY))
    assert c[0] != a[0] and c[1] == 0
    clock.now -= 5.0  # a clock that went back does not stretch the window
    d = _enc_seq(sealer.seal(4, "args", BODY))
    assert d[0] not in (a[0], c[0]) and d[1] == 0


def test_two_seals_of_one_body_differ() -> None:
    key = X25519PrivateKey.generate()
    sealer, _ = _sealer(key)
    one, two = sealer.seal(7, "args", BODY), sealer.seal(7, "args", BODY)
    assert one[52:] != two[52:]  # same context, another seq: another nonce
    other, _ = _sealer(key)
    assert other.seal(7, "args", BODY)[12:44] != one[12:44]  # another sealer: another ephemeral key


def test_sequence_numbers_never_wrap_and_bad_arguments_spend_none() -> None:
    key = X25519PrivateKey.generate()
    enc, ctx = setup_base_s(key.public_key(), INFO)
    ctx.seq = MAX_SEQ  # as if 2**64 - 1 messages had been sealed
    last = ctx.seal(b"", BODY)
    assert setup_base_r(enc, key, INFO).open(MAX_SEQ, b"", last) == BODY
    with pytest.raises(OverflowError, match="sequence numbers"):
        ctx.seal(b"", BODY)
    assert ctx.seq == MAX_SEQ + 1  # refused before encrypting: nothing sealed under a wrapped nonce
    for seq in (-1, MAX_SEQ + 1, 1 << 96):  # a recipient refuses what no CLS2 sender can have sealed
        with pytest.raises(VerificationError, match="outside"):
            setup_base_r(enc, key, INFO).open(seq, b"", last)
    for bad in (0, MAX_SEQ + 2):
        with pytest.raises(ValueError, match="max_bodies"):
            BodySealer(key.public_key(), clock=FakeClock(), max_bodies=bad)
    for age in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="max_age_s"):
            BodySealer(key.public_key(), clock=FakeClock(), max_age_s=age)
    sealer, _ = _sealer(key)
    with pytest.raises(ValueError, match="2\\*\\*64"):
        sealer.seal(1 << 64, "args", BODY)
    with pytest.raises(ValueError, match="kind"):
        sealer.seal(1, "other", BODY)
    assert _enc_seq(sealer.seal(1, "args", BODY))[1] == 0


def test_malformed_cls2_envelopes_are_decode_errors() -> None:
    key = X25519PrivateKey.generate()
    for data in (b"", b"CLS", b"CLS3" + b"\x00" * 80, b"cls2" + b"\x00" * 80):
        with pytest.raises(DecodeError, match="does not start with"):
            parse_sealed(data)
    with pytest.raises(DecodeError, match="CLS2.*shorter than its header and tag \\(68\\)"):
        parse_sealed(MAGIC_V2 + b"\x00" * 63)
    empty = parse_sealed(MAGIC_V2 + b"\x00" * 64)  # an empty plaintext: header and tag only
    assert isinstance(empty, SealedBodyV2) and empty.ciphertext == b"\x00" * 16
    # A low-order point as the encapsulated key gives no usable secret, and nothing is cached.
    opener = BodyOpener(key)
    low_order = MAGIC_V2 + key_id(key.public_key()) + b"\x00" * 32 + struct.pack(">Q", 0) + b"\x00" * 16
    for _ in range(2):
        with pytest.raises(VerificationError, match="encapsulated key is unusable"):
            opener.open(1, "args", low_order)


def test_an_opener_sets_up_each_context_once_and_keeps_a_bounded_number(monkeypatch: pytest.MonkeyPatch) -> None:
    key = X25519PrivateKey.generate()
    setups: list[bytes] = []
    real = sealed_module.setup_base_r

    def counting(enc: bytes, sk_r: X25519PrivateKey, info: bytes) -> RecipientContext:
        setups.append(enc)
        return real(enc, sk_r, info)

    monkeypatch.setattr(sealed_module, "setup_base_r", counting)
    sealer, _ = _sealer(key, max_bodies=50)
    bodies = [sealer.seal(i, "result", BODY) for i in range(150)]  # three contexts
    opener = BodyOpener(key, max_contexts=2)
    assert [opener.open(i, "result", b) for i, b in enumerate(bodies)] == [BODY] * 150
    assert len(setups) == 3  # one DH and key schedule per context, not per body
    a, b = (_enc_seq(bodies[i])[0] for i in (0, 50))
    setups.clear()
    # Room for two, least recently used evicted: B and C are kept after the first pass.
    for i in (0, 100, 1, 101):  # A again (evicts B), then C, A, C: all kept
        opener.open(i, "result", bodies[i])
    assert setups == [a]
    opener.open(50, "result", bodies[50])  # B evicts A (least recently used), not C
    opener.open(102, "result", bodies[102])
    opener.open(2, "result", bodies[2])
    assert setups == [a, b, a]
    # A CLS1 body opens with the same opener.
    assert opener.open(9, "args", seal_body(key.public_key(), 9, "args", BODY)) == BODY
    with pytest.raises(ValueError, match="max_contexts"):
        BodyOpener(key, max_contexts=0)


def test_the_relay_stores_cls2_bodies_of_one_context_that_check(tmp_path: Path) -> None:
    """RelayState.store_body with an auditor key: what reaches storage is CLS2, one context for
    successive bodies, and each opens and checks against its commitment (cloister.audit.bodies)."""
    key = X25519PrivateKey.generate()
    config = relay_config(tmp_path, body_public_key=key.public_key())
    values: list[Any] = [{"card": "4242"}, {"content": [{"type": "text", "text": "ok"}]}, {"n": 3}]

    async def main() -> list[bytes]:
        plain = RelayState(dataclasses.replace(config, body_public_key=None), cast("EnclaveClient", None))
        state = RelayState(config, cast("EnclaveClient", None))
        state.writer = plain.writer = await LogWriter.open(LocalBackend(config.storage))
        try:
            for i, value in enumerate(values):
                await state.store_body(i, "args", canonical_json(value))
            await plain.store_body(9, "args", b'{"plain":true}')
            records = [await state.writer.get_body_record(i, "args") for i in (*range(len(values)), 9)]
        finally:
            await state.writer.close()
        return [r.data for r in records if r is not None and r.data is not None]

    *stored, plain = anyio.run(main)
    assert plain == b'{"plain":true}' and not is_sealed(plain)  # no auditor key: stored as given
    assert len(stored) == len(values) and all(s.startswith(b"CLS2") for s in stored)
    assert len({_enc_seq(s)[0] for s in stored}) == 1 and [_enc_seq(s)[1] for s in stored] == [0, 1, 2]
    opener = BodyOpener(key)
    for i, (data, value) in enumerate(zip(stored, values, strict=True)):
        checked = check_body(data, index=i, kind="args", commitment=canonical_sha256(value), key=opener)
        assert checked.value == value and checked.sealed_to == key_id(key.public_key()).hex()
        assert check_body(data, index=i, kind="args", commitment=canonical_sha256(value), key=key).value == value
    with pytest.raises(VerificationError, match="commits to"):
        check_body(stored[0], index=0, kind="args", commitment=canonical_sha256(values[1]), key=opener)
    with pytest.raises(VerificationError, match="does not authenticate"):
        check_body(stored[0], index=1, kind="args", commitment=canonical_sha256(values[0]), key=opener)
