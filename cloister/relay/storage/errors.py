"""Errors of the parent's log storage.

Every message says what is wrong and where (an object path, a WAL segment and offset, a log
index), because the operator reading it has to decide whether to restore from a backup.
"""

from __future__ import annotations

from cloister.verify.errors import CloisterError

__all__ = [
    "ReorderBufferFull",
    "StorageClosed",
    "StorageCorruption",
    "StorageError",
    "StorageInconsistency",
]


class StorageError(CloisterError):
    """Base of the storage errors."""


class StorageCorruption(StorageError):
    """Stored data is damaged or does not agree with itself (found when opening or reading).

    The storage refuses to open rather than serve or extend a log it cannot reproduce.
    """


class StorageInconsistency(StorageError):
    """The enclave sent log data that contradicts what is stored: an entry received twice with
    different bytes, a checkpoint whose root the entries do not hash to, another origin.

    This is fatal for the writer: either the enclave or the relay is broken (or lying), and no
    acknowledgment may be given on top of it.
    """


class ReorderBufferFull(StorageError):
    """Too many entries arrived ahead of a gap in the log; the relay should fetch the missing
    range from the enclave (SyncLog) before sending more."""


class StorageClosed(StorageError):
    """The writer was closed (or failed) before this request could be made durable."""
