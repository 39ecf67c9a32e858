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


def decode_cbor(data: bytes, *, what: str) -> Any:
    """Decode exactly one CBOR item that spans all of `data`, or raise DecodeError."""
    fp = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # cbor2 raises assorted types on hostile input
        raise DecodeError(f"{what}: not well-formed CBOR: {exc}") from exc
    if fp.tell() != len(data):
        raise DecodeError(f"{what}: {len(data) - fp.tell()} trailing bytes after the CBOR item")
    return item


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
