"""Every change to stored tiles, bundles and checkpoints is detected, with a message saying where.

The log is real (enclave core, mock NSM); the attacker owns the storage (the directory the relay
serves) but not the enclave, which keeps attesting the checkpoint it signed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cloister.verify.tiles import encode_entry_bundle, parse_entry_bundle
from tests.audit.clirun import Run, cli
from tests.audit.conftest import trust
from tests.audit.logbuilder import LogServer, TestLog, tree_levels, write_tiles

B0 = "tile/entries/000"  # the full first bundle (entries 0..255)
T0 = "tile/0/000"


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _flip_signature(path: Path) -> None:
    """Flip one bit of the signature itself (not of its base64 text, which may just stop parsing)."""
    text, _, line = path.read_bytes().rstrip(b"\n").rpartition(b"\n")
    prefix, _, b64 = line.rpartition(b" ")
    raw = bytearray(base64.b64decode(b64))
    raw[10] ^= 1
    path.write_bytes(text + b"\n" + prefix + b" " + base64.b64encode(bytes(raw)) + b"\n")


def _entry_offset(bundle: bytes, index: int) -> int:
    """Byte offset of entry `index`'s content (after its length prefix) in a bundle."""
    entries = parse_entry_bundle(bundle)
    return sum(2 + len(e) for e in entries[:index]) + 2


def _partial(d: Path, kind: str) -> Path:
    """The partial tile or bundle at the right edge (`entries` or a level number)."""
    return next((d / "tile" / kind).glob("001.p/*"))


def replay(log: TestLog, d: Path, state: Path) -> Run:
    return cli("audit", "replay", "--log", str(d), *trust(log, state), "--no-progress")


def _edit_bundle(d: Path, edit: Callable[[list[bytes]], list[bytes]]) -> None:
    path = d / B0
    path.write_bytes(encode_entry_bundle(edit(parse_entry_bundle(path.read_bytes()))))


# --- The untouched log verifies -------------------------------------------------------------


def test_the_untouched_copy_verifies(built: TestLog, log_copy: Path, tmp_path: Path) -> None:
    r = replay(built, log_copy, tmp_path / "state")
    assert r.code == 0, r.err


# --- Stored objects changed: replay reports each with its path -------------------------------

CASES: list[tuple[str, Callable[[Path], object], list[str]]] = [
    (
        "flip a byte inside entry 5",
        lambda d: _flip(d / B0, _entry_offset((d / B0).read_bytes(), 5) + 3),
        [
            f"{T0}: 1 of its 256 hashes differ from those recomputed from {B0}: hash 5 (byte offset 160, leaves 5)",
            "the root recomputed from the",
        ],
    ),
    (
        "flip a length prefix in a bundle",
        lambda d: _flip(d / B0, _entry_offset((d / B0).read_bytes(), 9) - 2, 0x40),
        [f"{B0}: entry bundle"],
    ),
    (
        "flip a hash in a level-0 tile",
        lambda d: _flip(d / T0, 7 * 32 + 4),
        [f"{T0}: 1 of its 256 hashes differ from those recomputed from {B0}: hash 7 (byte offset 224, leaves 7)"],
    ),
    (
        "flip the level-1 tile",
        lambda d: _flip(d / "tile/1/000.p/1", 31),
        [
            "tile/1/000.p/1: 1 of its 1 hashes differ from those recomputed from the entry bundles: hash 0 "
            "(byte offset 0, leaves 0..255)"
        ],
    ),
    (
        "truncate the partial bundle",
        lambda d: _partial(d, "entries").write_bytes(_partial(d, "entries").read_bytes()[:-3]),
        ["tile/entries/001.p/", "entry bundle truncated: entry", "bytes left"],
    ),
    (
        "truncate a hash tile",
        lambda d: (d / T0).write_bytes((d / T0).read_bytes()[:-1]),
        [f"{T0}: is 8191 bytes, but the tree needs 256 hashes of 32 bytes here (8192 bytes)"],
    ),
    (
        "swap entries 3 and 4",
        lambda d: _edit_bundle(d, lambda es: [*es[:3], es[4], es[3], *es[5:]]),
        [f"{T0}: 2 of its 256 hashes differ", "hash 3 (byte offset 96, leaves 3)", "hash 4 (byte offset 128"],
    ),
    (
        "delete entry 10",
        lambda d: _edit_bundle(d, lambda es: es[:10] + es[11:]),
        [f"{B0}: entry bundle has 255 entries, want 256"],
    ),
    (
        "append an entry to a full bundle",
        lambda d: (d / B0).write_bytes((d / B0).read_bytes() + b"\x00\x01A"),
        [f"{B0}: entry bundle has data after 256 entries, at offset"],
    ),
    (
        "delete an entry bundle",
        lambda d: (d / B0).unlink(),
        [f"{B0}: missing: the log's storage does not have it, but the checkpoint covers it"],
    ),
    ("delete a hash tile", lambda d: (d / T0).unlink(), [f"{T0}: missing"]),
    ("delete the level-1 tile", lambda d: (d / "tile/1/000.p/1").unlink(), ["tile/1/000.p/1: missing"]),
    (
        "flip a bit of the checkpoint's signature",
        lambda d: _flip_signature(d / "checkpoint"),
        ["checkpoint: not signed by the key of the last key entry (entry", "does not verify"],
    ),
    (
        "make the checkpoint's signature invalid base64",
        lambda d: (d / "checkpoint").write_bytes((d / "checkpoint").read_bytes()[:-3] + b"!=\n"),
        ["checkpoint", "not valid base64"],
    ),
]


