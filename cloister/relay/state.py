"""What the relay's roles share: its configuration, the enclave client, the log's storage, and
what the enclave last said about itself (attestation, health)."""

from __future__ import annotations

import asyncio

from cloister.audit.sealed import seal_body
from cloister.relay.config import RelayConfig
from cloister.relay.enclave_client import EnclaveClient
from cloister.relay.storage import LogWriter
from cloister.wire import enclave_pb2 as pb


class RelayState:
    def __init__(self, config: RelayConfig, enclave: EnclaveClient) -> None:
        self.config = config
        self.enclave = enclave
        self._writer: LogWriter | None = None
        self.attestation = b""  # the enclave's latest document, sent upstream beside every grant
        self.attested_at = 0.0  # time.monotonic() when `attestation` was fetched
        self.health_info: pb.HealthResponse | None = None

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
        key = self.config.body_public_key
        stored = seal_body(key, index, kind, data) if key is not None else data
        return self.writer.put_body(index, kind, stored)
