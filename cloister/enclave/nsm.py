"""The Nitro Secure Module (NSM): its interface, and the client for the real `/dev/nsm`.

The device has one ioctl, `NSM_IOCTL_RAW = _IOWR(0x0A, 0, struct nsm_raw)` where
`struct nsm_raw { struct nsm_iovec request; struct nsm_iovec response; }` and
`struct nsm_iovec { __u64 addr; __u64 len; }` (include/uapi/linux/nsm.h): 32 bytes, so the request
number is 0xC0200A00 on x86_64 and aarch64 (asm-generic ioctl layout). The request is a CBOR value
of at most 0x1000 bytes, the response a CBOR value of at most 0x3000 bytes (NSM_REQUEST_MAX_SIZE
and NSM_RESPONSE_MAX_SIZE in the kernel header and in aws-nitro-enclaves-nsm-api). The encodings
follow that API's serde enums: unit requests are text (`"DescribeNSM"`, `"GetRandom"`), the others
one-entry maps (`{"Attestation": {"user_data": ..., "nonce": ..., "public_key": ...}}`), and a
refusal comes back as `{"Error": "<ErrorCode>"}`.

Permission. No Linux capability is needed to open or use /dev/nsm. The upstream driver
(drivers/misc/nsm.c, Linux 6.8+) registers the misc device with mode 0666 and its ioctl handler
makes no capable() check; the earlier driver AWS posted for review did the same. The comment
"Raw NSM message. Only available with CAP_SYS_ADMIN." in include/uapi/linux/nsm.h is not enforced
by the driver code. What is needed is read/write access to the node (opened O_RDWR like the
official library) and, in a container, the device passed in (`--device /dev/nsm`) so that the
device cgroup allows it. Confidence: high for the driver source as read (torvalds/linux and the
v1 patch posting); not checked on hardware, where an enclave image could still tighten the node's
mode from its init.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol

import cbor2

from cloister.verify.cose import cbor_type_name, decode_cbor
from cloister.verify.errors import CloisterError, DecodeError

NSM_DEVICE: Final = "/dev/nsm"
NSM_IOCTL_MAGIC: Final = 0x0A
NSM_REQUEST_MAX_SIZE: Final = 0x1000
NSM_RESPONSE_MAX_SIZE: Final = 0x3000
MAX_BOUND_FIELD: Final = 1024  # user_data, nonce, public_key
MAX_PCR_INDEX: Final = 0xFFFF  # the API's PCR index is a u16
MAX_RANDOM: Final = 1 << 20  # per get_random call; the device returns a few hundred bytes at a time

# Linux include/uapi/asm-generic/ioctl.h (x86_64 and aarch64 use this layout).
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = 8
_IOC_SIZESHIFT: Final = 16
_IOC_DIRSHIFT: Final = 30
_IOC_SIZEMASK: Final = (1 << 14) - 1
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """The _IOC(dir, type, nr, size) macro."""
    if not 0 <= size <= _IOC_SIZEMASK:
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


# struct nsm_raw: two nsm_iovec of two __u64 each, native byte order, no padding.
NSM_MESSAGE: Final = struct.Struct("=QQQQ")
NSM_IOCTL_RAW: Final = ioc(_IOC_READ | _IOC_WRITE, NSM_IOCTL_MAGIC, 0, NSM_MESSAGE.size)


class NsmError(CloisterError):
    """The NSM refused a request, or the device could not be used.

    `code` is the NSM API ErrorCode name ("InvalidArgument", "InvalidIndex", "ReadOnlyIndex",
    "InvalidOperation", "BufferTooSmall", "InputTooLarge", "InternalError", "InvalidResponse").
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"NSM {code}: {message}")
        self.code = code


class NsmResponseError(DecodeError):
    """The device answered bytes that are not the expected CBOR response."""


@dataclass(frozen=True)
class NsmDescription:
    """DescribeNSM: the module's identity and PCR bank."""

    version: tuple[int, int, int]
    module_id: str
    max_pcrs: int
    locked_pcrs: frozenset[int]
    digest: str


