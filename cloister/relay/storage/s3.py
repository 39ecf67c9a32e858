"""S3 backend (boto3): objects under `<prefix>/`, one WAL object per group commit.

A PUT is atomic and durable when S3 answers it, so a WAL frame is one object
`<prefix>/wal/<seq, 20 digits>` and there is never a torn frame. WAL objects are written with
`If-None-Match: *`: if another relay is writing the same log, one of the two gets
PreconditionFailed instead of silently overwriting the other's frame. Listing is strongly
consistent on S3 (since December 2020), so recovery sees every acknowledged frame.

Tiles, bundles and bodies are PUT in parallel (`max_workers`) before the checkpoint that needs
them. Make only `<prefix>/checkpoint` and `<prefix>/tile/` public if serving the log statically:
bodies and the WAL live under the same prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from cloister.relay.storage.base import BackendStats, WalChunk, check_object_path
from cloister.relay.storage.errors import StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["S3Backend"]

_WAL_KEY = re.compile(r"[0-9]{20}")


class S3Backend:
    """A log stored in `s3://bucket/prefix` (or any S3-compatible endpoint)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        client: S3Client | None = None,
        max_workers: int = 16,
        conditional_wal_writes: bool = True,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_object_path(self.prefix)
        if client is None:
            config = Config(max_pool_connections=max(10, max_workers), retries={"mode": "standard"})
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region_name, config=config)
        self._s3: S3Client = client
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cloister-s3")
        self._stats = BackendStats()
        self._conditional = conditional_wal_writes
        self._wal_seqs: list[int] = []

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def stats(self) -> BackendStats:
        return self._stats

    @property
    def wal_tail_may_tear(self) -> bool:
        return False

    def _key(self, path: str) -> str:
        check_object_path(path.rstrip("/")) if path.endswith("/") else check_object_path(path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    # --- Objects ---------------------------------------------------------------------------------

    def read(self, path: str) -> bytes | None:
        self._stats.add(object_reads=1)
        try:
            resp = self._s3.get_object(Bucket=self.bucket, Key=self._key(path))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        body: bytes = resp["Body"].read()
        return body

    def _put(self, path: str, data: bytes, **extra: Any) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self._key(path), Body=data, **extra)
        self._stats.add(fsyncs=1)

    def write(self, path: str, data: bytes) -> None:
        self._put(path, data)
        self._stats.add(object_writes=1)

    def write_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if len(items) <= 1:
            for path, data in items:
                self.write(path, data)
            return
        # list() waits for all and re-raises the first failure.
        list(self._pool.map(lambda item: self._put(item[0], item[1]), items))
        self._stats.add(object_writes=len(items))

    def _delete_keys(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            resp = self._s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
            )
            errors = resp.get("Errors", [])
            if errors:
                raise StorageError(f"{self.description}: could not delete {len(errors)} objects, e.g. {errors[0]}")
            self._stats.add(deletes=len(chunk))

    def delete(self, paths: Sequence[str]) -> None:
        self._delete_keys([self._key(p) for p in paths])

    def _list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            for obj in page.get("Contents", []):
                yield obj["Key"], obj["LastModified"].timestamp()

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must end with '/'")
        keys = [k for k, _ in self._list_keys(prefix)]
        if keys:
            self._delete_keys(keys)

    def list_objects(self, prefix: str) -> Iterator[tuple[str, float]]:
        for key, mtime in self._list_keys(prefix if prefix.endswith("/") else prefix + "/"):
            yield self._rel(key), mtime

    # --- WAL -------------------------------------------------------------------------------------

    def wal_load(self) -> list[WalChunk]:
        seqs = []
        for key, _ in self._list_keys("wal/"):
            name = self._rel(key)[len("wal/") :]
            if not _WAL_KEY.fullmatch(name):
                raise StorageError(f"{self.description}: unexpected object wal/{name} in the WAL")
            seqs.append(int(name))
        seqs.sort()
        self._wal_seqs = seqs

        def fetch(seq: int) -> WalChunk:
            data = self.read(f"wal/{seq:020d}")
            if data is None:
                raise StorageError(f"{self.description}: wal/{seq:020d} was listed but cannot be read")
            return WalChunk(f"wal/{seq:020d}", seq, data)

        return list(self._pool.map(fetch, seqs))

    def wal_truncate_tail(self, chunk: WalChunk, valid_length: int) -> None:
        raise StorageError(f"{self.description}: {chunk.name}: S3 objects are never torn; refusing to truncate")

    def wal_append(self, seq: int, frame: bytes) -> None:
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if self._conditional else {}
        try:
            self._put(f"wal/{seq:020d}", frame, **extra)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "PreconditionFailed":
                raise StorageError(
                    f"{self.description}: wal/{seq:020d} already exists: another writer is appending to this log"
                ) from e
            raise
        self._wal_seqs.append(seq)
        self._stats.add(wal_appends=1, wal_bytes=len(frame))

    def wal_drop_before(self, seq: int, next_seq: int) -> None:
        drop = [s for s in self._wal_seqs if s < seq]
        if drop:
            self._delete_keys([self._key(f"wal/{s:020d}") for s in drop])
            self._wal_seqs = [s for s in self._wal_seqs if s >= seq]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
