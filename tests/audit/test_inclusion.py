"""`audit inclusion` with a grant, with bodies, and `audit consistency` between any two sizes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import cbor2
import pytest

from cloister.verify.canonical import canonical_json
from cloister.verify.cose import encode_cose_sign1
from cloister.verify.entries import KeyEntry, dumps_deterministic, parse_entry
from cloister.verify.grant import (
    GrantClaims,
    GrantError,
    encode_grant,
    grant_key_id,
    read_grant,
    verify_grant_signature,
)
from cloister.verify.merkle import leaf_hash
from tests.audit.clirun import cli
from tests.audit.conftest import trust
from tests.audit.logbuilder import LogServer, TestLog


def _last_key_index(log: TestLog) -> int:
    return max(i for i, e in enumerate(log.entries) if isinstance(parse_entry(e), KeyEntry))


def test_a_grant_from_the_running_enclave_is_checked_fully(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    index = max(built.grants)
    assert index > _last_key_index(built)
    grant_file = tmp_path / "grant.b64"
    grant_file.write_text(base64.b64encode(built.grants[index]).decode() + "\n")
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--grant", str(grant_file))
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["index"] == index and out["entry"]["decision"] == "allow"
    assert out["grant"]["signature"] == "verified with the attested enclave's grant key"
    assert out["grant"]["entry_hash"] == "matches"


def test_a_grant_from_an_earlier_enclave_is_matched_but_its_signature_left_to_its_key_entry(
    built: TestLog, server: LogServer, tmp_path: Path
) -> None:
    index = min(built.grants)
    grant_file = tmp_path / "grant.cose"
    grant_file.write_bytes(built.grants[index])  # raw COSE bytes work too
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--grant", str(grant_file))
    assert r.code == 0, r.err
    assert json.loads(r.out)["grant"]["signature"].startswith("not checked: signed by an earlier enclave")


def _regrant(built: TestLog, index: int, **change: object) -> bytes:
    claims = read_grant(built.grants[index])
    fields = {**claims.__dict__, **change}
    return encode_grant(GrantClaims(**fields), lambda data: b"\x00" * 64, b"\x01" * 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"agent": "someone-else"}, "differ in agent"),
        ({"args_sha256": b"\x09" * 32}, "differ in args_sha256"),
        ({"nonce": b"\x09" * 16}, "differ in nonce"),
        ({"entry_hash": b"\x09" * 32}, "is not the grant's entry hash"),
        ({"origin": "another.log/x"}, "the grant names log 'another.log/x'"),
    ],
)
def test_a_grant_that_does_not_describe_its_entry_is_refused(
    built: TestLog, server: LogServer, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    grant_file = tmp_path / "grant"
    grant_file.write_bytes(_regrant(built, max(built.grants), **change))
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--grant", str(grant_file))
    assert r.code == 1
    assert message in r.err


def test_a_grant_for_a_deny_is_refused(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    deny = next(i for i, e in enumerate(built.entries) if getattr(parse_entry(e), "decision", "") == "deny")
    leaf = leaf_hash(built.entries[deny])
    grant_file = tmp_path / "grant"
    grant_file.write_bytes(_regrant(built, max(built.grants), log_index=deny, entry_hash=leaf))
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--grant", str(grant_file))
    assert r.code == 1
    assert f"entry {deny} is not a decision that issued a grant" in r.err


def _resigned(built: TestLog, index: int, protected: dict[int, object]) -> bytes:
    """The grant at `index` with another protected header, signed by the running enclave's grant key."""
    assert built.core is not None
    claims = read_grant(built.grants[index])
    payload = dumps_deterministic(claims.to_map())
    return encode_cose_sign1(protected, {}, payload, built.core._grant_key.sign, tagged=True)


