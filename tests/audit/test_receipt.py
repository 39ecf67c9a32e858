"""Receipts: made online from an attested checkpoint, verified offline, and every part is bound."""

from __future__ import annotations

import base64
from pathlib import Path

import cbor2
import pytest

from cloister.audit.receipt import FORMAT, verify_receipt
from cloister.verify.attestation import TrustRoot
from cloister.verify.entries import DecisionEntry, KeyEntry
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.tlog_proof import TlogProof, format_tlog_proof, parse_tlog_proof
from tests.audit.clirun import cli
from tests.audit.conftest import trust
from tests.audit.logbuilder import LogServer, TestLog, pcr_args


@pytest.fixture(scope="module")
def receipts(built: TestLog, tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    state = tmp_path_factory.mktemp("receipt-state")
    out = {}
    with LogServer(built.dir, built.attest) as srv:
        for index in (0, 2, len(built.entries) - 1):
            r = cli("audit", "receipt", "--log", srv.url, *trust(built, state), "--index", str(index))
            assert r.code == 0, r.err
            out[index] = r.raw
    return out


def _root(log: TestLog) -> TrustRoot:
    return TrustRoot.from_pem(log.root_pem.read_bytes())


def test_a_receipt_is_a_tlog_proof_with_the_entry_and_the_attestation(
    built: TestLog, receipts: dict[int, bytes]
) -> None:
    proof = parse_tlog_proof(receipts[2])
    assert proof.index == 2
    assert proof.checkpoint_note.startswith(built.origin.encode() + b"\n")
    extra = cbor2.loads(proof.extra or b"")
    assert extra["f"] == FORMAT and extra["entry"] == built.entries[2]
    v = verify_receipt(receipts[2], root=_root(built), expected_pcrs=built.pcrs)
    assert isinstance(v.entry, DecisionEntry) and v.index == 2
    # The biggest entry kind, a key entry with its own attestation, fits too.
    assert isinstance(verify_receipt(receipts[0], root=_root(built)).entry, KeyEntry)


def test_verify_receipt_cli_json_and_failures(built: TestLog, receipts: dict[int, bytes], tmp_path: Path) -> None:
    f = tmp_path / "r"
    f.write_bytes(receipts[2])
    r = cli("audit", "verify-receipt", str(f), "--trust-root", str(built.root_pem), *pcr_args(built.pcrs), "--json")
    assert r.code == 0, r.err
    r = cli("audit", "verify-receipt", str(f), "--trust-root", str(built.root_pem), "--expect-pcr", "1=" + "00" * 48)
    assert r.code == 1 and "pcr-mismatch" in r.err
    r = cli("audit", "verify-receipt", str(f), "--trust-root", "aws")
    assert r.code == 1 and "wrong-root" in r.err


def _rebuild(receipt: bytes, **change: object) -> bytes:
    proof = parse_tlog_proof(receipt)
    extra = cbor2.loads(proof.extra or b"")
    fields = {
        "index": proof.index,
        "inclusion_proof": proof.inclusion_proof,
        "checkpoint_note": proof.checkpoint_note,
        "extra": proof.extra,
    }
    for key in ("entry", "attestation"):
        if key in change:
            extra[key] = change.pop(key)
    fields["extra"] = cbor2.dumps(extra, canonical=True)
    fields.update(change)
    return format_tlog_proof(TlogProof(**fields))  # type: ignore[arg-type]


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 1
    return bytes(b)


def test_every_part_of_a_receipt_is_bound(built: TestLog, receipts: dict[int, bytes]) -> None:
    good = receipts[2]
    proof = parse_tlog_proof(good)
    extra = cbor2.loads(proof.extra or b"")
    root = _root(built)
    cases: list[tuple[bytes, type[Exception], str]] = [
        # another entry in its place
        (_rebuild(good, entry=built.entries[3]), VerificationError, "does not match"),
        # the right entry, another index
        (_rebuild(good, index=3), VerificationError, "does not match"),
        # a changed proof hash
        (
            _rebuild(good, inclusion_proof=(_flip(proof.inclusion_proof[0], 0), *proof.inclusion_proof[1:])),
            VerificationError,
            "does not match",
        ),
        # a changed checkpoint: the attestation binds the original note
        (
            _rebuild(good, checkpoint_note=proof.checkpoint_note.replace(b"\n", b"\n1", 1)),
            VerificationError,
            "checkpoint-mismatch",
        ),
        # the attestation of the key entry (binds the key, but not this checkpoint)
        (
            _rebuild(good, attestation=cbor2.loads(built.entries[0])["attestation"]),
            VerificationError,
            "checkpoint-mismatch",
        ),
        # a damaged attestation
        (
            _rebuild(good, attestation=_flip(extra["attestation"], len(extra["attestation"]) - 3)),
            VerificationError,
            "bad-signature",
        ),
        # not a Cloister receipt
        (
            format_tlog_proof(
                TlogProof(index=2, inclusion_proof=proof.inclusion_proof, checkpoint_note=proof.checkpoint_note)
            ),
            DecodeError,
            "no extra data",
        ),
        (
            format_tlog_proof(
                TlogProof(
                    index=2, inclusion_proof=proof.inclusion_proof, checkpoint_note=proof.checkpoint_note, extra=b"\xa0"
                )
            ),
            DecodeError,
            "not a cloister-receipt/1 map",
        ),
        # extra data in a non-canonical encoding
        (
            format_tlog_proof(
                TlogProof(
                    index=2,
                    inclusion_proof=proof.inclusion_proof,
                    checkpoint_note=proof.checkpoint_note,
                    extra=cbor2.dumps({"entry": extra["entry"], "f": FORMAT, "attestation": extra["attestation"]}),
                )
            ),
            DecodeError,
            "deterministic",
        ),
        (good[:-30], VerificationError, "checkpoint-mismatch"),
        (b"c2sp.org/tlog-proof@v1\nindex 1\n", DecodeError, "ends inside"),
    ]
    for data, error, message in cases:
        with pytest.raises(error) as exc:
            verify_receipt(data, root=root)
        assert message in str(exc.value)


def test_a_receipt_for_an_entry_too_large_is_refused() -> None:
    from cloister.audit.receipt import make_receipt

    with pytest.raises(DecodeError, match="do not fit in a receipt"):
        make_receipt(index=0, proof=(), checkpoint_note=b"x\n\n", entry=b"\x00" * 60_000, attestation=b"\x00" * 9000)


def test_a_receipt_file_is_base64_free_text(receipts: dict[int, bytes]) -> None:
    text = receipts[2].decode("utf-8")
    assert text.startswith("c2sp.org/tlog-proof@v1\nextra ")
    extra_line = text.split("\n")[1]
    base64.b64decode(extra_line[len("extra ") :], validate=True)
