"""The enclave's trust state, and where every tools/call is decided.

`EnclaveCore` holds everything the enclave vouches for: its keys, the log sequencer, the
policy bundle in force, and the rate/spend windows. It accepts only valid transitions
(a log must be started or resumed before anything is decided; a policy bundle must be newer
than the one in force) and does no I/O of its own: the NSM and the clock are injected, and
the gRPC layer (`cloister.enclave.service`) only translates messages.

`authorize` is the decision path. The decision itself is `cloister.enclave.decide` (arguments,
identity, server and tool, quarantine, Cedar, limits: the same function `policy explain` runs);
around it, this module:
  - runs decide's steps 1-5 outside any lock, on the bundle in force;
  - under the sequencer lock, in one critical section: re-checks that bundle is still in force,
    runs step 6 (limits), appends the decision entry, charges the limits;
  - outside the lock: signs the grant (when the call goes through) and a checkpoint covering the entry.
Nothing leaves before the entry is sequenced.

Start-up: AWAITING_KEY (the log key is unsealed from AWS KMS through the parent,
`request_key` / `open_sealed_key`, docs/decisions/0014), AWAITING_LOG (start or resume; a resumed
log must have been signed by that same key), READY. The grant key is new at every start.

Locks: `Sequencer.lock` (reentrant) serialises every append and guards the state a decision
changes: the limit book, the open decisions, the server registry, which bundle is in force.
`_transition` guards the log's lifecycle (the sealed-key exchange, start, resume). Each policy
state's token cache has its own lock. Which lock guards each field is noted where it is declared.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.enclave.anonymous import AnonymousDenials
from cloister.enclave.bundle import (
    MAX_COST_PLACES,
    MAX_LIMIT_VALUE,
    MCP_ACTIONS,
    ActionKind,
    PolicyBundle,
    parse_bundle_files,
)
from cloister.enclave.config import EnclaveConfig
from cloister.enclave.decide import Call, Decision, State, decide_before_limits, decide_limits, principal_from_token
from cloister.enclave.freshness import GateStatus, WitnessGate
from cloister.enclave.limits import LimitBook, LimitStatus
from cloister.enclave.nsm import Nsm
from cloister.enclave.policy import PolicyEngine, Principal
from cloister.enclave.resume import MAX_CHUNK_ENTRIES, ResumePoint, ResumeStart, verify_resume
from cloister.enclave.sealing import RecipientKey, SealedKeyMismatch, recipient_attestation, unseal_log_key
from cloister.enclave.sequencer import MAX_PENDING_BYTES, MAX_PENDING_ENTRIES, Sequencer, SignedCheckpoint
from cloister.enclave.servers import Report, ServerRegistry
from cloister.verify.bundle import verify_bundle
from cloister.verify.enclave_identity import EnclaveBinding
from cloister.verify.entries import (
    MAX_DECIMAL_TEXT,
    MAX_ENTRY_BYTES,
    OUTCOME_GRACE_MS,
    DecisionEntry,
    Entry,
    KeyEntry,
    OutcomeEntry,
    PolicyEntry,
    SnapshotEntry,
    SnapshotWindow,
    bounded,
    decimal_text,
    dumps_deterministic,
    encode_entry,
    parse_entry,
    quoted,
)
from cloister.verify.errors import CloisterError, DecodeError, VerificationError
from cloister.verify.grant import GRANT_NAME_BOUND, GrantClaims, encode_grant
from cloister.verify.merkle import CompactRange, leaf_hash
from cloister.verify.note import Ed25519NoteSigner
from cloister.verify.response_sig import SIG_BYTES, ResponseCheck, ResponseStatus, response_verdict

MAX_REQUEST_ID = 128
MAX_OPEN_DECISIONS = 200_000
TOKEN_CACHE_SIZE = 10_000
# A snapshot of the state a resume needs goes into the log once this many entries followed the
# last one (docs/decisions/0016), so a resume reads at most about this many entries past it.
SNAPSHOT_INTERVAL = 10_000
POLICY_EXTENSION = "cloister-policy"  # checkpoint extension line: "cloister-policy <version> <sha256 hex>"


def policy_extension(version: int, sha256: bytes) -> str:
    return f"{POLICY_EXTENSION} {version} {sha256.hex()}"


def parse_policy_extension(extensions: tuple[str, ...]) -> tuple[int, bytes] | None:
    for line in extensions:
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == POLICY_EXTENSION and parts[1].isdigit():
            try:
                return int(parts[1]), bytes.fromhex(parts[2])
            except ValueError:
                return None
    return None


class LogState(Enum):
    AWAITING_KEY = "awaiting-key"  # no log key yet: the parent must run the sealed-key exchange
    AWAITING_LOG = "awaiting-log"  # keys exist; the parent must start or resume the log
    READY = "ready"


class NotReady(CloisterError):
    """The enclave cannot serve this request in its current state (fail closed)."""


class KeyRefused(CloisterError):
    """The sealed-key exchange or a log start out of order (no pending key, a key already
    installed, a resume after a key unsealed for a new log or the reverse)."""


class PolicyRefused(CloisterError):
    """A policy bundle was refused; the bundle in force is untouched."""


class PolicyNotNewer(PolicyRefused):
    """A validly signed bundle whose version is not above the one in force (a replay or rollback).

    Its own type so the gRPC layer answers with its own status (contract.POLICY_NOT_NEWER_STATUS)
    and the relay never matches message text.
    """


@dataclass(frozen=True)
class LogAppend:
    first_index: int
    entries: tuple[bytes, ...]
    checkpoint: SignedCheckpoint


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    code: str
    reason: str
    policy_ids: tuple[str, ...]
    log: LogAppend
    log_index: int
    agent: str
    grant: bytes = b""
    limits: tuple[LimitStatus, ...] = ()


@dataclass(frozen=True)
class _OpenDecision:
    agent: str
    roles: frozenset[str]
    server: str
    tool: str
    expires_ms: int
    nonce: bytes = b""  # the grant's: what the upstream's response signature covers (decision 0017)
    # (whether the server must sign, the key its verified attestation bound) when the call was
    # decided; None for a decision reopened after a restart (looked up when its outcome comes).
    signing: tuple[bool, bytes | None] | None = None


class _TokenCache:
    """Tokens verified under one bundle version: token -> (principal, expiry in seconds).

    A memo only (a miss verifies the token again), bounded, oldest first out; its own lock."""

    def __init__(self, size: int = TOKEN_CACHE_SIZE) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[Principal, int]] = OrderedDict()  # guarded by _lock

    def get(self, token: str, now_ms: int) -> Principal | None:
        with self._lock:
            hit = self._items.get(token)
        return hit[0] if hit is not None and hit[1] * 1000 > now_ms else None

    def put(self, token: str, principal: Principal, expires_at: int) -> None:
        with self._lock:
            self._items[token] = (principal, expires_at)
            if len(self._items) > self._size:
                self._items.popitem(last=False)


@dataclass(frozen=True)
class _CachedToken:
    """A bearer token as decide's identity: verified once per bundle version, then cached."""

    token: str
    cache: _TokenCache

    def principal(self, bundle: PolicyBundle, now_ms: int) -> Principal:
        hit = self.cache.get(self.token, now_ms)
        if hit is not None:
            return hit
        principal, expires_at = principal_from_token(bundle, self.token, now_ms)
        self.cache.put(self.token, principal, expires_at)
        return principal


