"""The /dev/nsm client against a fake device: ioctl number, exact request bytes, response parsing."""

from __future__ import annotations

import ctypes
import errno
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import pytest

from cloister.dev.mock_nsm import MockNsm
from cloister.enclave.nsm import (
    NSM_IOCTL_RAW,
    NSM_MESSAGE,
    NSM_RESPONSE_MAX_SIZE,
    DevNsm,
    Nsm,
    NsmDescription,
    NsmError,
    NsmResponseError,
    ioc,
)
from cloister.verify.attestation import DOCUMENT_TIME, AttestationPolicy, TrustRoot, verify_attestation
from tests.world import EPOCH

FAKE_FD = 1234


@dataclass
class FakeDevice:
    """Plays the kernel: reads the request through the pointers in `struct nsm_raw`, writes the reply."""

    reply: Callable[[bytes], bytes | OSError]
    requests: list[bytes] = field(default_factory=list)
    report_len: int | None = None  # lie about the response length
    buffer_sizes: list[int] = field(default_factory=list)

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        assert fd == FAKE_FD
        assert request == NSM_IOCTL_RAW
        assert len(arg) == 32
        req_addr, req_len, resp_addr, resp_cap = NSM_MESSAGE.unpack(arg)
        self.buffer_sizes.append(resp_cap)
        req = ctypes.string_at(req_addr, req_len)
        self.requests.append(req)
        out = self.reply(req)
        if isinstance(out, OSError):
            raise out
        n = min(len(out), resp_cap)  # the kernel truncates what does not fit
        ctypes.memmove(resp_addr, out, n)
        arg[:] = NSM_MESSAGE.pack(req_addr, req_len, resp_addr, self.report_len if self.report_len is not None else n)
        return 0


def device(reply: Callable[[bytes], bytes | OSError] | bytes) -> tuple[DevNsm, FakeDevice]:
    fake = FakeDevice(reply if callable(reply) else (lambda _req: reply))
    return DevNsm(FAKE_FD, ioctl=fake.ioctl), fake


# --- the ioctl request number ----------------------------------------------------------------


def test_ioctl_number() -> None:
    # _IOWR(0x0A, 0, struct nsm_raw): dir READ|WRITE (3) << 30 | size 32 << 16 | type 0x0A << 8 | nr 0
    assert NSM_MESSAGE.size == 32
    assert NSM_IOCTL_RAW == (3 << 30) | (32 << 16) | (0x0A << 8) | 0
    assert NSM_IOCTL_RAW == 0xC0200A00
    assert ioc(1, 0x0A, 1, 8) == 0x40080A01
    with pytest.raises(ValueError):
        ioc(3, 0x0A, 0, 1 << 14)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_ioctl_number_matches_the_kernel_headers(tmp_path: Path) -> None:
    src = tmp_path / "ioc.c"
    src.write_text(
        "#include <stdio.h>\n#include <linux/ioctl.h>\n#include <linux/types.h>\n"
        "struct nsm_iovec { __u64 addr; __u64 len; };\n"
        "struct nsm_raw { struct nsm_iovec request; struct nsm_iovec response; };\n"
        'int main(void) { printf("%lu", (unsigned long)_IOWR(0x0A, 0x0, struct nsm_raw)); return 0; }\n'
    )
    exe = tmp_path / "ioc"
    built = subprocess.run(["cc", "-o", str(exe), str(src)], capture_output=True, check=False)
    if built.returncode != 0:
        pytest.skip(f"cannot build against linux/ioctl.h: {built.stderr.decode(errors='replace')[:200]}")
    assert int(subprocess.run([str(exe)], capture_output=True, check=True).stdout) == NSM_IOCTL_RAW


# --- exact request bytes (serde's encoding of the NSM API's Request enum) ---------------------


def _text(s: str) -> bytes:
    assert len(s) < 24
    return bytes([0x60 + len(s)]) + s.encode()


ATTESTATION_NULLS = (
    b"\xa1" + _text("Attestation") + b"\xa3" + _text("user_data") + b"\xf6" + _text("nonce") + b"\xf6"
    + _text("public_key") + b"\xf6"
)  # fmt: skip


