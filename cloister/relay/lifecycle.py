"""The relay's start-up and the enclave's readiness: open storage, hand the enclave its sealed log
key (the KMS Recipient exchange, docs/decisions/0014), start or resume the enclave's log, load the
newest policy bundle, keep the enclave's attestation fresh, and bring a restarted enclave back
(watching its health)."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import anyio
import anyio.abc
import grpc

from cloister.relay.config import RelayConfig
from cloister.relay.enclave_client import EnclaveRefused, EnclaveUnavailable
from cloister.relay.state import RelayState
from cloister.relay.storage import LocalBackend, LogWriter, WriterOptions
from cloister.relay.storage.resume import ResumePlan
from cloister.relay.upstreams import Upstreams
from cloister.relay.witnessing import Witnessing
from cloister.verify.errors import CloisterError
from cloister.wire import enclave_pb2 as pb
from cloister.wire.contract import MAX_LIMIT_WINDOW_S, POLICY_NOT_NEWER_STATUS, RESUME_HISTORY_MARGIN_S

log = logging.getLogger("cloister.relay")

POLICY_NOT_NEWER = grpc.StatusCode[POLICY_NOT_NEWER_STATUS]
# The log key's seed as KMS sealed it (GenerateDataKey's CiphertextBlob), kept beside the log:
# only KMS opens it, and only for a Recipient whose PCR0 the key policy names.
SEALED_SEED_OBJECT = "kms/sealed-seed"


class SealedKeyUnavailable(CloisterError):
    """The enclave's log key could not be unsealed (no [kms], KMS refused, no stored seed)."""


async def unseal_log_key(state: RelayState, origin: str, *, first_start: bool) -> pb.OpenSealedKeyResponse:
    """The sealed-key exchange: the enclave's Recipient document to KMS, its answer to the enclave.

    No sealed seed stored: GenerateDataKey (a new seed), whose CiphertextBlob is stored durably
    BEFORE the enclave gets the seed, so a log key is never used that could not be unsealed again.
    Otherwise: Decrypt of the stored blob. The relay sees only the blob and the envelope.
    """
    from cloister.relay import kms as kms_api

    config = state.config.kms
    if config is None:
        raise SealedKeyUnavailable("the enclave waits for its sealed log key: configure [kms] (key_id, region)")
    document = await state.enclave.request_key()
    context = {"cloister:origin": origin}
    blob = await state.writer.read_object(SEALED_SEED_OBJECT)
    if blob is None and not first_start:
        raise SealedKeyUnavailable(
            f"the stored log has no sealed log key seed ({SEALED_SEED_OBJECT}); refusing to make a new log key for it"
        )
    try:
        if config.endpoint_url is not None:
            client = kms_api.local_kms_client(config.endpoint_url, region=config.region)
        else:
            client = kms_api.kms_client(config.region)
        if blob is None:
            sealed = await anyio.to_thread.run_sync(
                lambda: kms_api.generate_sealed_seed(client, config.key_id, document, encryption_context=context)
            )
            await state.writer.write_object(SEALED_SEED_OBJECT, sealed.ciphertext_blob)
            log.info("KMS key %s made the log key's seed; sealed copy stored as %s", config.key_id, SEALED_SEED_OBJECT)
            envelope = sealed.ciphertext_for_recipient
        else:
            envelope = await anyio.to_thread.run_sync(
                lambda: kms_api.decrypt_for_recipient(
                    client, blob, document, key_id=config.key_id, encryption_context=context
                )
            )
    except Exception as exc:  # botocore's ClientError / BotoCoreError, KmsResponseError
        raise SealedKeyUnavailable(f"KMS did not unseal the log key for this enclave: {_kms_error(exc)}") from exc
    return await state.enclave.open_sealed_key(envelope, first_start=first_start)