def test_a_grant_with_a_bad_signature_is_refused(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    protected, unprotected, payload, signature = cbor2.loads(built.grants[max(built.grants)]).value
    forged = cbor2.CBORTag(18, [protected, unprotected, payload, bytes([signature[0] ^ 1]) + signature[1:]])
    grant_file = tmp_path / "grant"
    grant_file.write_bytes(cbor2.dumps(forged))
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--grant", str(grant_file))
    assert r.code == 1
    assert "the grant's signature does not verify with the attested grant key" in r.err


def test_the_auditor_refuses_a_grant_header_that_upstreams_refuse(
    built: TestLog, server: LogServer, tmp_path: Path
) -> None:
    """Regression: the audit checked the signature by hand and ignored the header's algorithm, so it
    reported "verified" for a grant every upstream (cloister.verify.grant) refuses as malformed."""
    index = max(built.grants)
    assert built.core is not None
    kid = grant_key_id(built.core.grant_public)
    grant = _resigned(built, index, {1: -7, 4: kid})  # ES256 in the header, an Ed25519 signature
    with pytest.raises(GrantError, match=r"not EdDSA \(-8\)"):
        verify_grant_signature(grant, {kid: built.core._grant_key.public_key()})
    grant_file = tmp_path / "grant"
    grant_file.write_bytes(grant)
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--grant", str(grant_file))
    assert r.code == 1
    assert "grant algorithm is not EdDSA (-8)" in r.err
    # The same claims under the right header verify, as the enclave signs them.
    grant_file.write_bytes(_resigned(built, index, {1: -8, 4: kid}))
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--grant", str(grant_file))
    assert r.code == 0, r.err
    assert json.loads(r.out)["grant"]["signature"] == "verified with the attested enclave's grant key"


def test_a_malformed_grant_is_a_clear_error(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    grant_file = tmp_path / "grant"
    grant_file.write_bytes(cbor2.dumps(["not", "a", "grant"]))
    r = cli("audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--grant", str(grant_file))
    assert r.code == 1 and "grant is malformed" in r.err


def test_bodies_are_checked_against_their_commitments(
    built: TestLog, server: LogServer, log_copy: Path, tmp_path: Path
) -> None:
    # The last web_search was made in the last round of traffic (round 0 after the restart): q0.
    index = max(i for i, e in enumerate(built.entries) if getattr(parse_entry(e), "tool", "") == "web_search")
    body = log_copy / "body" / str(index) / "args"
    body.parent.mkdir(parents=True)
    body.write_bytes(canonical_json({"q": "q0"}))
    args = ["audit", "inclusion", "--log", server.url, *trust(built, tmp_path), "--index", str(index), "--bodies"]
    r = cli(*args)
    assert r.code == 0, r.err
    assert json.loads(r.out)["bodies"]["args"] == {"status": "verified", "body": {"q": "q0"}}
    body.write_bytes(b'{"q": "something else"}')
    r = cli(*args)
    assert r.code == 1 and f"body/{index}/args: the body's SHA-256" in r.err
    body.unlink()
    r = cli(*args)
    assert r.code == 0 and json.loads(r.out)["bodies"]["args"] == {"status": "not retained"}


def test_consistency_between_any_two_sizes(built: TestLog, server: LogServer, tmp_path: Path) -> None:
    n = len(built.entries)
    for a, b in [(0, 0), (0, n), (1, 2), (5, 256), (255, 257), (256, n), (n, n)]:
        r = cli(
            "audit",
            "consistency",
            "--log",
            server.url,
            *trust(built, tmp_path),
            "--from",
            str(a),
            "--to",
            str(b),
            "--json",
        )
        assert r.code == 0, (a, b, r.err)
        out = json.loads(r.out)
        assert (out["from"], out["to"]) == (a, b)
    r = cli("audit", "consistency", "--log", server.url, *trust(built, tmp_path), "--from", "3", "--to", "2")
    assert r.code == 2
    r = cli("audit", "consistency", "--log", server.url, *trust(built, tmp_path), "--from", str(n + 1))
    assert r.code == 2