def test_request_bytes() -> None:
    doc_reply = cbor2.dumps({"Attestation": {"document": b"doc"}})
    nsm, fake = device(doc_reply)
    assert nsm.attestation() == b"doc"
    assert fake.requests[-1] == ATTESTATION_NULLS
    nsm.attestation(user_data=b"ud", nonce=b"\x00\x01", public_key=b"pk")
    assert fake.requests[-1] == (
        b"\xa1" + _text("Attestation") + b"\xa3" + _text("user_data") + b"\x42ud" + _text("nonce") + b"\x42\x00\x01"
        + _text("public_key") + b"\x42pk"
    )  # fmt: skip

    nsm, fake = device(cbor2.dumps({"DescribePCR": {"lock": True, "data": b"\x00" * 48}}))
    assert nsm.describe_pcr(3) == b"\x00" * 48
    assert fake.requests[-1] == b"\xa1" + _text("DescribePCR") + b"\xa1" + _text("index") + b"\x03"
    nsm.describe_pcr(300)
    assert fake.requests[-1] == b"\xa1" + _text("DescribePCR") + b"\xa1" + _text("index") + b"\x19\x01\x2c"

    nsm, fake = device(cbor2.dumps({"ExtendPCR": {"data": b"\x11" * 48}}))
    assert nsm.extend_pcr(16, b"abc") == b"\x11" * 48
    assert fake.requests[-1] == (
        b"\xa1" + _text("ExtendPCR") + b"\xa2" + _text("index") + b"\x10" + _text("data") + b"\x43abc"
    )

    nsm, fake = device(_text("LockPCR"))
    nsm.lock_pcr(16)
    assert fake.requests[-1] == b"\xa1" + _text("LockPCR") + b"\xa1" + _text("index") + b"\x10"

    nsm, fake = device(cbor2.dumps({"GetRandom": {"random": b"r" * 256}}))
    assert nsm.get_random(16) == b"r" * 16
    assert fake.requests == [b"\x69GetRandom"]

    describe = {
        "DescribeNSM": {
            "version_major": 1,
            "version_minor": 0,
            "version_patch": 0,
            "module_id": "i-0123-enc4567",
            "max_pcrs": 32,
            "locked_pcrs": [0, 1, 2, 3, 4, 8],
            "digest": "SHA384",
        }
    }
    nsm, fake = device(cbor2.dumps(describe))
    assert nsm.describe() == NsmDescription((1, 0, 0), "i-0123-enc4567", 32, frozenset({0, 1, 2, 3, 4, 8}), "SHA384")
    assert fake.requests == [b"\x6bDescribeNSM"]
    assert set(fake.buffer_sizes) == {NSM_RESPONSE_MAX_SIZE} == {0x3000}


def test_get_random_gathers_chunks() -> None:
    chunks = iter([b"a" * 10, b"b" * 10, b"c" * 10])
    nsm, fake = device(lambda _req: cbor2.dumps({"GetRandom": {"random": next(chunks)}}))
    assert nsm.get_random(25) == b"a" * 10 + b"b" * 10 + b"c" * 5
    assert len(fake.requests) == 3
    nsm, _ = device(cbor2.dumps({"GetRandom": {"random": b""}}))
    with pytest.raises(NsmResponseError, match="no bytes"):
        nsm.get_random(1)
    with pytest.raises(ValueError):
        nsm.get_random(-1)


# --- responses -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["InvalidArgument", "InvalidIndex", "ReadOnlyIndex", "InputTooLarge", "InternalError"])
def test_error_responses(code: str) -> None:
    nsm, _ = device(cbor2.dumps({"Error": code}))
    with pytest.raises(NsmError) as info:
        nsm.describe_pcr(40)
    assert info.value.code == code
    assert code in str(info.value) and "DescribePCR" in str(info.value)


GOOD = cbor2.dumps({"Attestation": {"document": b"x" * 5000}})


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (b"", "not well-formed"),
        (GOOD[:100], "not well-formed"),  # truncated
        (GOOD[:-1], "not well-formed"),
        (GOOD + b"\x00", "trailing"),
        (b"\xff\xfe garbage", "not well-formed"),
        (cbor2.dumps([1, 2]), "array, not a response variant"),
        (cbor2.dumps({"Attestation": {}, "Error": "x"}), "map, not a response variant"),
        (cbor2.dumps({"DescribePCR": {"data": b""}}), "expected a Attestation response, got 'DescribePCR'"),
        (cbor2.dumps("GetRandom"), "got 'GetRandom'"),
        (cbor2.dumps({"Attestation": {"document": "text"}}), "'document' is a text"),
        (cbor2.dumps({"Attestation": {}}), "lacks 'document'"),
        (cbor2.dumps({"Attestation": None}), "lacks 'document'"),
        (cbor2.dumps({"Error": 5}), "InvalidResponse"),
    ],
)
def test_bad_responses(reply: bytes, fragment: str) -> None:
    nsm, _ = device(reply)
    with pytest.raises((NsmResponseError, NsmError)) as info:
        nsm.attestation(nonce=b"n")
    assert fragment in str(info.value)


