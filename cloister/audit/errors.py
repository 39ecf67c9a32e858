"""The auditor's error classes, besides the library's DecodeError and VerificationError.

The CLI maps them to exit statuses so that a script can tell the cases apart:

    0  everything verified
    1  bad data: DecodeError, VerificationError, MissingData (the log is wrong or incomplete)
    2  unusable arguments
    3  FetchError: the log could not be read (network, timeout, server error): nothing is known
    4  ForkDetected: two signed views of one log that cannot both be true
"""

from __future__ import annotations

from dataclasses import dataclass

from cloister.verify.errors import CloisterError, VerificationError

__all__ = ["FetchError", "ForkDetected", "ForkEvidence", "MissingData", "NotAuthorized"]


class FetchError(CloisterError):
    """Reading from the log failed (connection, timeout, HTTP 5xx, I/O): nothing about the data."""


class NotAuthorized(FetchError):
    """The relay refused to serve it to us (HTTP 401, 403): bodies need the auditor token."""


class MissingData(VerificationError):
    """The log does not have an object that its signed checkpoint commits to (HTTP 404, no file)."""


@dataclass(frozen=True)
class ForkEvidence:
    """Two checkpoints for one origin; `old` was remembered (or given), `new` was served now."""

    origin: str
    old_size: int
    old_root: bytes
    new_size: int
    new_root: bytes
    reason: str  # what contradicts what
    old_note: bytes = b""
    new_note: bytes = b""


class ForkDetected(VerificationError):
    """The log presented a view inconsistent with one it signed before (a split view or rollback)."""

    def __init__(self, evidence: ForkEvidence, saved_to: str | None = None) -> None:
        import base64

        self.evidence = evidence
        self.saved_to = saved_to
        e = evidence
        lines = [
            f"FORK DETECTED: log {e.origin!r}: {e.reason}",
            f"  remembered: size {e.old_size} root {base64.b64encode(e.old_root).decode()}",
            f"  served:     size {e.new_size} root {base64.b64encode(e.new_root).decode()}",
        ]
        if saved_to:
            lines.append(f"  both signed checkpoints are saved in {saved_to}")
        super().__init__("\n".join(lines))
