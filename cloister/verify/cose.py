"""Minimal COSE_Sign1 (RFC 9052 §4.2 structure, §4.4 signing and verification).

Only what Cloister needs: parse a COSE_Sign1 (tagged or untagged) into a typed value that keeps
the protected header bytes exactly as received (the signature covers those bytes, not a
re-encoding), build the Sig_structure, and encode a COSE_Sign1 with a caller-supplied signer.
Algorithm checks belong to the caller, which knows what it expects.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from cloister.verify.errors import DecodeError

COSE_SIGN1_TAG = 18  # RFC 9052 §2, Table 1
HEADER_ALG = 1  # RFC 9052 §3.1, header label "alg"


@dataclass(frozen=True)
class CoseSign1:
    """A parsed (not verified) COSE_Sign1 message."""

    protected: bytes  # the bstr as received; the signature covers these exact bytes
    protected_map: Mapping[Any, Any]
    unprotected: Mapping[Any, Any]
    payload: bytes
    signature: bytes
    tagged: bool


# Data items one decode may hold. A decoded item costs tens of bytes for each byte it took on the
# wire (8 MiB of one-byte integers is a list of 8 million objects), so the count is checked on the
# wire, before decoding. Cloister's own CBOR holds at most a few thousand (a bundle of 512 files).
MAX_CBOR_ITEMS = 65_536


def decode_cbor(data: bytes, *, what: str, max_items: int = MAX_CBOR_ITEMS) -> Any:
    """Decode exactly one CBOR item that spans all of `data`, or raise DecodeError."""
    _check_item_count(data, what, max_items)
    fp = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # cbor2 raises assorted types on hostile input
        raise DecodeError(f"{what}: not well-formed CBOR: {exc}") from exc
    if fp.tell() != len(data):
        raise DecodeError(f"{what}: {len(data) - fp.tell()} trailing bytes after the CBOR item")
    return item


def _head(data: bytes, pos: int) -> tuple[int, int | None, int] | None:
    """(major type, argument or None for an indefinite length, position after the head), or None if reserved."""
    major, info = data[pos] >> 5, data[pos] & 0x1F
    if info < 24:
        return major, info, pos + 1
    if info < 28:
        end = pos + 1 + (1 << (info - 24))
        return major, int.from_bytes(data[pos + 1 : end], "big"), end
    if info == 31 and major in (2, 3, 4, 5):
        return major, None, pos + 1
    return None


def _check_item_count(data: bytes, what: str, max_items: int) -> None:
    """Count the data items of the CBOR item at the start of `data` from their heads alone (RFC 8949 §3),
    and refuse more than `max_items`. Malformed input is left for the decoder to describe."""
    expected = [1]  # items still to read in each open container; -1 until a break for indefinite lengths
    pos, items = 0, 0
    while expected and pos < len(data):
        if expected[-1] == 0:
            expected.pop()
            continue
        if data[pos] == 0xFF:  # "break": ends an indefinite-length item
            if expected.pop() != -1:
                return
            pos += 1
            continue
        head = _head(data, pos)
        if head is None:
            return
        major, arg, pos = head
        items += 1
        if items > max_items:
            raise DecodeError(f"{what}: more than {max_items} CBOR data items")
        if expected[-1] > 0:
            expected[-1] -= 1
        if major in (2, 3):
            if arg is None:
                expected.append(-1)
            else:
                pos += arg
        elif major in (4, 5):
            expected.append(-1 if arg is None else arg * (major - 3))
        elif major == 6:
            expected.append(1)


def cbor_type_name(value: object) -> str:
    """The CBOR name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    for kind, name in ((bytes, "byte string"), (str, "text"), (int, "integer"), (float, "float")):
        if isinstance(value, kind):
            return name
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "map"
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    return type(value).__name__


def parse_cose_sign1(data: bytes, *, max_size: int) -> CoseSign1:
    """Parse a tagged (tag 18) or untagged COSE_Sign1. Raises DecodeError."""
    if len(data) > max_size:
        raise DecodeError(f"COSE_Sign1: {len(data)} bytes exceeds the limit of {max_size}")
    item = decode_cbor(data, what="COSE_Sign1")
    tagged = isinstance(item, cbor2.CBORTag)
    if tagged and item.tag != COSE_SIGN1_TAG:
        raise DecodeError(f"COSE_Sign1: unexpected CBOR tag {item.tag}, expected {COSE_SIGN1_TAG}")
    # cbor2 decodes the content of a tag into immutable containers (tuple, frozendict).
    arr = item.value if tagged else item
    # RFC 9052 §4.2: [protected: bstr, unprotected: map, payload: bstr / nil, signature: bstr]
    if not isinstance(arr, list | tuple) or len(arr) != 4:
        raise DecodeError("COSE_Sign1: not an array of 4 elements")
    protected, unprotected, payload, signature = arr
    if not isinstance(protected, bytes):
        raise DecodeError("COSE_Sign1: protected header [0] is not a byte string")
    if not isinstance(unprotected, Mapping):
        raise DecodeError(f"COSE_Sign1: unprotected header [1] is {cbor_type_name(unprotected)}, not a map")
    if not isinstance(payload, bytes):
        raise DecodeError("COSE_Sign1: payload [2] is not a byte string (detached payloads unsupported)")
    if not isinstance(signature, bytes):
        raise DecodeError("COSE_Sign1: signature [3] is not a byte string")
    # RFC 9052 §3: a zero-length protected bstr stands for the empty map.
    protected_map = decode_cbor(protected, what="COSE_Sign1 protected header") if protected else {}
    if not isinstance(protected_map, Mapping):
        raise DecodeError("COSE_Sign1: protected header does not encode a map")
    return CoseSign1(protected, protected_map, unprotected, payload, signature, tagged)


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """RFC 9052 §4.4: the bytes that are signed, ["Signature1", protected, external_aad, payload]."""
    return cbor2.dumps(["Signature1", protected, external_aad, payload])


def encode_cose_sign1(
    protected_map: Mapping[Any, Any],
    unprotected_map: Mapping[Any, Any],
    payload: bytes,
    sign: Callable[[bytes], bytes],
    *,
    tagged: bool,
) -> bytes:
    """Encode and sign a COSE_Sign1. `sign` receives the Sig_structure bytes."""
    protected = cbor2.dumps(dict(protected_map)) if protected_map else b""
    signature = sign(sig_structure(protected, payload))
    message = [protected, dict(unprotected_map), payload, signature]
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, message) if tagged else message)