def _kms_error(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return f"{error.get('Code', type(exc).__name__)}: {error.get('Message', '')}"
    return f"{type(exc).__name__}: {exc}"


async def open_storage(
    location: str,
    *,
    s3_endpoint_url: str | None,
    body_retention_days: int | None,
    verify: Literal["full", "tail"] = "full",
    publish_every: int = 4096,
    publish_interval_ms: int = 1000,
) -> LogWriter:
    """The log's storage: a local directory, or s3://bucket/prefix; tiles and the public
    checkpoint are published every `publish_every` entries or `publish_interval_ms` (decision 0025)."""
    options = WriterOptions(
        body_retention_days=body_retention_days,
        verify=verify,
        materialize_every=publish_every,
        materialize_interval_ms=publish_interval_ms,
    )
    if location.startswith("s3://"):
        from cloister.relay.storage.s3 import S3Backend

        bucket, _, prefix = location[5:].partition("/")
        return await LogWriter.open(S3Backend(bucket, prefix, endpoint_url=s3_endpoint_url), options)
    return await LogWriter.open(LocalBackend(location), options)


def bundle_store(config: RelayConfig) -> Path:
    """Where the relay keeps bundles pushed since it started (`v<version>.signed`)."""
    path = config.run_dir.parent / "bundles"
    path.mkdir(parents=True, exist_ok=True)
    return path


def newest_bundle(config: RelayConfig) -> bytes | None:
    """The configured bundle, or a newer one pushed since (kept in the relay's bundle store)."""
    from cloister.verify.bundle import read_bundle_header

    candidates = list(bundle_store(config).glob("v*.signed"))
    if config.bundle is not None:
        candidates.append(config.bundle)
    best: tuple[int, bytes] | None = None
    for path in candidates:
        try:
            data = path.read_bytes()
            version = read_bundle_header(data)[0]
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable policy bundle %s: %s", path, exc)
            continue
        if best is None or version > best[0]:
            best = (version, data)
    return best[1] if best else None


class Lifecycle:
    def __init__(self, state: RelayState, upstreams: Upstreams, witnessing: Witnessing | None = None) -> None:
        self.state = state
        self.upstreams = upstreams
        self.witnessing = witnessing
        self._init_lock = anyio.Lock()

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        config = self.state.config
        self.state.writer = await open_storage(
            config.storage,
            s3_endpoint_url=config.s3_endpoint_url,
            body_retention_days=config.body_retention_days,
            publish_every=config.publish_every,
            publish_interval_ms=config.publish_interval_ms,
        )
        await self.state.enclave.start()
        await self.ensure_enclave_ready(startup=True)
        await self.upstreams.run(tg)
        await self.upstreams.wait_ready(15)
        tg.start_soon(self.watch_enclave)
        if self.witnessing is not None:
            # Off the call path: checkpoints go to the witnesses from their own tasks.
            tg.start_soon(self.witnessing.run)

    async def ensure_enclave_ready(self, *, startup: bool = False) -> None:
        """Bring the enclave to a running log with the configured policy, whatever its state."""
        state, enclave = self.state, self.state.enclave
        async with self._init_lock:
            health = await self._reach_enclave(60 if startup else 5)
            if health.log_size == 0:
                if not startup:
                    await self._forget_unacknowledged()
                plan = await state.writer.resume_plan(
                    max_history_entries=1_000_000, window_start_ms=self._history_start_ms()
                )
                if health.awaiting_key:
                    opened = await unseal_log_key(state, health.origin, first_start=plan is None)
                    log.info("the enclave unsealed its log key %s", opened.log_verifier_key)
                if plan is None:
                    log.info("starting a new log %s", health.origin)
                    started = await enclave.start_log(None)
                else:
                    started = await self._resume(plan)
                await state.persist(started.log)
            else:
                # The enclave kept running while we restarted: persist what it sequenced meanwhile.
                synced = await enclave.sync(state.writer.persisted_size)
                await state.persist(synced.log)
            await self._load_policy()
            await self.refresh_attestation()
            state.health_info = await enclave.health()
            state.witness_state = state.health_info.witness if state.health_info.HasField("witness") else None

    async def _resume(self, plan: ResumePlan) -> pb.StartLogResponse:
        """Stream the stored log's tail to the enclave in chunks (decision 0016), read as sent."""
        m = plan.material
        log.info("resuming the stored log of size %d (history from entry %d)", plan.end, m.range_size)
        start = pb.ResumeFrom(**dataclasses.asdict(m))

        async def chunks() -> AsyncIterator[pb.ResumeChunk]:
            async for first, entries in self.state.writer.resume_chunks(m.range_size, plan.end):
                yield pb.ResumeChunk(first_index=first, entries=entries)

        return await self.state.enclave.resume_log(start, chunks())

    async def _reach_enclave(self, patience_s: float) -> pb.HealthResponse:
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return await self.state.enclave.health(timeout=2)
            except (EnclaveUnavailable, EnclaveRefused) as exc:
                if time.monotonic() > deadline:
                    raise EnclaveUnavailable(f"cannot reach the enclave at {self.state.config.enclave}: {exc}") from exc
                await anyio.sleep(0.2)

    async def _forget_unacknowledged(self) -> None:
        """A new enclave will sequence its own entries at the indexes the dead one left unpersisted.

        Entries the writer holds beyond its durable size (waiting behind a gap, or written without
        a durable checkpoint) were never acknowledged; keeping them would clash with the new
        enclave's. Reopening the storage runs the same recovery as after a relay crash: it truncates
        to the latest durable checkpoint. Calls still waiting on those entries fail, unacknowledged.
        """
        state, config = self.state, self.state.config
        old = state.writer
        durable = old.persisted_size
        await old.close()
        state.writer = await open_storage(
            config.storage,
            s3_endpoint_url=config.s3_endpoint_url,
            body_retention_days=config.body_retention_days,
            verify="tail",
            publish_every=config.publish_every,
            publish_interval_ms=config.publish_interval_ms,
        )
        log.warning(
            "the enclave restarted: storage reopened at its durable size %d (was %d)",
            state.writer.persisted_size,
            durable,
        )

    def _history_start_ms(self) -> int | None:
        # The enclave refuses a bundle whose limit windows reach beyond the history it was given;
        # give it the longest window any bundle may use (31 days) plus the outcome grace.
        return int(time.time() * 1000) - (MAX_LIMIT_WINDOW_S + RESUME_HISTORY_MARGIN_S) * 1000

    async def _load_policy(self) -> None:
        bundle = newest_bundle(self.state.config)
        if bundle is None:
            log.warning("no policy bundle configured: the enclave will refuse every call until one is pushed")
            return
        try:
            resp = await self.state.enclave.load_policy(bundle, self.state.writer.persisted_size)
            await self.state.persist(resp.log)
            log.info("policy bundle version %d (%s) in force", resp.version, resp.bundle_sha256.hex()[:16])
        except EnclaveRefused as exc:
            if exc.code != POLICY_NOT_NEWER:
                raise
            log.info("policy bundle already in force: %s", exc)

    async def refresh_attestation(self) -> None:
        resp = await self.state.enclave.attest(secrets.token_bytes(16))
        self.state.attestation = resp.document
        self.state.attested_at = time.monotonic()

    async def watch_enclave(self) -> None:
        """Notice an enclave restart (no log key yet, fresh grant key, empty log) and bring it back;
        refresh attestation."""
        while True:
            await anyio.sleep(1.0)
            try:
                health = await self.state.enclave.health(timeout=2)
            except (EnclaveUnavailable, EnclaveRefused):
                continue
            known = self.state.health_info
            if known is None or health.log_public_key != known.log_public_key or not health.ready:
                log.warning("the enclave restarted or lost its state; re-initialising it")
                try:
                    await self.ensure_enclave_ready()
                    # A fresh enclave knows no upstream identity yet: prove them all again.
                    self.upstreams.reattest_all()
                except Exception as exc:  # keep watching; calls fail closed meanwhile
                    log.error("re-initialising the enclave failed: %s", exc)
                continue
            self.state.witness_state = health.witness if health.HasField("witness") else None
            if time.monotonic() - self.state.attested_at > self.state.config.attestation_refresh_s:
                try:
                    await self.refresh_attestation()
                except (EnclaveUnavailable, EnclaveRefused) as exc:
                    log.warning("attestation refresh failed: %s", exc)