class Nsm(Protocol):
    """What the enclave needs from a Nitro Secure Module (real or mock)."""

    def attestation(
        self, *, user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        """A signed attestation document (untagged COSE_Sign1 bytes) binding the given fields."""
        ...

    def describe_pcr(self, index: int) -> bytes:
        """The current value of PCR `index`."""
        ...

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """PCR[index] = H(PCR[index] || data); returns the new value."""
        ...

    def lock_pcr(self, index: int) -> None:
        """Make PCR `index` read-only until the enclave stops."""
        ...

    def get_random(self, n: int) -> bytes:
        """`n` bytes from the NSM's entropy source."""
        ...

    def describe(self) -> NsmDescription: ...


def check_bound_fields(**fields: bytes | None) -> None:
    """The NSM accepts at most 1024 bytes in each of user_data, nonce and public_key."""
    for name, value in fields.items():
        if value is not None and len(value) > MAX_BOUND_FIELD:
            raise NsmError("InputTooLarge", f"{name} is {len(value)} bytes, the NSM accepts at most {MAX_BOUND_FIELD}")


def check_pcr_index(index: int) -> None:
    if not 0 <= index <= MAX_PCR_INDEX:
        raise NsmError("InvalidIndex", f"PCR index {index} is not a u16")


def check_random_size(n: int) -> None:
    if not 0 <= n <= MAX_RANDOM:
        raise ValueError(f"get_random: {n} bytes requested, at most {MAX_RANDOM} per call")


def encode_request(request: str | dict[str, dict[str, Any]]) -> bytes:
    """CBOR of one NSM API request, as serde encodes the Rust `Request` enum."""
    data = cbor2.dumps(request)
    if len(data) > NSM_REQUEST_MAX_SIZE:
        raise NsmError("InputTooLarge", f"request is {len(data)} bytes, the NSM accepts at most {NSM_REQUEST_MAX_SIZE}")
    return data


def decode_response(data: bytes, expected: str) -> Any:
    """Decode a response to a request named `expected`; returns its body (None for unit responses)."""
    if len(data) > NSM_RESPONSE_MAX_SIZE:
        raise NsmResponseError(f"NSM response is {len(data)} bytes, more than {NSM_RESPONSE_MAX_SIZE}")
    try:
        item = decode_cbor(data, what="NSM response")
    except DecodeError as exc:
        raise NsmResponseError(str(exc)) from exc
    if isinstance(item, str):
        name, body = item, None
    elif isinstance(item, dict) and len(item) == 1:
        [(name, body)] = item.items()
    else:
        raise NsmResponseError(f"NSM response is a {cbor_type_name(item)}, not a response variant")
    if name == "Error":
        code = body if isinstance(body, str) else "InvalidResponse"
        raise NsmError(code, f"the NSM refused the {expected} request")
    if name != expected:
        raise NsmResponseError(f"expected a {expected} response, got {name!r}")
    return body


def _field(body: Any, key: str, kind: type[Any], expected: str) -> Any:
    if not isinstance(body, dict) or key not in body:
        raise NsmResponseError(f"{expected} response lacks {key!r}")
    value = body[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise NsmResponseError(f"{expected} response field {key!r} is a {cbor_type_name(value)}")
    return value


IoctlFn = Callable[[int, int, bytearray], int]
"""ioctl(fd, request, arg): the kernel reads and writes `arg` in place (fcntl.ioctl with mutate)."""


def _fcntl_ioctl(fd: int, request: int, arg: bytearray) -> int:
    result: int = fcntl.ioctl(fd, request, arg, True)
    return result


class DevNsm:
    """The real NSM, through /dev/nsm. Each call allocates its own buffers."""

    def __init__(self, fd: int, *, ioctl: IoctlFn = _fcntl_ioctl, owns_fd: bool = False) -> None:
        self._fd = fd
        self._ioctl = ioctl
        self._owns_fd = owns_fd

    @classmethod
    def open(cls, path: str = NSM_DEVICE, *, ioctl: IoctlFn = _fcntl_ioctl) -> DevNsm:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NsmError("InternalError", f"cannot open {path}: {exc.strerror}") from exc
        return cls(fd, ioctl=ioctl, owns_fd=True)

    def close(self) -> None:
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> DevNsm:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def call(self, request: str | dict[str, dict[str, Any]], expected: str) -> Any:
        """Send one request through the ioctl and return the decoded response body."""
        req = encode_request(request)
        req_buf = ctypes.create_string_buffer(req, len(req))
        resp_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
        resp_addr = ctypes.addressof(resp_buf)
        msg = bytearray(NSM_MESSAGE.pack(ctypes.addressof(req_buf), len(req), resp_addr, NSM_RESPONSE_MAX_SIZE))
        try:
            self._ioctl(self._fd, NSM_IOCTL_RAW, msg)
        except OSError as exc:
            # The official library maps EMSGSIZE to InputTooLarge and anything else to InternalError.
            code = "InputTooLarge" if exc.errno == errno.EMSGSIZE else "InternalError"
            raise NsmError(code, f"ioctl on the NSM device failed: {exc.strerror or exc}") from exc
        _, _, got_addr, resp_len = NSM_MESSAGE.unpack(msg)
        if got_addr != resp_addr or resp_len > NSM_RESPONSE_MAX_SIZE:
            raise NsmResponseError(f"the device reported a response of {resp_len} bytes, beyond the buffer")
        return decode_response(ctypes.string_at(resp_addr, resp_len), expected)

    def attestation(
        self, *, user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        check_bound_fields(user_data=user_data, nonce=nonce, public_key=public_key)
        # Field order as in the API's Request::Attestation: user_data, nonce, public_key.
        body = {"user_data": user_data, "nonce": nonce, "public_key": public_key}
        resp = self.call({"Attestation": body}, "Attestation")
        document: bytes = _field(resp, "document", bytes, "Attestation")
        return document

    def describe_pcr(self, index: int) -> bytes:
        check_pcr_index(index)
        resp = self.call({"DescribePCR": {"index": index}}, "DescribePCR")
        _field(resp, "lock", bool, "DescribePCR")
        data: bytes = _field(resp, "data", bytes, "DescribePCR")
        return data

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        check_pcr_index(index)
        resp = self.call({"ExtendPCR": {"index": index, "data": data}}, "ExtendPCR")
        value: bytes = _field(resp, "data", bytes, "ExtendPCR")
        return value

    def lock_pcr(self, index: int) -> None:
        check_pcr_index(index)
        self.call({"LockPCR": {"index": index}}, "LockPCR")

    def get_random(self, n: int) -> bytes:
        check_random_size(n)
        out = bytearray()
        while len(out) < n:
            chunk: bytes = _field(self.call("GetRandom", "GetRandom"), "random", bytes, "GetRandom")
            if not chunk:
                raise NsmResponseError("GetRandom returned no bytes")
            out += chunk
        return bytes(out[:n])

    def describe(self) -> NsmDescription:
        resp = self.call("DescribeNSM", "DescribeNSM")
        locked = _field(resp, "locked_pcrs", list, "DescribeNSM")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in locked):
            raise NsmResponseError("DescribeNSM response field 'locked_pcrs' holds non-integers")
        return NsmDescription(
            version=(
                _field(resp, "version_major", int, "DescribeNSM"),
                _field(resp, "version_minor", int, "DescribeNSM"),
                _field(resp, "version_patch", int, "DescribeNSM"),
            ),
            module_id=_field(resp, "module_id", str, "DescribeNSM"),
            max_pcrs=_field(resp, "max_pcrs", int, "DescribeNSM"),
            locked_pcrs=frozenset(locked),
            digest=_field(resp, "digest", str, "DescribeNSM"),
        )
