"""The S3 backend against a real S3-compatible server: moto's standalone server, in a subprocess."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from cloister.relay.storage import LogStore, LogWriter, StorageCorruption, StorageError, WriterOptions
from cloister.relay.storage.s3 import S3Backend
from cloister.relay.storage.store import Batch, parse_checkpoint_note
from tests.relay.storage.conftest import FakeLog, entry
from tests.relay.storage.test_tiles_layout import check_layout

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Client:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    return boto3.client("s3", endpoint_url=endpoint)


@pytest.fixture
def bucket(s3: S3Client) -> str:
    name = f"log-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def backend(endpoint: str, bucket: str, **kw: Any) -> S3Backend:
    return S3Backend(bucket, "logs/main", endpoint_url=endpoint, **kw)


def keys(s3: S3Client, bucket: str, prefix: str) -> list[str]:
    resp = s3.list_objects_v2(Bucket=bucket, Prefix=f"logs/main/{prefix}")
    return [o["Key"].removeprefix("logs/main/") for o in resp.get("Contents", [])]


def test_round_trip_layout_and_group_commit(endpoint: str, bucket: str, s3: S3Client) -> None:
    log = FakeLog()
    apps = log.append_many(64, per_append=5)

    async def main() -> None:
        w = await LogWriter.open(backend(endpoint, bucket), WriterOptions(materialize_interval_ms=60_000))
        w.put_body(3, "args", b'{"a":1}')
        await asyncio.gather(*(w.persist(a.first_index, a.entries, a.checkpoint) for a in apps))
        stats = w.store.backend.stats.snapshot()
        assert stats["wal_appends"] <= 4  # 64 acknowledgments, a few PUTs
        assert keys(s3, bucket, "wal/")
        await w.close()

    asyncio.run(main())
    # Materialized on close; the WAL is no longer needed.
    assert keys(s3, bucket, "wal/") == []
    assert "checkpoint" in keys(s3, bucket, "checkpoint")
    store = LogStore.open(backend(endpoint, bucket), verify="full")
    assert store.durable_size == store.published_size == 320
    check_layout(log, store)
    rec = store.get_body_record(3, "args")
    assert rec is not None and rec.data == b'{"a":1}'
    store.close()


def test_crash_recovery_truncates_to_the_durable_checkpoint(endpoint: str, bucket: str) -> None:
    log = FakeLog()
    store = LogStore.open(backend(endpoint, bucket))
    log.add([entry(i) for i in range(10)])
    store.append_batch(Batch(0, log.entries[:10], [parse_checkpoint_note(log.checkpoint())]))
    log.add([entry(i) for i in range(10, 15)])
    store.append_batch(Batch(10, log.entries[10:15]))  # never covered by a checkpoint
    store.backend.close()  # crash

    store = LogStore.open(backend(endpoint, bucket))
    assert (store.written_size, store.durable_size, store.published_size) == (10, 10, 10)
    assert store.read_entries(0, 10) == log.entries[:10]
    store.close()


def test_a_second_writer_is_refused(endpoint: str, bucket: str) -> None:
    log = FakeLog()
    first = LogStore.open(backend(endpoint, bucket))
    second = LogStore.open(backend(endpoint, bucket))
    log.add([entry(0)])
    first.append_batch(Batch(0, log.entries[:1], [parse_checkpoint_note(log.checkpoint())]))
    with pytest.raises(StorageError, match="already exists: another writer is appending to this log"):
        second.append_batch(Batch(0, log.entries[:1], [parse_checkpoint_note(log.checkpoint())]))
    first.close()
    second.close()


def test_tampering_and_corruption_are_refused(endpoint: str, bucket: str, s3: S3Client) -> None:
    log = FakeLog()
    store = LogStore.open(backend(endpoint, bucket))
    log.add([entry(i) for i in range(300)])
    store.append_batch(Batch(0, log.entries, [parse_checkpoint_note(log.checkpoint())]))
    store.materialize()
    log.add([entry(300)])
    store.append_batch(Batch(300, log.entries[300:], [parse_checkpoint_note(log.checkpoint())]))
    store.backend.close()

    wal_key = keys(s3, bucket, "wal/")[-1]
    wal = bytearray(s3.get_object(Bucket=bucket, Key=f"logs/main/{wal_key}")["Body"].read())
    wal[-1] ^= 1  # an S3 object cannot be torn: a bad CRC is corruption
    s3.put_object(Bucket=bucket, Key=f"logs/main/{wal_key}", Body=bytes(wal))
    with pytest.raises(StorageCorruption, match=f"WAL {wal_key} at offset 0: the last frame's CRC does not match"):
        LogStore.open(backend(endpoint, bucket))
    wal[-1] ^= 1
    s3.put_object(Bucket=bucket, Key=f"logs/main/{wal_key}", Body=bytes(wal))

    tile = bytearray(s3.get_object(Bucket=bucket, Key="logs/main/tile/0/000")["Body"].read())
    tile[0] ^= 1
    s3.put_object(Bucket=bucket, Key="logs/main/tile/0/000", Body=bytes(tile))
    with pytest.raises(StorageCorruption, match=r"s3://.*/logs/main: tile/0/000: hash 0 does not match"):
        LogStore.open(backend(endpoint, bucket), verify="full")
