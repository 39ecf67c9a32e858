"""Reading a log: over HTTP from a relay, or from a storage directory. Nothing here trusts the bytes.

A log is a C2SP tlog-tiles tree (https://c2sp.org/tlog-tiles) under a prefix:

    <prefix>/checkpoint                     the latest published signed checkpoint
    <prefix>/tile/<L>/<N>[.p/<W>]           hash tiles
    <prefix>/tile/entries/<N>[.p/<W>]       entry bundles
    <prefix>/attestation?nonce=<hex>        (relay only) the enclave's attestation for a fresh nonce,
                                            with the checkpoint it vouches for
    <prefix>/body/<index>/<args|result>     (relay only) bodies that entries commit to, for
                                            holders of the relay's auditor token (`bearer`)

`--log` is either an http(s) URL of the prefix (a bare `http://host:port` means the relay's
`/log/`), or a directory with the same layout at its root.

Every read has a size cap chosen by the caller and, over HTTP, a timeout that bounds the whole
request (connect, headers and body), so a silent or trickling server cannot hang an audit.
Failures are classified for the caller (see cloister.audit.errors): MissingData when the object
does not exist (404, no such file), FetchError when the transport failed, DecodeError when the
answer is larger than its cap or not the expected shape.
"""

from __future__ import annotations

import errno
import http.client
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cloister.audit.errors import FetchError, MissingData, NotAuthorized
from cloister.verify.errors import DecodeError
from cloister.verify.note import MAX_NOTE_SIZE, b64decode_strict
from cloister.verify.tiles import (
    MAX_ENTRY_SIZE,
    TILE_WIDTH,
    EntryBundleId,
    HashTileId,
    parse_entry_bundle,
    parse_tile_path,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_ATTESTATION_REPLY",
    "MAX_BODY",
    "MAX_CHECKPOINT",
    "MAX_ENTRY_BUNDLE",
    "MAX_HASH_TILE",
    "AttestationReply",
    "DirSource",
    "HttpSource",
    "LogSource",
    "SourceSpec",
    "open_source",
    "read_tile",
]

DEFAULT_TIMEOUT = 30.0
MAX_CHECKPOINT = MAX_NOTE_SIZE
MAX_HASH_TILE = TILE_WIDTH * 32
MAX_ENTRY_BUNDLE = TILE_WIDTH * (2 + MAX_ENTRY_SIZE)
# {"document": base64 of at most 16 KiB, "nonce": hex, "checkpoint": a note of at most 1 MiB}.
MAX_ATTESTATION_REPLY = MAX_NOTE_SIZE + 64 * 1024
MAX_BODY = 16 << 20
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class SourceSpec:
    """Where a log lives; picklable, so that replay workers can open their own connection."""

    location: str
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_url(self) -> bool:
        return self.location.startswith(("http://", "https://"))


@dataclass(frozen=True)
class AttestationReply:
    """`GET <prefix>/attestation?nonce=` as served; unverified."""

    document: bytes
    nonce: bytes
    checkpoint: bytes


class LogSource(Protocol):
    spec: SourceSpec
    # How many reads are worth running at once (network latency vs. a local disk).
    parallelism: int

    def read(self, path: str, *, max_size: int) -> bytes:
        """The object at `path` under the prefix. MissingData, FetchError, or DecodeError if too large."""
        ...

    def attestation(self, nonce: bytes) -> AttestationReply:
        """The enclave's attestation for `nonce` with the checkpoint it binds (relay only)."""
        ...

    def where(self, path: str) -> str:
        """The full URL or file name of `path`, for messages."""
        ...


def open_source(spec: SourceSpec) -> LogSource:
    """An HttpSource for http(s) URLs, else a DirSource. ValueError for an unusable location."""
    if spec.is_url:
        return HttpSource(spec)
    if "://" in spec.location:
        raise ValueError(f"--log {spec.location!r}: only http:// and https:// URLs or directories are supported")
    return DirSource(spec)


def _check_rel_path(path: str) -> None:
    # Paths are built by this package (tile paths, "checkpoint"); refuse anything that could escape.
    if not path or path.startswith("/") or ".." in path.split("/") or "\\" in path:
        raise ValueError(f"not a relative log path: {path!r}")


