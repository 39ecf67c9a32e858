"""The witness's state directory: its key, and per log the latest checkpoint it cosigned.

    <state>/witness.key          PRIVATE+KEY+<name>+<hex key ID>+<base64(0x04 || 32-byte seed)>, mode 0600
    <state>/lock                 flock'd by the one process serving this state
    <state>/checkpoints/<sha256(origin) hex>
                                 the latest cosigned checkpoint note: its text, the log signatures
                                 the witness verified, and the witness's own cosignature

A record is written with write-temp, fsync, rename, fsync-directory before its cosignature is
returned (tlog-witness: "The witness MUST persist the new checkpoint before responding"). On open,
every record of a configured log is parsed and its cosignature checked against the witness's own
key; anything wrong refuses to start rather than forget a size (which would allow a rollback).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from cloister.verify.checkpoint import parse_checkpoint
from cloister.verify.cosignature import ALG_COSIGNATURE_V1, Ed25519Cosigner
from cloister.verify.errors import CloisterError, DecodeError, VerificationError
from cloister.verify.note import b64decode_strict, check_key_name, parse_note

__all__ = [
    "CHECKPOINTS_DIR",
    "KEY_FILE",
    "LOCK_FILE",
    "Record",
    "WitnessSetupError",
    "WitnessState",
    "decode_private_key",
    "encode_private_key",
    "init_state",
    "load_key",
    "origin_hash",
    "write_atomic",
]

KEY_FILE = "witness.key"
LOCK_FILE = "lock"
CHECKPOINTS_DIR = "checkpoints"
_MAX_RECORD = 1 << 20


class WitnessSetupError(CloisterError):
    """The witness cannot start or be initialised: bad state directory, key or configuration."""


def origin_hash(origin: str) -> str:
    """tlog-witness §Monitor Retrieval: SHA-256 of the origin, lowercase hex (also the record name)."""
    return hashlib.sha256(origin.encode("utf-8")).hexdigest()


def encode_private_key(cosigner_name: str, key: Ed25519PrivateKey) -> str:
    """The key file's one line: `PRIVATE+KEY+<name>+<hex key ID>+<base64(0x04 || seed)>`."""
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    key_id = Ed25519Cosigner(cosigner_name, key).key_id
    blob = base64.b64encode(bytes([ALG_COSIGNATURE_V1]) + seed).decode("ascii")
    return f"PRIVATE+KEY+{cosigner_name}+{key_id:08x}+{blob}\n"


def decode_private_key(line: str) -> Ed25519Cosigner:
    """Parse the key file's line back into a cosigner; DecodeError if it is not one."""
    parts = line.strip("\n").split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise DecodeError("witness key is not 'PRIVATE+KEY+<name>+<key id>+<base64 key>'")
    name, hex_id, b64 = parts[2:]
    check_key_name(name, "witness key name")
    raw = b64decode_strict(b64, "witness key")
    if len(raw) != 33 or raw[0] != ALG_COSIGNATURE_V1:
        raise DecodeError("witness key is not 0x04 followed by a 32-byte Ed25519 seed")
    cosigner = Ed25519Cosigner(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
    if f"{cosigner.key_id:08x}" != hex_id:
        raise DecodeError(f"witness key ID {hex_id[:20]!r} does not match its key ({cosigner.key_id:08x})")
    return cosigner


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> None:
    """Write `data` to `path` durably: a temporary file, fsync, rename (or link if exclusive), fsync the directory.

    With exclusive=True an existing `path` is never replaced (FileExistsError).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            path.hardlink_to(tmp)
        else:
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def init_state(directory: Path, name: str, key: Ed25519PrivateKey | None = None) -> Ed25519Cosigner:
    """Create a state directory with a new cosigning key (or `key`); refuse one that has a key."""
    check_key_name(name, "witness name")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = key or Ed25519PrivateKey.generate()
    line = encode_private_key(name, key)
    try:
        write_atomic(directory / KEY_FILE, line.encode("ascii"), mode=0o600, exclusive=True)
    except FileExistsError as e:
        raise WitnessSetupError(f"{directory / KEY_FILE} exists: this state directory is initialised") from e
    (directory / CHECKPOINTS_DIR).mkdir(mode=0o700, exist_ok=True)
    return decode_private_key(line)


def load_key(directory: Path) -> Ed25519Cosigner:
    """The witness's cosigning key from its state directory (refused if others can read it)."""
    key_path = directory / KEY_FILE
    if not key_path.is_file():
        raise WitnessSetupError(f"{key_path} does not exist: run `cloister witness init` first")
    if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
        raise WitnessSetupError(f"{key_path} is readable by others: chmod 600 it")
    try:
        return decode_private_key(key_path.read_text("ascii"))
    except (DecodeError, UnicodeDecodeError) as e:
        raise WitnessSetupError(f"{key_path}: {e}") from e


@dataclass(frozen=True)
class Record:
    """The latest checkpoint cosigned for one origin, and the note served to monitors."""

    origin: str
    size: int
    root_hash: bytes
    timestamp: int
    note: bytes


class WitnessState:
    """An open state directory, held exclusively by this process until close()."""

    def __init__(self, directory: Path, cosigner: Ed25519Cosigner, lock_fd: int) -> None:
        self._dir = directory
        self._cosigner = cosigner
        self._lock_fd = lock_fd
        self._records: dict[str, Record] = {}

    @classmethod
    def open(cls, directory: Path, origins: Iterable[str]) -> WitnessState:
        """Lock the directory, load the key and the records of `origins` (the configured logs)."""
        cosigner = load_key(directory)
        (directory / CHECKPOINTS_DIR).mkdir(mode=0o700, exist_ok=True)
        lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(lock_fd)
            raise WitnessSetupError(f"{directory} is in use by another witness process") from e
        state = cls(directory, cosigner, lock_fd)
        try:
            for origin in origins:
                state._load(origin)
        except BaseException:
            state.close()
            raise
        return state

    @property
    def cosigner(self) -> Ed25519Cosigner:
        return self._cosigner

    def _path(self, origin: str) -> Path:
        return self._dir / CHECKPOINTS_DIR / origin_hash(origin)

    def _load(self, origin: str) -> None:
        path = self._path(origin)
        if not path.exists():
            return
        data = path.read_bytes()
        try:
            self._records[origin] = self._check_record(origin, data)
        except (DecodeError, VerificationError) as e:
            raise WitnessSetupError(f"{path} (the record of {origin!r}) is damaged: {e}") from e

    def _check_record(self, origin: str, data: bytes) -> Record:
        if len(data) > _MAX_RECORD:
            raise DecodeError(f"record is {len(data)} bytes")
        note = parse_note(data)
        checkpoint = parse_checkpoint(note.text)
        if checkpoint.origin != origin:
            raise VerificationError(f"record holds a checkpoint of {checkpoint.origin!r}")
        mine = self._cosigner.verifier
        timestamps = [
            mine.verify_timestamped(note.text, s.signature)
            for s in note.signatures
            if (s.name, s.key_id) == (mine.name, mine.key_id)
        ]
        if not timestamps:
            raise VerificationError("record carries no cosignature by this witness")
        return Record(origin, checkpoint.size, checkpoint.root_hash, max(timestamps), data)

    def latest(self, origin: str) -> Record | None:
        return self._records.get(origin)

    def commit(self, record: Record) -> None:
        """Persist `record` durably, then make it the origin's latest (callers hold the origin's lock)."""
        write_atomic(self._path(record.origin), record.note, mode=0o600)
        self._records[record.origin] = record

    def close(self) -> None:
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1
