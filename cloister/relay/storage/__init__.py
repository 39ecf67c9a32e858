"""The parent's durable log storage: C2SP tlog-tiles layout, a write-ahead log for the tail.

- `LogWriter` (writer.py): the asyncio API the relay calls (persist, proofs, bodies, resume).
- `LogStore` (store.py): the synchronous, thread-safe store underneath.
- Backends: `LocalBackend` (a directory, the default) and `S3Backend` (boto3).

See docs/decisions/0003-storage-durability.md for the durability design and crash cases.
"""

from cloister.relay.storage.base import Backend, BackendStats
from cloister.relay.storage.bodies import BodyKind, BodyRecord
from cloister.relay.storage.errors import (
    ReorderBufferFull,
    StorageClosed,
    StorageCorruption,
    StorageError,
    StorageInconsistency,
)
from cloister.relay.storage.local import LocalBackend
from cloister.relay.storage.resume import ResumeMaterial
from cloister.relay.storage.store import LogStore
from cloister.relay.storage.writer import LogWriter, WriterOptions

__all__ = [
    "Backend",
    "BackendStats",
    "BodyKind",
    "BodyRecord",
    "LocalBackend",
    "LogStore",
    "LogWriter",
    "ReorderBufferFull",
    "ResumeMaterial",
    "StorageClosed",
    "StorageCorruption",
    "StorageError",
    "StorageInconsistency",
    "WriterOptions",
]


def __getattr__(name: str) -> object:
    # boto3 is imported only when the S3 backend is asked for.
    if name == "S3Backend":
        from cloister.relay.storage.s3 import S3Backend

        return S3Backend
    raise AttributeError(name)