class HttpSource:
    """A relay's `/log/` over HTTP(S), with a whole-request deadline and size caps."""

    parallelism = 8

    def __init__(self, spec: SourceSpec) -> None:
        if spec.timeout <= 0:
            raise ValueError("the timeout must be positive")
        parts = urllib.parse.urlsplit(spec.location)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--log {spec.location!r} is not an http(s) URL")
        path = parts.path
        if path in ("", "/"):
            path = "/log/"  # a bare relay address: its log lives under /log/
        if not path.endswith("/"):
            path += "/"
        self.spec = spec
        self.base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self._opener = urllib.request.OpenerDirector()
        for handler in (
            urllib.request.ProxyHandler(),
            urllib.request.HTTPHandler(),
            urllib.request.HTTPSHandler(),
            _HttpOnlyRedirects(),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
        ):
            self._opener.add_handler(handler)

    def where(self, path: str) -> str:
        return self.base + path

    def read(self, path: str, *, max_size: int, bearer: str | None = None) -> bytes:
        """As LogSource.read; `bearer` is sent as `Authorization: Bearer` (the auditor token for bodies)."""
        _check_rel_path(path)
        return self._get(self.base + path, max_size, path, bearer)

    def attestation(self, nonce: bytes) -> AttestationReply:
        data = self._get(f"{self.base}attestation?nonce={nonce.hex()}", MAX_ATTESTATION_REPLY, "attestation")
        return parse_attestation_reply(data)

    def _get(self, url: str, max_size: int, what: str, bearer: str | None = None) -> bytes:
        timeout = self.spec.timeout
        deadline = time.monotonic() + timeout
        # The scheme is http(s): checked in __init__, and the opener has no file or ftp handler.
        # tlog-tiles: entry bundles SHOULD be compressed at the HTTP layer, and clients SHOULD accept gzip.
        headers = {"User-Agent": "cloister-audit/1", "Accept-Encoding": "gzip, identity"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        request = urllib.request.Request(url, headers=headers)  # noqa: S310
        try:
            with self._opener.open(request, timeout=timeout) as resp:
                encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
                if encoding not in ("identity", "gzip"):
                    raise DecodeError(f"{what}: unsupported Content-Encoding {encoding[:40]!r}")
                # The cap applies to the decompressed bytes; a gzip stream is at most ~1000x smaller.
                length = resp.headers.get("Content-Length")
                if (
                    encoding == "identity"
                    and length is not None
                    and length.strip().isdigit()
                    and int(length) > max_size
                ):
                    raise DecodeError(
                        f"{what}: the server announces {int(length)} bytes, more than the cap of {max_size}"
                    )
                inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
                chunks: list[bytes] = []
                total = 0
                while True:
                    if time.monotonic() > deadline:
                        raise FetchError(f"GET {url}: no complete answer within {timeout:g}s")
                    # read1 returns what has arrived, so the deadline is checked while a server trickles.
                    chunk = resp.read1(_READ_CHUNK)
                    if not chunk:
                        break
                    if inflate is not None:
                        chunk = _inflate(inflate, chunk, max_size - total, what, max_size)
                    total += len(chunk)
                    if total > max_size:
                        raise DecodeError(f"{what}: the answer is more than the cap of {max_size} bytes")
                    chunks.append(chunk)
                if resp.length:  # http.client counts down the announced Content-Length
                    raise FetchError(f"GET {url}: the connection closed {resp.length} bytes before the end")
                if inflate is not None and not inflate.eof:
                    raise DecodeError(f"{what}: the gzip stream is truncated")
                return b"".join(chunks)
        except urllib.error.HTTPError as exc:
            raise _http_error(exc, url, what) from exc
        except urllib.error.URLError as exc:
            raise FetchError(f"GET {url}: {_reason(exc.reason)}") from exc
        except (TimeoutError, http.client.HTTPException, OSError) as exc:
            raise FetchError(f"GET {url}: {_reason(exc)}") from exc


def _http_error(exc: urllib.error.HTTPError, url: str, what: str) -> FetchError | MissingData:
    if exc.code in (404, 410):
        return MissingData(f"{what}: not found (HTTP {exc.code} from {url})")
    if exc.code in (401, 403):
        return NotAuthorized(f"GET {url}: HTTP {exc.code} {exc.reason}{_error_snippet(exc)}")
    return FetchError(f"GET {url}: HTTP {exc.code} {exc.reason}{_error_snippet(exc)}")


def _inflate(inflate: zlib._Decompress, chunk: bytes, room: int, what: str, cap: int) -> bytes:
    """Decompress one chunk, never producing more than `room` + 1 bytes (a gzip bomb stops at the cap)."""
    try:
        out = inflate.decompress(chunk, room + 1)
    except zlib.error as exc:
        raise DecodeError(f"{what}: the gzip stream is corrupt: {exc}") from exc
    if len(out) > room or inflate.unconsumed_tail:
        raise DecodeError(f"{what}: the answer is more than the cap of {cap} bytes (after gzip decompression)")
    return out


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s), never to ftp or a file."""

    max_redirections = 5

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        target = urllib.parse.urlsplit(newurl)
        if target.scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-HTTP URL refused", headers, fp)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        here = urllib.parse.urlsplit(req.full_url)
        if new is not None and (target.scheme, target.netloc) != (here.scheme, here.netloc):
            new.remove_header("Authorization")  # the auditor token goes to the relay it was meant for only
        return new


def _reason(exc: object) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) or type(exc).__name__
    return text[:300]


def _error_snippet(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read(300)
    except Exception:  # the error body is only decoration; any failure leaves it out
        return ""
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return f": {text[:200]}" if text else ""


class DirSource:
    """A storage directory in the tlog-tiles layout (`<dir>/checkpoint`, `<dir>/tile/...`)."""

    parallelism = 1

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.root = Path(spec.location)
        if not self.root.is_dir():
            raise ValueError(f"--log {spec.location!r} is neither an http(s) URL nor a directory")

    def where(self, path: str) -> str:
        return str(self.root / path)

    def read(self, path: str, *, max_size: int) -> bytes:
        _check_rel_path(path)
        file = self.root / path
        try:
            # O_NONBLOCK: a FIFO planted in the storage must not block the audit forever.
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if stat.S_ISDIR(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, "is a directory")
                if not stat.S_ISREG(st.st_mode):
                    raise DecodeError(f"{path}: {file} is not a regular file")
                if st.st_size > max_size:
                    raise DecodeError(f"{path}: the file is {st.st_size} bytes, more than the cap of {max_size}")
                data = f.read(max_size + 1)
        except FileNotFoundError as exc:
            raise MissingData(f"{path}: not found ({file})") from exc
        except NotADirectoryError as exc:
            raise MissingData(f"{path}: not found ({file})") from exc
        except IsADirectoryError as exc:
            raise DecodeError(f"{path}: {file} is a directory, not a file") from exc
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise MissingData(f"{path}: not found ({file})") from exc
            raise FetchError(f"cannot read {file}: {exc.strerror or exc}") from exc
        if len(data) > max_size:
            raise DecodeError(f"{path}: the file is more than the cap of {max_size} bytes")
        return data

    def attestation(self, nonce: bytes) -> AttestationReply:
        raise FetchError(
            f"{self.root} is a storage directory: it cannot attest a checkpoint; use the relay's URL, or "
            "`cloister audit replay` (which trusts the log keys by their key entries)"
        )


def parse_attestation_reply(data: bytes) -> AttestationReply:
    """`{"document": base64, "nonce": hex, "checkpoint": text}`, strictly; nothing is verified here."""
    from cloister.verify.canonical import parse_json

    body = parse_json(data, what="attestation reply", max_bytes=MAX_ATTESTATION_REPLY)
    if not isinstance(body, dict):
        raise DecodeError("attestation reply is not a JSON object")
    document, nonce, checkpoint = body.get("document"), body.get("nonce"), body.get("checkpoint")
    if not isinstance(document, str) or not document:
        raise DecodeError("attestation reply has no 'document' (base64 text)")
    if not isinstance(nonce, str):
        raise DecodeError("attestation reply has no 'nonce' (hex text)")
    if not isinstance(checkpoint, str) or not checkpoint:
        raise DecodeError("attestation reply has no 'checkpoint' (the signed note it binds)")
    try:
        nonce_bytes = bytes.fromhex(nonce)
    except ValueError as exc:
        raise DecodeError("attestation reply 'nonce' is not hex") from exc
    return AttestationReply(
        document=b64decode_strict(document, "attestation reply 'document'"),
        nonce=nonce_bytes,
        checkpoint=checkpoint.encode("utf-8"),
    )


def read_tile(source: LogSource, path: str, max_size: int) -> bytes:
    """A tile or bundle; a missing partial one is cut from its full tile (tlog-tiles, Partial Tiles).

    Logs MAY delete a partial tile once the full tile exists, and clients MAY fall back to the full
    tile: its first W hashes (or entries) are the partial tile of width W.
    """
    try:
        return source.read(path, max_size=max_size)
    except MissingData as missing:
        tile = parse_tile_path(path)
        if not tile.is_partial:
            raise
        full_path = (
            EntryBundleId(tile.index) if isinstance(tile, EntryBundleId) else HashTileId(tile.level, tile.index)
        ).path()
        try:
            full = source.read(full_path, max_size=max_size)
        except MissingData:
            raise missing from None
    if isinstance(tile, HashTileId):
        if len(full) != TILE_WIDTH * 32:
            raise DecodeError(f"{full_path} (read for {path}): {len(full)} bytes, a full tile is {TILE_WIDTH * 32}")
        return full[: tile.width * 32]
    try:
        entries = parse_entry_bundle(full, TILE_WIDTH)
    except DecodeError as exc:
        raise DecodeError(f"{full_path} (read for {path}): {exc}") from exc
    return full[: sum(2 + len(e) for e in entries[: tile.width])]