def test_oversize_response_is_cut_by_the_kernel_and_rejected() -> None:
    huge = cbor2.dumps({"Attestation": {"document": b"x" * 0x4000}})
    nsm, _ = device(huge)
    with pytest.raises(NsmResponseError, match="not well-formed"):
        nsm.attestation()


def test_device_reporting_more_than_the_buffer_is_rejected() -> None:
    nsm, fake = device(GOOD)
    fake.report_len = NSM_RESPONSE_MAX_SIZE + 1
    with pytest.raises(NsmResponseError, match="beyond the buffer"):
        nsm.attestation()


def test_bad_describe_fields() -> None:
    body = {"version_major": 1, "version_minor": 0, "version_patch": True, "module_id": "m", "max_pcrs": 32,
            "locked_pcrs": [], "digest": "SHA384"}  # fmt: skip
    nsm, _ = device(cbor2.dumps({"DescribeNSM": body}))
    with pytest.raises(NsmResponseError, match="version_patch"):
        nsm.describe()
    body = {**body, "version_patch": 0, "locked_pcrs": ["0"]}
    nsm, _ = device(cbor2.dumps({"DescribeNSM": body}))
    with pytest.raises(NsmResponseError, match="locked_pcrs"):
        nsm.describe()


@pytest.mark.parametrize(("err", "code"), [(errno.EMSGSIZE, "InputTooLarge"), (errno.EIO, "InternalError")])
def test_ioctl_failures(err: int, code: str) -> None:
    nsm, _ = device(lambda _req: OSError(err, "boom"))
    with pytest.raises(NsmError) as info:
        nsm.get_random(8)
    assert info.value.code == code
    assert isinstance(info.value.__cause__, OSError)


def test_oversize_requests_never_reach_the_device() -> None:
    nsm, fake = device(GOOD)
    with pytest.raises(NsmError) as info:
        nsm.attestation(user_data=b"u" * 1025)
    assert info.value.code == "InputTooLarge"
    with pytest.raises(NsmError) as info:
        nsm.extend_pcr(16, b"d" * 0x1000)
    assert info.value.code == "InputTooLarge"
    with pytest.raises(NsmError) as info:
        nsm.describe_pcr(1 << 16)
    assert info.value.code == "InvalidIndex"
    assert fake.requests == []
    nsm.attestation(user_data=b"u" * 1024, nonce=b"n" * 1024, public_key=b"p" * 1024)  # the largest allowed
    assert len(fake.requests[0]) < 0x1000


def test_open_and_close(tmp_path: Path) -> None:
    with pytest.raises(NsmError, match="cannot open"):
        DevNsm.open(str(tmp_path / "missing"))
    node = tmp_path / "nsm"
    node.write_bytes(b"")
    calls: list[int] = []

    def fake_ioctl(fd: int, request: int, arg: bytearray) -> int:
        calls.append(fd)
        raise OSError(errno.ENOTTY, "not a device")

    with DevNsm.open(str(node), ioctl=fake_ioctl) as nsm, pytest.raises(NsmError):
        nsm.get_random(1)
    assert calls and calls[0] >= 0


def test_documents_through_the_device_path_verify(tmp_path: Path) -> None:
    """A document returned through the ioctl path is the same bytes the verifier accepts."""
    mock = MockNsm(tmp_path, {0: b"\x07" * 48}, clock=lambda: EPOCH)

    def reply(req: bytes) -> bytes:
        body = cbor2.loads(req)["Attestation"]
        return bytes(cbor2.dumps({"Attestation": {"document": mock.attestation(**body)}}))

    nsm, _ = device(reply)
    typed: Nsm = nsm
    doc = typed.attestation(nonce=b"fresh", user_data=b"bound")
    root = TrustRoot.from_pem((tmp_path / "root.pem").read_bytes())
    verified = verify_attestation(
        doc, AttestationPolicy(root=root, at=DOCUMENT_TIME, nonce=b"fresh", user_data=b"bound")
    )
    assert verified.timestamp == EPOCH
