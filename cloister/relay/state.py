"""What the relay's roles share: its configuration, the enclave client, the log's storage, and
what the enclave last said about itself (attestation, health)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import anyio

from cloister.audit.sealed import BodySealer
from cloister.relay.config import RelayConfig
from cloister.relay.enclave_client import EnclaveClient
from cloister.relay.storage import LogWriter
from cloister.verify.checkpoint import parse_checkpoint
from cloister.verify.key_evidence import KeyEvidence, encode_decision_evidence, encode_key_evidence
from cloister.verify.note import parse_note
from cloister.wire import enclave_pb2 as pb


class RelayState:
    def __init__(self, config: RelayConfig, enclave: EnclaveClient) -> None:
        self.config = config
        self.enclave = enclave
        self._writer: LogWriter | None = None
        self.attestation = b""  # the enclave's latest document, sent upstream beside every grant
        self.attested_at = 0.0  # time.monotonic() when `attestation` was fetched
        self.health_info: pb.HealthResponse | None = None
        # Whether the enclave grants, as far as witnessing goes: from Health and AddCosignatures.
        self.witness_state: pb.WitnessState | None = None
        # Evidence that the enclave's grant key was introduced at a witnessed checkpoint, sent
        # beside every grant (cloister.verify.key_evidence); for the enclave run starting at `_evidence_for`.
        self.key_evidence: str | None = None
        self._evidence_for = -1
        # The newest checkpoint the enclave accepted as quorum-cosigned (size, note), for calls that
        # wait for their decision to be witnessed; `_quorum_moved` wakes them.
        self.quorum: tuple[int, bytes] | None = None
        self._quorum_moved = anyio.Event()
        self.nudge_witnesses: Callable[[], None] = lambda: None  # set by the relay when it has witnesses
        # One HPKE sealing context for many bodies (CLS2, decision 0032); used from the event loop only.
        key = config.body_public_key
        self._sealer = BodySealer(key, clock=time.monotonic) if key is not None else None

    async def deliver_cosignatures(self, cosigned_checkpoint: bytes) -> None:
        """Hand a quorum-cosigned checkpoint to the enclave (cloister.relay.witnessing); once one
        covers this run's key entry, keep the evidence upstreams check (made before the hand-over
        when the run is known, so no grant goes out with a previous run's evidence)."""
        size = parse_checkpoint(parse_note(cosigned_checkpoint).text).size
        if self.witness_state is not None:
            await self._keep_evidence(cosigned_checkpoint, size, self.witness_state.start_size)
        ws = await self.enclave.add_cosignatures(cosigned_checkpoint)
        self.witness_state = ws
        await self._keep_evidence(cosigned_checkpoint, size, ws.start_size)
        if self.quorum is None or size > self.quorum[0]:
            self.quorum = (size, cosigned_checkpoint)
            self._quorum_moved.set()
            self._quorum_moved = anyio.Event()

    async def decision_evidence(self, index: int, timeout_s: float) -> str | None:
        """Evidence that entry `index` is in a checkpoint the witnesses cosigned, waiting at most
        `timeout_s` for them (None if they did not cosign it in time)."""
        with anyio.move_on_after(timeout_s):
            while self.quorum is None or self.quorum[0] <= index:
                moved = self._quorum_moved
                self.nudge_witnesses()
                await moved.wait()
            size, note = self.quorum
            return encode_decision_evidence(note, await self.writer.inclusion_proof(index, size))
        return None

    async def _keep_evidence(self, cosigned_checkpoint: bytes, size: int, start_size: int) -> None:
        if self._evidence_for == start_size or not 0 < start_size <= size:
            return
        index = start_size - 1  # this run's key entry: the first entry it appended
        entry = (await self.writer.read_entries(index, index + 1))[0]
        proof = await self.writer.inclusion_proof(index, size)
        self.key_evidence = encode_key_evidence(KeyEvidence(cosigned_checkpoint, index, entry, tuple(proof)))
        self._evidence_for = start_size

    @property
    def writer(self) -> LogWriter:
        """The log's storage: opened at start, reopened when an enclave restarts (`Lifecycle`)."""
        if self._writer is None:
            raise RuntimeError("the log's storage is not open yet")
        return self._writer

    @writer.setter
    def writer(self, writer: LogWriter) -> None:
        self._writer = writer

    async def persist(self, append: pb.LogAppend) -> None:
        """Make the enclave's entries and checkpoint durable (in index order)."""
        if append.entries or append.checkpoint:
            await self.writer.persist(append.first_index, list(append.entries), append.checkpoint)

    def store_body(self, index: int, kind: str, data: bytes) -> asyncio.Future[None]:
        """Keep the body entry `index` commits to, sealed to the auditor key when one is configured
        (so neither storage nor this host can read it later); the future resolves when durable."""
        stored = self._sealer.seal(index, kind, data) if self._sealer is not None else data
        return self.writer.put_body(index, kind, stored)
