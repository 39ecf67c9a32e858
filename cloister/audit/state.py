"""The checkpoints an auditor remembers, one per log origin, to detect forks.

A log that shows one auditor a tree and another auditor (or the same one, later) a tree that
does not extend it has forked: both views are signed, so at least one is a lie. Remembering the
last verified checkpoint per origin and proving every new one consistent with it is what turns
"each checkpoint is signed" into "the log is append-only as far as I have seen".

Layout under the state directory (`--state`, default `$CLOISTER_STATE/audit`, else
`.cloister/audit`):

    checkpoints/<sha256(origin)[:32]>.json   {"origin", "size", "root" (base64), "log_key" (hex),
                                              "note" (the signed note), "seen_at" (ISO 8601)}
    forks/<sha256(origin)[:16]>-<time>/      remembered.note, served.note and README.txt

The state is the auditor's own disk, but it is still re-checked on load (the note must verify
with the remembered key and match the remembered size and root), so a corrupt file is reported
rather than silently trusted or silently replaced.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cloister.audit.errors import ForkEvidence
from cloister.verify.checkpoint import verify_checkpoint
from cloister.verify.errors import DecodeError, VerificationError
from cloister.verify.note import Ed25519NoteVerifier

__all__ = ["CheckpointStore", "RememberedCheckpoint", "default_state_dir"]

MAX_STATE_FILE = 4 << 20


def default_state_dir() -> Path:
    from cloister.audit.trustroot import state_dir

    return state_dir() / "audit"


@dataclass(frozen=True)
class RememberedCheckpoint:
    origin: str
    size: int
    root: bytes
    log_key: bytes  # raw Ed25519 public key that signed `note`
    note: bytes
    seen_at: str


def _origin_id(origin: str) -> str:
    return hashlib.sha256(origin.encode("utf-8")).hexdigest()


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _file(self, origin: str) -> Path:
        return self.root / "checkpoints" / f"{_origin_id(origin)[:32]}.json"

    def load(self, origin: str) -> RememberedCheckpoint | None:
        """The remembered checkpoint for `origin`, re-verified; None if there is none."""
        path = self._file(origin)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_STATE_FILE + 1)
        except FileNotFoundError:
            return None
        # Other OSErrors (permissions, a file where the directory should be) are the caller's to report.
        try:
            return self._parse(data, origin)
        except (DecodeError, VerificationError, ValueError, KeyError, TypeError) as exc:
            raise DecodeError(
                f"the remembered checkpoint {path} is corrupt ({exc}); inspect it, and delete it only if you "
                "know why it changed"
            ) from exc

    @staticmethod
    def _parse(data: bytes, origin: str) -> RememberedCheckpoint:
        if len(data) > MAX_STATE_FILE:
            raise DecodeError(f"more than {MAX_STATE_FILE} bytes")
        m = json.loads(data)
        if not isinstance(m, dict) or m.get("origin") != origin:
            raise DecodeError(f"it is not a remembered checkpoint for {origin!r}")
        log_key = bytes.fromhex(m["log_key"])
        note = m["note"].encode("utf-8")
        verifier = Ed25519NoteVerifier.from_vkey(_vkey(origin, log_key))
        cp = verify_checkpoint(note, [verifier], origin=origin).checkpoint
        if cp.size != m["size"] or base64.b64encode(cp.root_hash).decode() != m["root"]:
            raise DecodeError("its size or root differ from its own signed note")
        return RememberedCheckpoint(
            origin=origin,
            size=cp.size,
            root=cp.root_hash,
            log_key=log_key,
            note=note,
            seen_at=str(m.get("seen_at", "")),
        )

    def remember(self, *, origin: str, size: int, root: bytes, log_key: bytes, note: bytes, now: datetime) -> Path:
        """Replace the remembered checkpoint for `origin` (the caller has proven consistency)."""
        record = {
            "origin": origin,
            "size": size,
            "root": base64.b64encode(root).decode("ascii"),
            "log_key": log_key.hex(),
            "note": note.decode("utf-8"),
            "seen_at": now.isoformat(timespec="seconds"),
        }
        path = self._file(origin)
        _write_atomic(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8"))
        return path

    def save_fork(self, evidence: ForkEvidence, now: datetime) -> Path:
        """Keep both signed checkpoints of a fork: they are the evidence to show to others."""
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        folder = self.root / "forks" / f"{_origin_id(evidence.origin)[:16]}-{stamp}"
        folder.mkdir(parents=True, exist_ok=True)
        if evidence.old_note:
            _write_atomic(folder / "remembered.note", evidence.old_note)
        if evidence.new_note:
            _write_atomic(folder / "served.note", evidence.new_note)
        readme = (
            f"Fork of log {evidence.origin!r} detected at {now.isoformat(timespec='seconds')}.\n"
            f"{evidence.reason}\n"
            f"remembered: size {evidence.old_size} root {base64.b64encode(evidence.old_root).decode()}\n"
            f"served:     size {evidence.new_size} root {base64.b64encode(evidence.new_root).decode()}\n"
            "Both notes are signed by keys that attested enclaves bound; each verifies on its own with\n"
            "`cloister audit verify-note --key <vkey> <file>`.\n"
        )
        _write_atomic(folder / "README.txt", readme.encode("utf-8"))
        return folder


def _vkey(origin: str, log_key: bytes) -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519NoteVerifier(origin, Ed25519PublicKey.from_public_bytes(log_key)).vkey


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
