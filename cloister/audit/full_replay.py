"""`cloister audit replay` as a function: which checkpoint to replay against, and how keys are trusted.

Three ways to trust the checkpoint a replay recomputes:

- a relay URL: the checkpoint is attested for a fresh nonce (cloister.audit.attested); after the
  replay, the key that signed it must be the one the log's last key entry introduced;
- a storage directory: `<dir>/checkpoint` is read unverified to learn its size, the replay
  verifies every key entry's attestation, and then the checkpoint must be signed by the log key
  of the last key entry before its size (trust by measurement, not by name);
- `generic`: any C2SP tlog-tiles log (not Cloister records): the checkpoint is verified with
  the given verifier keys and origin, and only the tree is replayed.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from cloister.audit.attested import AttestedCheckpoint, fetch_attested_checkpoint
from cloister.audit.replay import KeyChecker, Problem, ReplayResult, replay_tree
from cloister.audit.source import MAX_CHECKPOINT, SourceSpec, open_source
from cloister.audit.state import RememberedCheckpoint
from cloister.verify.attestation import DOCUMENT_TIME, AttestationPolicy, TrustRoot
from cloister.verify.checkpoint import Checkpoint, parse_checkpoint, verify_checkpoint
from cloister.verify.enclave_identity import EnclaveBinding, verify_enclave
from cloister.verify.entries import KeyEntry
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.note import NoteVerifier, parse_note

__all__ = ["ReplayedLog", "key_checker", "replay_log"]


def _b64(h: bytes | None) -> str:
    return "(unknown)" if h is None else base64.b64encode(h).decode("ascii")


def key_checker(
    root: TrustRoot,
    expected_pcrs: Mapping[int, bytes] | None,
    allow_debug: bool,
    origin: str,
    accepted_pcr0: frozenset[bytes] = frozenset(),
) -> KeyChecker:
    """Checks one key entry at `index`, given the root of the log's first `index` entries.

    `accepted_pcr0`: earlier images that may have run the log (upgrades): a key entry may carry
    one of them as PCR0 instead of the expected one.
    """
    pcrs = dict(expected_pcrs or {})
    allowed_pcr0 = accepted_pcr0 | ({pcrs.pop(0)} if 0 in pcrs else set())
    # Key entries are old by nature: each is checked as of its own timestamp.
    policy = AttestationPolicy(root=root, at=DOCUMENT_TIME, expected_pcrs=pcrs, allow_debug=allow_debug)

    def check(index: int, entry: KeyEntry, root_before: bytes) -> tuple[EnclaveBinding, str]:
        # 1. The attestation verifies against the trust root and PCRs as of its own timestamp
        #    (key entries are old by nature), for this log's origin.
        verified = verify_enclave(entry.attestation, policy, origin=origin)
        pcr0 = verified.document.pcrs.get(0, b"")
        if allowed_pcr0 and pcr0 not in allowed_pcr0:
            raise VerificationError(
                f"its enclave's PCR0 {pcr0.hex()[:24]}... is neither --expect-pcr 0 nor an --accept-pcr0 image"
            )
        binding = verified.binding
        # 2. It binds exactly the keys the entry introduces.
        if binding.log_key != entry.log_key:
            raise VerificationError(
                f"its attestation binds log key {binding.log_key.hex()[:16]}..., but the entry "
                f"introduces {entry.log_key.hex()[:16]}..."
            )
        if binding.grant_key != entry.grant_key:
            raise VerificationError(
                f"its attestation binds grant key {binding.grant_key.hex()[:16]}..., but the "
                f"entry introduces {entry.grant_key.hex()[:16]}..."
            )
        # 3. Its verifier key string is that log key under the origin (what note verifiers use).
        if entry.log_vkey != binding.log_verifier().vkey:
            raise VerificationError(f"its verifier key {entry.log_vkey[:120]!r} is not {binding.log_verifier().vkey}")
        # 4. It continues the log exactly as it stood before it.
        if entry.previous_size is None:
            if index != 0:
                raise VerificationError(f"it starts a new log (no previous checkpoint), but {index} entries precede it")
        else:
            if entry.previous_size != index:
                raise VerificationError(
                    f"it continues a checkpoint of size {entry.previous_size}, but it is entry {index}"
                )
            if entry.previous_root != root_before:
                raise VerificationError(
                    f"its previous root {_b64(entry.previous_root)} is not the root of the "
                    f"{index} entries before it ({_b64(root_before)})"
                )
        return binding, verified.document.pcrs.get(0, b"").hex()

    return check


@dataclass
class ReplayedLog:
    checkpoint: Checkpoint
    note: bytes
    result: ReplayResult
    attested: AttestedCheckpoint | None
    verified: bool  # the checkpoint's signature is trusted (attested, key-entry chain, or given keys)
    signer: str  # the verifier key that signed it

    @property
    def ok(self) -> bool:
        return self.verified and not self.result.problem_count


def replay_log(
    spec: SourceSpec,
    *,
    now: datetime,
    nonce: bytes,
    root: TrustRoot | None = None,
    expected_pcrs: Mapping[int, bytes] | None = None,
    accepted_pcr0: frozenset[bytes] = frozenset(),
    allow_debug: bool = False,
    origin: str | None = None,
    generic_keys: Sequence[NoteVerifier] = (),
    remembered: Callable[[str], RememberedCheckpoint | None] | None = None,
    jobs: int = 1,
    progress: Callable[[int, int], None] | None = None,
    recheck_signatures: bool = True,
) -> ReplayedLog:
    """Replay the log at `spec` against a trusted checkpoint (see the module docstring).
    `recheck_signatures=False` trusts the enclave's recorded verdict on upstream response
    signatures instead of verifying each again (decision 0017; the report says which was done)."""
    source = open_source(spec)
    attested: AttestedCheckpoint | None = None
    signer = ""
    if generic_keys:
        note = source.read("checkpoint", max_size=MAX_CHECKPOINT)
        pinned = origin or generic_keys[0].name
        with _about(f"checkpoint ({source.where('checkpoint')})"):
            verified = verify_checkpoint(note, generic_keys, origin=pinned)
        checkpoint = verified.checkpoint
        signer = ", ".join(f"{s.name}+{s.key_id:08x}" for s in verified.note.signatures)
    elif spec.is_url:
        if root is None:
            raise ValueError("a trust root is needed to replay a Cloister log")
        attested = fetch_attested_checkpoint(
            source, root=root, now=now, nonce=nonce, expected_pcrs=expected_pcrs, allow_debug=allow_debug, origin=origin
        )
        checkpoint, note = attested.checkpoint, attested.note
    else:
        # Read unverified only to learn the size; trusted after the replay, by the key entries.
        note = source.read("checkpoint", max_size=MAX_CHECKPOINT)
        with _about(f"checkpoint ({source.where('checkpoint')})"):
            checkpoint = parse_checkpoint(parse_note(note).text)
        if origin is not None and checkpoint.origin != origin:
            raise VerificationError(f"checkpoint origin {checkpoint.origin[:200]!r} is not the expected {origin!r}")
    check = None
    if not generic_keys:
        assert root is not None
        check = key_checker(root, expected_pcrs, allow_debug, checkpoint.origin, accepted_pcr0)
    old = remembered(checkpoint.origin) if remembered is not None and not generic_keys else None
    want = [old.size] if old is not None and old.size <= checkpoint.size else []
    result = replay_tree(
        spec,
        checkpoint.size,
        decode=not generic_keys,
        check_key=check,
        want_sizes=want,
        jobs=jobs,
        progress=progress,
        now_ms=int(now.timestamp() * 1000),
        recheck_signatures=recheck_signatures,
    )
    problems: list[Problem] = []
    # The recomputed root is the signed one.
    if result.root != checkpoint.root_hash:
        problems.append(
            Problem(
                "checkpoint",
                f"the root recomputed from the {checkpoint.size} entries is "
                f"{_b64(result.root)}, but the checkpoint signs {_b64(checkpoint.root_hash)}",
            )
        )
    trusted = bool(generic_keys)
    if not generic_keys:
        trusted, signer = _check_signer(checkpoint, note, result, attested, problems)
    result.problems += problems  # after the causes (a tampered bundle) come the consequences
    result.problem_count += len(problems)
    return ReplayedLog(
        checkpoint=checkpoint, note=note, result=result, attested=attested, verified=trusted, signer=signer
    )


@contextmanager
def _about(what: str) -> Iterator[None]:
    """Prefix the message of a DecodeError or VerificationError with the object it is about."""
    try:
        yield
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from exc
    except VerificationError as exc:
        raise VerificationError(f"{what}: {exc}") from exc


def _check_signer(
    checkpoint: Checkpoint,
    note: bytes,
    result: ReplayResult,
    attested: AttestedCheckpoint | None,
    problems: list[Problem],
) -> tuple[bool, str]:
    """The checkpoint's key is the one the last key entry before its size introduced."""
    last: EnclaveBinding | None = result.last_key
    if last is None:
        what = (
            "no key entry"
            if result.last_key_index is None
            else f"the last key entry (entry {result.last_key_index}) does not verify, so no attested key"
        )
        problems.append(Problem("checkpoint", f"{what} introduces the key that signs it"))
        return False, ""
    vkey = last.log_verifier().vkey
    if attested is not None:
        if attested.binding.log_key != last.log_key:
            problems.append(
                Problem(
                    "checkpoint",
                    f"it is signed by the running enclave's key {attested.binding.log_verifier().vkey}, "
                    "but the last key "
                    f"entry in the log (entry {result.last_key_index}) introduced {vkey}",
                )
            )
            return False, attested.binding.log_verifier().vkey
        return True, vkey
    try:
        verify_checkpoint(note, [last.log_verifier()], origin=last.origin)
    except (DecodeError, VerificationError) as exc:
        problems.append(
            Problem(
                "checkpoint",
                f"not signed by the key of the last key entry (entry {result.last_key_index}, {vkey}): {exc}",
            )
        )
        return False, ""
    return True, vkey