@pytest.mark.parametrize(("change", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_replay_reports_each_change_where_it_is(
    built: TestLog, log_copy: Path, tmp_path: Path, change: Callable[[Path], object], expect: list[str]
) -> None:
    change(log_copy)
    r = replay(built, log_copy, tmp_path / "state")
    assert r.code == 1, r.out + r.err
    for text in expect:
        assert text in r.err, (text, r.err)
    assert "Traceback" not in r.err


def test_replay_reports_an_undecodable_entry_with_its_offset(built: TestLog, log_copy: Path, tmp_path: Path) -> None:
    # The attacker rewrites entry 12 *and* every tile consistently: only the signed root betrays it,
    # and the entry itself no longer decodes.
    entries = list(built.entries)
    entries[12] = b"\xb5" + entries[12][1:]  # a map of 21 items, with 20
    write_tiles(log_copy, entries, built.note)
    r = replay(built, log_copy, tmp_path / "state")
    assert r.code == 1
    offset = sum(2 + len(e) for e in entries[:12])
    assert f"entry 12 ({B0}, byte offset {offset}): does not decode: entry is not valid CBOR" in r.err
    assert "checkpoint: the root recomputed from the" in r.err
    # The next key entry's previous root is computed from the altered entries, so it no longer matches.
    assert "key entry does not verify: its previous root" in r.err


def test_replay_checks_the_structure_of_rewritten_entries(built: TestLog, log_copy: Path, tmp_path: Path) -> None:
    # Entry 12 is a decision; its last byte is its policy version (1). Version 0 still decodes.
    entries = list(built.entries)
    assert entries[12].endswith(b"policy_version\x01")
    entries[12] = entries[12][:-1] + b"\x00"
    write_tiles(log_copy, entries, built.note)
    r = replay(built, log_copy, tmp_path / "state")
    assert r.code == 1
    assert "entry 12: a decision under policy version 0" in r.err and "version 1 (bundle" in r.err


def test_replay_detects_a_consistently_rewritten_history(built: TestLog, log_copy: Path, tmp_path: Path) -> None:
    # A valid, different record at index 3 (an outcome made into one with an error), all tiles redone.
    from cloister.verify.entries import OutcomeEntry, encode_entry, parse_entry

    entries = list(built.entries)
    index = next(i for i, e in enumerate(entries) if isinstance(parse_entry(e), OutcomeEntry))
    old = parse_entry(entries[index])
    assert isinstance(old, OutcomeEntry)
    entries[index] = encode_entry(
        OutcomeEntry(
            time_ms=old.time_ms,
            decision_index=old.decision_index,
            result_sha256=old.result_sha256,
            error="rewritten",
            duration_us=old.duration_us,
        )
    )
    write_tiles(log_copy, entries, built.note)
    r = replay(built, log_copy, tmp_path / "state")
    assert r.code == 1
    assert f"checkpoint: the root recomputed from the {len(entries)} entries is" in r.err
    assert "but the checkpoint signs" in r.err


@pytest.mark.parametrize("cut", [1, 40, 200])
def test_replay_rejects_a_truncated_checkpoint(built: TestLog, log_copy: Path, tmp_path: Path, cut: int) -> None:
    cp = log_copy / "checkpoint"
    cp.write_bytes(cp.read_bytes()[:-cut])
    r = replay(built, log_copy, tmp_path / "state")
    assert r.code == 1
    assert "note" in r.err or "checkpoint" in r.err
    assert "Traceback" not in r.err


def test_replay_over_http_reports_the_same(built: TestLog, server: LogServer, log_copy: Path, tmp_path: Path) -> None:
    _flip(log_copy / T0, 7 * 32)
    r = cli("audit", "replay", "--log", server.url, *trust(built, tmp_path), "--no-progress", "--json")
    assert r.code == 1
    out = json.loads(r.out)
    assert not out["ok"] and out["root"] == out["checkpoint_root"]
    assert [p["where"] for p in out["problems"]] == [T0]


# --- inclusion: the entry, or the tiles on its path ------------------------------------------


def test_inclusion_names_an_altered_entry(built: TestLog, server: LogServer, log_copy: Path, tmp_path: Path) -> None:
    offset = _entry_offset((log_copy / B0).read_bytes(), 5)
    _flip(log_copy / B0, offset + 3)
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--index", "5")
    assert r.code == 1
    assert f"entry 5 ({B0}, byte offset {offset - 2}) was altered" in r.err


def test_inclusion_names_altered_hash_tiles(built: TestLog, server: LogServer, log_copy: Path, tmp_path: Path) -> None:
    _flip(log_copy / T0, 7 * 32)  # entry 6's sibling
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--index", "6")
    assert r.code == 1
    assert "is not proven by the hash tiles" in r.err and T0 in r.err
    # Entries whose proofs do not use that hash still verify (bundle 1's proofs use tile/1 for bundle 0).
    assert cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--index", "270").code == 0


def test_inclusion_of_a_truncated_bundle_is_a_decode_error(
    built: TestLog, server: LogServer, log_copy: Path, tmp_path: Path
) -> None:
    (log_copy / B0).write_bytes((log_copy / B0).read_bytes()[:1000])
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--index", "3")
    assert r.code == 1
    assert f"{B0}: entry bundle truncated" in r.err and "at offset" in r.err


def test_inclusion_past_the_checkpoint_is_refused(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--index", str(len(built.entries)))
    assert r.code == 1
    assert f"the verified checkpoint has {len(built.entries)} entries" in r.err


# --- The attested checkpoint: document, nonce, note, PCRs ------------------------------------


def _reply_hook(edit: Callable[[dict[str, str]], object], built: TestLog) -> Callable[..., tuple[int, bytes] | None]:
    def hook(path: str, query: dict[str, list[str]]) -> tuple[int, bytes] | None:
        if path != "attestation":
            return None
        nonce = bytes.fromhex(query["nonce"][0])
        doc, note = built.attest(nonce)
        body = {"document": base64.b64encode(doc).decode(), "nonce": nonce.hex(), "checkpoint": note.decode()}
        edit(body)
        return 200, json.dumps(body).encode()

    return hook


def _flip_b64(text: str, at: int) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[at] ^= 1
    return base64.b64encode(bytes(raw)).decode()


ATTESTATION_CASES: list[tuple[str, Callable[[dict[str, str]], object], str]] = [
    (
        "checkpoint size changed",
        lambda b: b.update(checkpoint=b["checkpoint"].replace("\n", "\n1", 1)),
        "checkpoint-mismatch",
    ),
    (
        "checkpoint line deleted",
        lambda b: b.update(checkpoint=b["checkpoint"].split("\n", 1)[1]),
        "checkpoint-mismatch",
    ),
    ("document signature flipped", lambda b: b.update(document=_flip_b64(b["document"], -5)), "bad-signature"),
    (
        "document truncated",
        lambda b: b.update(document=base64.b64encode(base64.b64decode(b["document"])[:-9]).decode()),
        "attestation rejected: malformed",
    ),
    ("another nonce", lambda b: b.update(nonce="00" * 32), "for another nonce"),
    ("document not base64", lambda b: b.update(document="%%%"), "not valid base64"),
    ("no checkpoint", lambda b: b.pop("checkpoint"), "has no 'checkpoint'"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in ATTESTATION_CASES], ids=[c[0] for c in ATTESTATION_CASES])
def test_a_tampered_attestation_reply_is_rejected(
    built: TestLog, server: LogServer, tmp_path: Path, edit: Callable[[dict[str, str]], object], message: str
) -> None:
    server.overrides.append(_reply_hook(edit, built))
    r = cli("audit", "checkpoint", "--log", server.url, *trust(built, tmp_path))
    assert r.code == 1, r.err
    assert message in r.err
    assert not (tmp_path / "checkpoints").exists()  # nothing unverified is remembered


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"document": 1}', b"\xff\xfe", b"{}" * 100_000])
def test_malformed_attestation_replies_are_clear_errors(
    built: TestLog, server: LogServer, tmp_path: Path, body: bytes
) -> None:
    server.overrides.append(lambda path, q: (200, body) if path == "attestation" else None)
    r = cli("audit", "checkpoint", "--log", server.url, *trust(built, tmp_path))
    assert r.code == 1
    assert "attestation reply" in r.err
    assert "Traceback" not in r.err


def test_unexpected_pcrs_are_rejected(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    r = cli(
        "audit",
        "checkpoint",
        "--log",
        server.url,
        "--trust-root",
        str(built.root_pem),
        "--state",
        str(tmp_path),
        "--expect-pcr",
        "0=" + "00" * 47 + "01",
    )
    assert r.code == 1
    assert "pcr-mismatch: PCR0 is a1a1" in r.err


def test_another_trust_root_is_rejected(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    r = cli("audit", "checkpoint", "--log", server.url, "--trust-root", "aws", "--state", str(tmp_path))
    assert r.code == 1
    assert "wrong-root" in r.err


def test_an_oversized_tile_is_refused(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    server.overrides.append(lambda path, q: (200, b"\x00" * 9000) if path.startswith("tile/0/") else None)
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--index", "1")
    assert r.code == 1
    assert "tile/0/" in r.err and "the server announces 9000 bytes, more than the cap of 8192" in r.err


def test_the_levels_helper_matches_the_checkpoint(built: TestLog) -> None:
    from cloister.verify.checkpoint import parse_checkpoint
    from cloister.verify.merkle import CompactRange
    from cloister.verify.note import parse_note

    tree = CompactRange()
    for h in tree_levels(built.entries)[0]:
        tree.append(h)
    assert tree.root() == parse_checkpoint(parse_note(built.note).text).root_hash


def test_a_pinned_origin_must_match(built: TestLog, server: LogServer, log_copy: Path, tmp_path: Path) -> None:
    r = cli("audit", "checkpoint", "--log", server.url, *trust(built, tmp_path), "--origin", "another.log/x")
    assert r.code == 1 and "origin-mismatch" in r.err
    r = cli(
        "audit", "replay", "--log", str(log_copy), *trust(built, tmp_path), "--origin", "another.log/x", "--no-progress"
    )
    assert r.code == 1 and "is not the expected 'another.log/x'" in r.err
    assert cli("audit", "checkpoint", "--log", server.url, *trust(built, tmp_path), "--origin", built.origin).code == 0