@dataclass(frozen=True)
class _PolicyState:
    """One bundle version and what derives from it. Installed whole by `load_policy`; the
    fields below that change while it is in force say which lock guards them."""

    bundle: PolicyBundle  # immutable
    # Its server attestation levels are replaced under the sequencer lock (whole objects, so a
    # decision outside the lock sees the old or the new levels); its slice cache has its own lock.
    engine: PolicyEngine
    limits: LimitBook  # checked, charged and pruned only under the sequencer lock
    sha256: bytes
    version: int
    signer: str
    tokens: _TokenCache = field(default_factory=_TokenCache)  # its own lock


class EnclaveCore:
    def __init__(
        self,
        config: EnclaveConfig,
        nsm: Nsm,
        *,
        pcrs: Mapping[int, bytes],
        clock_ms: Callable[[], int],
        random: Callable[[int], bytes] = os.urandom,
        mock_nsm: bool = False,
        log_key: ed25519.Ed25519PrivateKey | None = None,
    ) -> None:
        """`log_key`: None (the image's entry point) waits for the sealed log key (`request_key`,
        `open_sealed_key`); in-process tools may hand a key in directly. Either way a resumed log
        must have been signed by the same key."""
        self.config = config
        self.nsm = nsm
        self.pcrs = dict(pcrs)
        self.mock_nsm = mock_nsm
        self._clock_ms = clock_ms
        self._random = random
        # Keys never leave: only their public halves are exported. The grant key is born here, at
        # every start; the log key is one per origin, unsealed from KMS (decision 0014) or given.
        self._grant_key = ed25519.Ed25519PrivateKey.generate()
        self.grant_public = self._grant_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._transition = threading.Lock()  # guards the log's lifecycle: state, keys, sequencer
        self._log_key: ed25519.Ed25519PrivateKey | None = None  # set once, under _transition
        self._note_signer: Ed25519NoteSigner | None = None  # set with _log_key
        self.log_public = b""  # set with _log_key
        self._recipient: RecipientKey | None = None  # the one-use key of the pending exchange
        # What the parent said when the key was unsealed: a new log (True) or a stored one (False);
        # None for a key handed in directly (either is allowed).
        self._first_start: bool | None = None
        self.state = LogState.AWAITING_KEY  # set under _transition
        if log_key is not None:
            self._install_log_key(log_key)
        self.sequencer: Sequencer | None = None  # set once, under _transition
        # The bundle in force: replaced under the sequencer lock; read without it (one reference),
        # and re-checked under it before a decision is sequenced.
        self._policy: _PolicyState | None = None
        # Allowed decisions that may still report an outcome: under the sequencer lock (filled at
        # resume under _transition, before the log is READY).
        self._open: OrderedDict[int, _OpenDecision] = OrderedDict()
        # Servers' proven identities and tool definitions: changed under the sequencer lock; read
        # by decisions without it (a decision sees the registry as it was when it was evaluated).
        self.servers = ServerRegistry()
        # After a resume (set under _transition before READY; read and cleared by the first
        # load_policy, under the sequencer lock): the policy version in force at the checkpoint
        # (no rollback below it), and the limit state the stored log gave (its newest snapshot
        # and the charges after it), restored into the limits of the first bundle.
        self._min_policy: tuple[int, bytes] | None = None
        self._resumed: ResumePoint | None = None
        # Snapshots (decision 0016): the index of the last one; one is due SNAPSHOT_INTERVAL
        # entries later. Under the sequencer lock.
        self.snapshot_interval = SNAPSHOT_INTERVAL
        self._snapshot_at = 0
        # Anonymous denials over the budget of individual entries, counted: under the sequencer lock.
        self._anonymous = AnonymousDenials()
        # Witnessed continuation (cloister.enclave.freshness): set with the sequencer, its own lock.
        self._gate: WitnessGate | None = None

    # ---- identity and attestation -------------------------------------------------------

    def binding(self, checkpoint: bytes | None = None) -> EnclaveBinding:
        cp = hashlib.sha256(checkpoint).digest() if checkpoint is not None else None
        return EnclaveBinding(
            origin=self.config.origin, log_key=self.log_public, grant_key=self.grant_public, checkpoint_sha256=cp
        )

    def attest(self, nonce: bytes, *, include_checkpoint: bool) -> tuple[bytes, bytes]:
        if len(nonce) > 512:
            raise DecodeError(f"attestation nonce is {len(nonce)} bytes; at most 512 are accepted")
        if self._log_key is None:
            raise NotReady("the enclave has no log key yet (the sealed-key exchange has not run)")
        checkpoint = b""
        if include_checkpoint:
            checkpoint = self._ready_sequencer().latest_checkpoint().note
        doc = self.nsm.attestation(user_data=self.binding(checkpoint or None).encode(), nonce=nonce or None)
        return doc, checkpoint

    # ---- the sealed log key --------------------------------------------------------------

    @property
    def note_signer(self) -> Ed25519NoteSigner:
        if self._note_signer is None:
            raise NotReady("the enclave has no log key yet (the sealed-key exchange has not run)")
        return self._note_signer

    def _install_log_key(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._log_key = key
        self._note_signer = Ed25519NoteSigner(self.config.origin, key)
        self.log_public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.state = LogState.AWAITING_LOG

    def request_key(self) -> bytes:
        """Start the sealed-key exchange: a one-use RSA key and an attestation document binding
        it, for the parent's KMS call as `Recipient`. A new request discards an earlier key."""
        with self._transition:
            if self.state is not LogState.AWAITING_KEY:
                raise KeyRefused("the enclave already has its log key")
            if self._recipient is not None:
                self._recipient.discard()
            self._recipient = RecipientKey.generate()
            return recipient_attestation(self.nsm, self._recipient)

    def open_sealed_key(self, envelope: bytes, *, first_start: bool) -> bytes:
        """Open KMS's CiphertextForRecipient with the pending one-use key (which is then gone,
        whatever happens) and install the log key derived from the seed; its public key.

        No comparison is possible here: the log key the stored log introduced is checked at
        resume (`resume_log`). A new log (`first_start`) trusts the seed on first use."""
        with self._transition:
            if self.state is not LogState.AWAITING_KEY:
                raise KeyRefused("the enclave already has its log key")
            recipient, self._recipient = self._recipient, None
            if recipient is None:
                raise KeyRefused("no recipient key is pending: call RequestKey first")
            log_key = unseal_log_key(recipient, envelope, origin=self.config.origin, expected_public=None)
            self._install_log_key(log_key)
            self._first_start = first_start
            return self.log_public

    # ---- log lifecycle -------------------------------------------------------------------

    def _key_entry(self, previous: SignedCheckpoint | None) -> KeyEntry:
        doc = self.nsm.attestation(user_data=self.binding().encode(), nonce=None)
        return KeyEntry(
            time_ms=self._clock_ms(),
            attestation=doc,
            log_key=self.log_public,
            grant_key=self.grant_public,
            log_vkey=self.note_signer.vkey,
            previous_size=previous.size if previous else None,
            previous_root=previous.root if previous else None,
        )

    def start_new_log(self) -> LogAppend:
        """Begin a new log whose first entry introduces this enclave's keys."""
        with self._transition:
            self._check_can_start(resume=False)
            self.sequencer = seq = self._new_sequencer(None)
            with seq.lock:  # READY and the key entry together: nothing this run signs comes before it
                self.state = LogState.READY
                return self._append([self._key_entry(None)])

    def resume_log(
        self,
        *,
        checkpoint: bytes,
        range_size: int,
        range_hashes: list[bytes],
        entries: list[bytes],
        key_entry: bytes,
        key_entry_index: int,
        key_entry_proof: list[bytes],
        boundary_entry: bytes,
        boundary_proof: list[bytes],
    ) -> LogAppend:
        """Continue a stored log whose tail is given whole (`resume_log_chunks` takes it in chunks)."""
        start = ResumeStart(
            checkpoint=checkpoint,
            range_size=range_size,
            range_hashes=range_hashes,
            key_entry=key_entry,
            key_entry_index=key_entry_index,
            key_entry_proof=key_entry_proof,
            boundary_entry=boundary_entry,
            boundary_proof=boundary_proof,
        )
        chunks = (
            (range_size + i, entries[i : i + MAX_CHUNK_ENTRIES]) for i in range(0, len(entries), MAX_CHUNK_ENTRIES)
        )
        return self.resume_log_chunks(start, chunks)

    def resume_log_chunks(self, start: ResumeStart, chunks: Iterable[tuple[int, Sequence[bytes]]]) -> LogAppend:
        """Continue a stored log: verify it as its entries arrive (enclave.resume), then introduce
        this enclave's keys. Nothing is installed unless all of it verifies."""
        with self._transition:
            self._check_can_start(resume=True)
            point = verify_resume(
                config=self.config,
                own_pcr0=self.pcrs.get(0, b""),
                start=start,
                chunks=chunks,
                now_ms=self._clock_ms(),
                max_open=MAX_OPEN_DECISIONS,
            )
            # The log key is one per origin: the stored log must have been signed by exactly the
            # key just unsealed (verify_resume proved that key entry introduced the signing key).
            intro = parse_entry(start.key_entry)
            if not isinstance(intro, KeyEntry) or intro.log_key != self.log_public:
                raise SealedKeyMismatch(
                    f"the stored log of {self.config.origin} was signed by another log key than the one unsealed; "
                    "refusing to continue it"
                )
            self.sequencer = self._new_sequencer(point.tree)
            self._min_policy = parse_policy_extension(point.checkpoint.extensions)
            self._resumed = point
            # The next snapshot is due SNAPSHOT_INTERVAL entries after the one resumed from; a log
            # that has none (written before snapshots) gets one with its first decision.
            self._snapshot_at = point.snapshot.index if point.snapshot else -self.snapshot_interval
            self._reopen_decisions(point)
            previous = SignedCheckpoint(size=point.checkpoint.size, root=point.checkpoint.root_hash, note=point.note)
            # READY and the key entry together, under the sequencer's lock: an outcome for a reopened
            # decision, asked for the moment the state is READY, would otherwise be appended first,
            # and the key entry would no longer follow the state it continues (found by the crash test).
            with self.sequencer.lock:
                self.state = LogState.READY
                return self._append([self._key_entry(previous)])

    def _new_sequencer(self, tree: CompactRange | None) -> Sequencer:
        """The run's sequencer and its witness gate: granting waits for the witnesses to cosign
        this run's key entry, the next entry (called under _transition, before it is appended)."""
        gate = WitnessGate(self.config.witnessing, self.config.origin, (tree.size if tree else 0) + 1)
        self._gate = gate
        return Sequencer(
            self.config.origin,
            self.note_signer,
            tree,
            on_signed=lambda cp: gate.signed(cp.size, cp.root, self._clock_ms()),
        )

    def add_cosignatures(self, note: bytes) -> GateStatus:
        """A checkpoint of this run cosigned by witnesses (the relay collects them); the gate after it."""
        seq = self._ready_sequencer()
        gate = self._gate
        assert gate is not None  # set with the sequencer
        gate.accept(note)
        return gate.status(seq.size, self._clock_ms())

    def witness_status(self) -> GateStatus | None:
        gate, seq = self._gate, self.sequencer
        return gate.status(seq.size, self._clock_ms()) if gate is not None and seq is not None else None

    def _check_can_start(self, *, resume: bool) -> None:
        if self.state is LogState.AWAITING_KEY:
            raise NotReady("the enclave has no log key yet (the sealed-key exchange has not run)")
        if self.state is not LogState.AWAITING_LOG:
            raise NotReady("the log is already running")
        if self._first_start is resume:  # the parent said otherwise when the key was unsealed
            raise KeyRefused(
                "the log key was unsealed for a new log; StartLog must start one"
                if resume
                else "the log key was unsealed for a stored log; StartLog must resume it"
            )

    def _reopen_decisions(self, point: ResumePoint) -> None:
        """Allowed calls still in flight when the previous enclave stopped may still report outcomes
        (the verifier kept those of the history without an outcome, oldest first)."""
        for index, d in point.open.items():
            self._open[index] = _OpenDecision(d.agent, d.roles, d.server, d.tool, d.expires_ms, d.nonce)

    def _ready_sequencer(self) -> Sequencer:
        if self.state is not LogState.READY or self.sequencer is None:
            raise NotReady("the enclave's log has not been started or resumed yet")
        return self.sequencer

    # Every entry is appended by `_log` and answered with `_covered`; `_append` does both, for
    # callers whose critical section is the append alone.

    def _log(self, seq: Sequencer, entries: Sequence[Entry]) -> tuple[int, tuple[bytes, ...]]:
        """Append entries in order: their first index and encodings. Takes the sequencer lock,
        reentrantly: a caller whose critical section must cover more than the append holds it.

        A snapshot that is due goes first, in the same append, before a decision (whose answer
        names the batch's last entry, never its first): see `_snapshot_entries`."""
        encoded = tuple(encode_entry(e) for e in entries)
        with seq.lock:
            first = seq.size
            due = first - self._snapshot_at >= self.snapshot_interval
            if due and entries and isinstance(entries[-1], DecisionEntry) and _room_for_snapshot(seq):
                snapshot = tuple(encode_entry(e) for e in self._snapshot_entries(first))
                for data in snapshot:
                    seq.append(data)
                self._snapshot_at = first
                encoded = (*snapshot, *encoded)
            for data in encoded[len(encoded) - len(entries) :]:
                seq.append(data)
        return first, encoded

    # ---- snapshots (docs/decisions/0016) ---------------------------------------------------

    def _snapshot_entries(self, upto: int) -> list[SnapshotEntry]:
        """The state a resume needs, as of index `upto` (where its first part goes): the limit
        windows of the bundle in force (folded, the live ones too) and the oldest decision that
        may still get an outcome. Under the sequencer lock."""
        now_ms = self._clock_ms()
        ps = self._policy
        rows = ps.limits.snapshot(now_ms) if ps is not None else []
        open_from = next(iter(self._open), upto)
        parts: list[list[SnapshotWindow]] = [[]]
        size = 0
        for row in rows:
            # Each row is encoded alone to size it; a part stays well under MAX_ENTRY_BYTES.
            n = len(_encode_row(row))
            if parts[-1] and size + n > _SNAPSHOT_PART_BYTES:
                parts.append([])
                size = 0
            parts[-1].append(row)
            size += n
        return [
            SnapshotEntry(
                time_ms=now_ms,
                upto=upto,
                part=i,
                parts=len(parts),
                open_from=open_from,
                policy_version=ps.version if ps is not None else None,
                policy_sha256=ps.sha256 if ps is not None else None,
                windows=tuple(windows),
            )
            for i, windows in enumerate(parts)
        ]

    @staticmethod
    def _covered(seq: Sequencer, first: int, encoded: tuple[bytes, ...]) -> LogAppend:
        """The appended entries and a signed checkpoint covering them. Never call with the
        sequencer lock held: signing the checkpoint takes it (and other signers wait for it)."""
        return LogAppend(first, encoded, seq.checkpoint_covering(first + len(encoded)))

    def _append(self, entries: Sequence[Entry]) -> LogAppend:
        seq = self._ready_sequencer()
        return self._covered(seq, *self._log(seq, entries))

    def sync(self, persisted_size: int) -> LogAppend:
        seq = self._ready_sequencer()
        seq.release(persisted_size)
        first, entries = seq.pending_from(persisted_size)
        return LogAppend(first, tuple(entries), seq.latest_checkpoint())

    # ---- policy --------------------------------------------------------------------------

    def load_policy(self, data: bytes) -> tuple[int, bytes, LogAppend]:
        """Verify and install a signed bundle, atomically; log the change."""
        try:
            # Only bundles signed for this log's origin and not past their not-after (decision 0012).
            signed = verify_bundle(data, self.config.admin_keys, origin=self.config.origin, now_ms=self._clock_ms())
            bundle = parse_bundle_files(signed.files, origin=self.config.origin)
        except (DecodeError, VerificationError) as exc:
            raise PolicyRefused(str(exc)) from exc
        engine = PolicyEngine(bundle)
        engine.set_server_levels(self.servers.levels(bundle.servers, self._clock_ms()))
        seq = self._ready_sequencer()
        with seq.lock:
            current = self._policy
            if current is not None and signed.version <= current.version:
                raise PolicyNotNewer(
                    f"bundle version {signed.version} is not above the version in force ({current.version}); "
                    "rollbacks and replays are refused"
                )
            if current is None and self._min_policy is not None:
                floor_version, floor_sha = self._min_policy
                if signed.version < floor_version or (signed.version == floor_version and signed.sha256 != floor_sha):
                    raise PolicyRefused(
                        f"the log's latest checkpoint has bundle version {floor_version} in force; bundle version "
                        f"{signed.version} would roll it back"
                    )
            now_ms = self._clock_ms()
            limits = LimitBook.for_bundle(bundle)
            if current is not None:
                limits.carry_over(current.limits)
            elif self._resumed is not None:
                self._rebuild_limits(limits, self._resumed, now_ms)
            first_load_at_same_version = current is None and self._min_policy == (signed.version, signed.sha256)
            entries = (
                []
                if first_load_at_same_version
                else [
                    PolicyEntry(
                        time_ms=now_ms,
                        bundle_sha256=signed.sha256,
                        version=signed.version,
                        signer=signed.signer,
                        mode=bundle.settings.mode,
                    )
                ]
            )
            first, encoded = self._log(seq, entries)
            # The checkpoints from here on name the new bundle, starting with the one covering its
            # entry (none is signed while this holds the lock). Set only once the entry is appended:
            # a refused append (back-pressure) leaves the bundle in force named.
            seq.set_extensions((policy_extension(signed.version, signed.sha256),))
            self._policy = _PolicyState(
                bundle=bundle,
                engine=engine,
                limits=limits,
                sha256=signed.sha256,
                version=signed.version,
                signer=signed.signer,
            )
            self._resumed = None
        return signed.version, signed.sha256, self._covered(seq, first, encoded)

    @staticmethod
    def _rebuild_limits(limits: LimitBook, point: ResumePoint, now_ms: int) -> None:
        """The first bundle after a resume: its windows from the snapshot, then the charges after it."""
        floor = point.history_floor_ms
        need_from = now_ms - limits.max_window_s * 1000
        if point.snapshot is None and floor is not None and limits.max_window_s and floor > need_from:
            raise PolicyRefused(
                f"this bundle's limit windows reach back {limits.max_window_s}s, but the log history given "
                "at resume does not reach that far and holds no snapshot; resume with more history so budgets "
                "are not reset"
            )
        if point.snapshot is not None:
            limits.restore(point.snapshot.windows, now_ms)
        limits.replay(point.charges, now_ms)

    @property
    def policy(self) -> _PolicyState | None:
        return self._policy

    # ---- decisions -----------------------------------------------------------------------

    def authorize(
        self,
        *,
        token: str,
        server: str,
        tool: str,
        arguments_json: bytes,
        request_id: str,
        persisted_size: int,
        payment_amount: str = "",
        payment: bytes = b"",
        kind: ActionKind = ActionKind.TOOL,
    ) -> Verdict:
        seq = self._ready_sequencer()
        seq.release(persisted_size)
        while True:
            ps = self._policy
            if ps is None:
                raise NotReady("no policy bundle is loaded; every call is refused")
            call = Call(
                identity=_CachedToken(token, ps.tokens),
                server=server,
                tool=tool,
                arguments_json=arguments_json,
                payment_amount=payment_amount,
                now_ms=self._clock_ms(),
                payment=payment,
                kind=kind,
            )
            verdict = self._decide(ps, seq, call, bounded(request_id, MAX_REQUEST_ID))
            if verdict is not None:
                return verdict
            # The bundle changed between evaluation and sequencing: decide again on the new one.

    def _decide(self, ps: _PolicyState, seq: Sequencer, call: Call, request_id: str) -> Verdict | None:
        # Steps 1-5 of the decision, outside the lock.
        pending = decide_before_limits(call, State(ps.bundle, ps.engine, self.servers, ps.limits))
        # Step 6 (limits), the entry, its sequencing and the charge: one critical section.
        with seq.lock:
            if self._policy is not ps:
                return None
            # Nothing is decided on a log the witnesses are not keeping up with (freshness.py).
            if self._gate is not None:
                self._gate.check(seq.size, call.now_ms)
            d = decide_limits(call, pending, ps.limits)
            p, through = d.principal, d.goes_through
            nonce = self._random(16) if through else None
            expiry = call.now_ms + ps.bundle.settings.grant_ttl_s * 1000 if through else None
            entry = _decision_entry(ps, call, d, request_id, nonce, expiry)
            # An anonymous denial gets its own entry only within its window's budget (decision 0009);
            # a count of an earlier window goes out first, with whichever decision comes next.
            counted = self._anonymous.closed(call.now_ms)
            logged = p is not None or self._anonymous.has_room(call.now_ms)
            first, encoded = self._log(seq, [*([counted] if counted else []), *([entry] if logged else [])])
            self._anonymous.settle(call.now_ms, entry if p is None else None, logged=logged)
            # The decision's index; for a denial only counted, the log's size (its count comes later).
            index, data = first + len(encoded) - logged, encoded[-1] if logged else b""
            if not d.code and d.limit_check is not None and p is not None:
                ps.limits.charge(p.agent, call.server, call.tool, d.limit_check.charges, call.now_ms)
            if through and p is not None:
                self._open_decision(
                    index,
                    _OpenDecision(
                        p.agent,
                        p.roles,
                        call.server,
                        call.recorded_tool,
                        expiry or call.now_ms,
                        nonce or b"",
                        self._signing(ps, call.server),
                    ),
                )
        # The grant and the checkpoint, outside the lock.
        grant = b""
        # Sampling and elicitation go to the agent, not to an upstream: no grant (decision 0018).
        upstream_bound = call.kind in (ActionKind.TOOL, ActionKind.RESOURCE, ActionKind.PROMPT)
        if p is not None and nonce is not None and expiry is not None and upstream_bound:
            claims = GrantClaims(
                agent=p.agent,
                server=call.server,
                tool=bounded(call.recorded_tool, NAME_BOUND),
                args_sha256=d.args_sha256,
                policy_sha256=ps.sha256,
                log_index=index,
                entry_hash=leaf_hash(data),
                origin=self.config.origin,
                issued_ms=call.now_ms,
                expires_ms=expiry,
                nonce=nonce,
                # The upstream instance, from the bundle; the payment as the enclave parsed and charged it.
                audience=spec.instance if (spec := ps.bundle.servers.get(call.server)) is not None else "",
                payment_sha256=d.payment_sha256,
                payment_amount=format(d.payment, "f") if d.payment_sha256 is not None else "",
            )
            grant = encode_grant(claims, self._grant_key.sign, self.grant_public)
        return Verdict(
            allowed=through,
            code=d.code,
            reason=entry.reason,
            policy_ids=d.policy_ids,
            log=self._covered(seq, first, encoded),
            log_index=index,
            agent=p.agent if p else "",
            grant=grant,
            limits=d.limit_check.statuses if d.limit_check else (),
        )

    def _open_decision(self, index: int, d: _OpenDecision) -> None:
        self._open[index] = d
        cutoff = self._clock_ms() - OUTCOME_GRACE_MS
        while self._open:
            first = next(iter(self._open.values()))
            if first.expires_ms >= cutoff and len(self._open) <= MAX_OPEN_DECISIONS:
                break
            self._open.popitem(last=False)

    def _signing(self, ps: _PolicyState, server: str) -> tuple[bool, bytes | None]:
        """Whether `server`'s responses must be signed, and with which key (ServerRegistry)."""
        spec = ps.bundle.servers.get(server)
        return self.servers.response_key(spec) if spec is not None else (False, None)

    def record_outcome(
        self,
        *,
        decision_index: int,
        result_sha256: bytes | None,
        error: str,
        duration_us: int,
        paid_amount: str,
        persisted_size: int,
        response_sig: bytes = b"",
    ) -> LogAppend:
        """Log the outcome of an open allowed decision, with the verdict on the upstream's response
        signature (decision 0017). A bad or missing signature is recorded, never a reason to refuse
        the outcome: the outcome must be logged either way."""
        seq = self._ready_sequencer()
        seq.release(persisted_size)
        if result_sha256 is not None and len(result_sha256) != 32:
            raise DecodeError("outcome result hash must be 32 bytes (SHA-256) or empty")
        with seq.lock:
            decision = self._open.get(decision_index)
        if decision is None:
            raise VerificationError(
                f"log entry {decision_index} is not an open allowed decision of this enclave "
                "(unknown, already closed, or older than the outcome window)"
            )
        # The signature is checked outside the lock, against the decision as it was opened.
        response, sig, key = self._response_verdict(decision, result_sha256, response_sig)
        # The entry is made (and so checked) before the decision is closed: a refused outcome
        # leaves the decision open for a correct report. The upstream's error text is bounded.
        entry = OutcomeEntry(
            time_ms=self._clock_ms(),
            decision_index=decision_index,
            result_sha256=result_sha256,
            error=bounded(error, OutcomeEntry.FIELDS["error"].max_len),
            duration_us=duration_us,
            paid=_paid_text(paid_amount),
            response=response,
            response_sig=sig,
            response_key=key,
        )
        with seq.lock:
            if self._open.get(decision_index) is not decision:
                raise VerificationError(f"log entry {decision_index} was closed by another outcome meanwhile")
            del self._open[decision_index]
            first, encoded = self._log(seq, [entry])
            # The payment was charged against x402 caps when the call was decided (exactly, before
            # it went upstream); the outcome only records what was paid.
        return self._covered(seq, first, encoded)

    def _response_verdict(
        self, decision: _OpenDecision, result_sha256: bytes | None, response_sig: bytes
    ) -> tuple[str, bytes | None, bytes | None]:
        """(status, signature to record, key to record) for an outcome (cloister.verify.response_sig)."""
        signing = decision.signing
        if signing is None:  # reopened after a restart: the key the server has proven since, if any
            ps = self._policy
            signing = self._signing(ps, decision.server) if ps is not None else (True, None)
        required, key = signing
        if len(response_sig) > 2 * SIG_BYTES:
            response_sig = response_sig[: 2 * SIG_BYTES]  # judged invalid below; bounded before anything
        check = ResponseCheck(
            required=required,
            response_key=key,
            nonce=decision.nonce,
            result_hash=result_sha256,
            signature=response_sig or None,
        )
        status = response_verdict(check)
        if status in (ResponseStatus.NOT_REQUIRED, ResponseStatus.NO_RESULT, ResponseStatus.MISSING):
            return status.value, None, None
        sig = response_sig if len(response_sig) == SIG_BYTES else None
        return status.value, sig, key if sig is not None and key else None

    def visible_tools(self, token: str, candidates: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
        agent, shown = self.visible_items(token, [(ActionKind.TOOL, server, tool) for server, tool in candidates])
        return agent, [candidates[i] for i in shown]

    def visible_items(self, token: str, items: Sequence[tuple[ActionKind, str, str]]) -> tuple[str, list[int]]:
        """The agent, and the indexes of the items it may see: (kind, server, name), the name a
        tool, a resource URI or URI template, or a prompt, judged with what the listing knows
        (decision 0018). Discovery only: every use is decided on its own."""
        ps = self._policy
        if ps is None:
            raise NotReady("no policy bundle is loaded")
        now_ms = self._clock_ms()
        principal = _CachedToken(token, ps.tokens).principal(ps.bundle, now_ms)
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        out = []
        for i, (kind, server, name) in enumerate(items):
            spec = ps.bundle.servers.get(server)
            if spec is None or (kind is ActionKind.TOOL and name not in spec.tools):
                continue
            if self.servers.refusal(spec, name if kind is ActionKind.TOOL else "", now_ms) is not None:
                continue
            action, known = MCP_ACTIONS.get(kind), _known(kind, name)
            if ps.engine.may_call(principal, server, name, now, action=action, known=known):
                out.append(i)
        return principal.agent, out

    # ---- upstream servers: identity and tool pins ---------------------------------------------

    def _server_spec(self, server: str) -> tuple[_PolicyState, Any]:
        ps = self._policy
        if ps is None:
            raise NotReady("no policy bundle is loaded")
        spec = ps.bundle.servers.get(server)
        if spec is None:
            raise DecodeError(f"server {quoted(server)} is not in the policy bundle")
        return ps, spec

    def server_challenge(self, server: str, *, reconnect: bool = False) -> tuple[bytes, str]:
        """A fresh nonce the server must put in its attestation, and the identity kind required."""
        _, spec = self._server_spec(server)
        seq = self._ready_sequencer()
        with seq.lock:
            nonce = self.servers.challenge(spec, self._clock_ms(), self._random, reconnect=reconnect)
            ps = self._policy
            if reconnect and ps is not None:
                ps.engine.set_server_levels(self.servers.levels(ps.bundle.servers, self._clock_ms()))
            return nonce, spec.identity.kind

    def report_server(
        self,
        *,
        server: str,
        attestation: bytes,
        artifact: bytes,
        certificates: list[bytes],
        tools_json: bytes,
        failure: str,
        evidence: bool,
        persisted_size: int,
    ) -> tuple[Report, LogAppend]:
        """Verify the evidence the relay carried (inside the enclave), log the result and any drift."""
        seq = self._ready_sequencer()
        seq.release(persisted_size)
        ps, spec = self._server_spec(server)
        with seq.lock:
            now_ms = self._clock_ms()
            report = self.servers.report(
                spec,
                now_ms=now_ms,
                root=self.config.trust_root,
                allow_debug=self.config.allow_debug,
                attestation=attestation,
                artifact=artifact,
                certificates=certificates,
                tools_json=tools_json,
                failure=failure,
                evidence=evidence,
            )
            ps.engine.set_server_levels(self.servers.levels(ps.bundle.servers, now_ms))
            first, encoded = self._log(seq, report.entries)
        return report, self._covered(seq, first, encoded)

    def health(self) -> dict[str, Any]:
        ps = self._policy
        seq = self.sequencer
        return {
            "origin": self.config.origin,
            "log_public_key": self.log_public,
            "grant_public_key": self.grant_public,
            "log_verifier_key": self._note_signer.vkey if self._note_signer else "",
            "policy_version": ps.version if ps else 0,
            "policy_sha256": ps.sha256 if ps else b"",
            "log_size": seq.size if seq else 0,
            "pcr0": self.pcrs.get(0, b""),
            "mock_nsm": self.mock_nsm,
            "ready": self.state is LogState.READY and ps is not None,
            "awaiting_key": self.state is LogState.AWAITING_KEY,
            "witness": (w.json() if (w := self.witness_status()) is not None else None),
        }


def _known(kind: ActionKind, name: str) -> Any:
    """What a listing knows of a request's input (`PolicyEngine.may_call`): a resource's URI (a
    template's stays unknown: its URIs are not yet made), a prompt's name; None: nothing."""
    if kind is ActionKind.RESOURCE and "{" not in name:
        return {"uri": name}
    if kind is ActionKind.PROMPT:
        # Without its arguments: cedarpy's partial evaluation leaves a context holding both an
        # unknown and the time undecided, which would show every prompt. A policy on the
        # arguments then errors here and is skipped: discovery shows more, never decides more.
        return {"name": name}
    return None


def _paid_text(paid_amount: str) -> str:
    """An outcome's paid amount as the entry records it: normalised plain digits ("" for none),
    within the bounds a charge has (DecodeError otherwise)."""
    if not paid_amount:
        return ""
    what = f"paid amount {quoted(paid_amount)}"
    if len(paid_amount) > MAX_DECIMAL_TEXT:
        raise DecodeError(f"{what} is longer than {MAX_DECIMAL_TEXT} characters")
    try:
        paid = Decimal(paid_amount)
    except ArithmeticError as exc:
        raise DecodeError(f"{what} is not a decimal number") from exc
    if not paid.is_finite() or paid < 0 or paid > MAX_LIMIT_VALUE:
        raise DecodeError(f"{what} must be a non-negative decimal of at most {MAX_LIMIT_VALUE}")
    if -int(paid.as_tuple().exponent) > MAX_COST_PLACES:
        raise DecodeError(f"{what} has more than {MAX_COST_PLACES} decimal places")
    return decimal_text(paid)


def _room_for_snapshot(seq: Sequencer) -> bool:
    """Whether storage keeps up well enough to take a snapshot now. A snapshot appended and then
    followed by a decision refused for back-pressure would reach the parent in no answer; with
    the buffer at most half full, the largest snapshot (4,096 windows of at most about 3 kB) and
    its decision fit. Otherwise the snapshot stays due, for a later decision."""
    _, pending = seq.pending_from(0)
    return len(pending) < MAX_PENDING_ENTRIES // 2 and sum(map(len, pending)) < MAX_PENDING_BYTES // 2


# A snapshot part's windows, encoded, at most (the rest of MAX_ENTRY_BYTES is its header).
_SNAPSHOT_PART_BYTES = MAX_ENTRY_BYTES - 1024


def _encode_row(row: SnapshotWindow) -> bytes:
    lid, key, buckets = row
    return dumps_deterministic([lid, key, [[t, a] for t, a in buckets]])


# Server and tool names in a decision entry: the bundle's are at most 128 characters and recorded
# as they are; a longer name (an unknown one, from anyone) is kept as a prefix and its hash.
NAME_BOUND = GRANT_NAME_BOUND  # (256) the same cut GrantGuard applies to a grant's name
# When a decision entry would not fit MAX_ENTRY_BYTES (policy ids and reasons of many multi-byte
# characters), its reason and policy list are cut further.
_SMALL_REASON, _SMALL_POLICIES = 1024, 8


def _decision_entry(
    ps: _PolicyState, call: Call, d: Decision, request_id: str, nonce: bytes | None, expiry: int | None
) -> DecisionEntry:
    """The decision's entry, one `parse_entry` accepts whatever the caller sent: every text that
    comes from the call (names, the reason built from a token's claims or an upstream's answer) is
    `bounded`, and the whole fits an entry."""
    p = d.principal
    fields = DecisionEntry.FIELDS
    entry = DecisionEntry(
        time_ms=call.now_ms,
        agent=p.agent if p else "",
        roles=tuple(sorted(p.roles)) if p else (),
        issuer=p.issuer if p else "",
        server=bounded(call.server, NAME_BOUND),
        tool=bounded(call.recorded_tool, NAME_BOUND),
        args_sha256=d.args_sha256,
        decision="allow" if d.allowed else "deny",
        code=d.code,
        reason=bounded(d.reason, fields["reason"].max_len),
        policies=_bounded_ids(d.policy_ids, fields["policies"].max_len),
        policy_sha256=ps.sha256,
        policy_version=ps.version,
        request_id=request_id,
        grant_nonce=nonce,
        grant_expiry_ms=expiry,
        charges=d.charges,
        mode=d.mode,
    )
    size = sum(len(x.encode("utf-8")) for x in (entry.reason, *entry.policies))
    if size > MAX_ENTRY_BYTES // 2:
        entry = replace(
            entry,
            reason=bounded(entry.reason, _SMALL_REASON),
            policies=_bounded_ids(entry.policies, _SMALL_POLICIES),
        )
    return entry


def _bounded_ids(ids: Sequence[str], count: int) -> tuple[str, ...]:
    """Policy ids for an entry: each bounded, and at most `count` (the last says how many more)."""
    item = DecisionEntry.FIELDS["policies"].item_len
    if len(ids) <= count:
        return tuple(bounded(i, item) for i in ids)
    return (*(bounded(i, item) for i in ids[: count - 1]), f"…(and {len(ids) - count + 1} more)")
