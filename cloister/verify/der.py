"""A small, strict ASN.1 reader: DER, plus the one BER relaxation that CMS producers use.

Written from X.690 (BER/DER encoding rules) for the CMS EnvelopedData that AWS KMS returns as
`CiphertextForRecipient` (see cloister/enclave/sealing.py and docs/decisions/0014). KMS encodes
that structure in BER with indefinite lengths on its outer constructed elements (the AWS Nitro
Enclaves SDK's own test vector shows it), so a pure DER reader would refuse real responses. The
reader therefore accepts, when asked (`indefinite=True`):

- the indefinite length form (0x80 ... 00 00) on constructed elements only;

and otherwise holds to DER:

- one-octet identifiers only (tag numbers 0..30; the high-tag-number form is refused);
- definite lengths in the shortest form (no long form below 128, no leading zero octets,
  at most four length octets), never past the end of the enclosing element;
- no end-of-contents octets outside an indefinite-length element;
- exactly one element spanning the whole input (no trailing bytes).

Everything is capped before it is read (input size, nesting depth, element count), so hostile
input costs at most linear time and bounded memory, and never reaches Python's recursion limit.
Every failure is a `DerError` (a `DecodeError`) naming the offset.

The helpers (`expect`, `oid`, `integer`, `octets`, `null`) read one node each, with the DER
rules for that type (minimal INTEGER, minimal OID sub-identifiers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cloister.verify.errors import DecodeError

# Identifier octets (class | constructed | number) of the universal types we read.
INTEGER: Final = 0x02
OCTET_STRING: Final = 0x04
NULL: Final = 0x05
OID: Final = 0x06
SEQUENCE: Final = 0x30
SET: Final = 0x31

_CONSTRUCTED: Final = 0x20
_CONTEXT: Final = 0x80
_HIGH_TAG: Final = 0x1F
_MAX_LENGTH_OCTETS: Final = 4
_MAX_OID_BYTES: Final = 64


def context(number: int, *, constructed: bool) -> int:
    """The identifier octet of a context-specific tag [number]."""
    if not 0 <= number < _HIGH_TAG:
        raise ValueError(f"context tag [{number}] does not fit in one identifier octet")
    return _CONTEXT | (_CONSTRUCTED if constructed else 0) | number


class DerError(DecodeError):
    """The bytes are not a well-formed (DER, or the permitted BER) encoding."""


@dataclass(frozen=True)
class Node:
    """One element: its identifier octet, and its contents (primitive) or children (constructed)."""

    tag: int
    offset: int  # where the element's identifier octet is in the input
    content: bytes = b""  # primitive elements only
    children: tuple[Node, ...] = ()  # constructed elements only
    indefinite: bool = False  # encoded with the indefinite length form

    @property
    def constructed(self) -> bool:
        return bool(self.tag & _CONSTRUCTED)


def parse(data: bytes, *, max_size: int, max_depth: int = 16, max_nodes: int = 256, indefinite: bool = False) -> Node:
    """Parse exactly one element spanning all of `data`. Raises DerError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DerError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise DerError("empty input")
    if len(data) > max_size:
        raise DerError(f"input is {len(data)} bytes, at most {max_size} accepted")
    reader = _Reader(data, max_depth=max_depth, max_nodes=max_nodes, indefinite=indefinite)
    node, end = reader.element(0, len(data), 0)
    if end != len(data):
        raise DerError(f"{len(data) - end} trailing bytes after the element at offset {end}")
    return node


class _Reader:
    def __init__(self, data: bytes, *, max_depth: int, max_nodes: int, indefinite: bool) -> None:
        self.data = data
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.indefinite = indefinite
        self.nodes = 0

    def element(self, pos: int, end: int, depth: int) -> tuple[Node, int]:
        """The element at `pos`, which must end by `end`; returns it and the offset after it."""
        if depth > self.max_depth:
            raise DerError(f"nesting deeper than {self.max_depth} at offset {pos}")
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise DerError(f"more than {self.max_nodes} elements")
        tag = self._identifier(pos, end)
        constructed = bool(tag & _CONSTRUCTED)
        length, body = self._length(pos + 1, end, constructed)
        if length is None:
            return self._indefinite(tag, pos, body, end, depth)
        stop = body + length
        if not constructed:
            return Node(tag, pos, content=self.data[body:stop]), stop
        children: list[Node] = []
        p = body
        while p < stop:
            child, p = self.element(p, stop, depth + 1)
            children.append(child)
        return Node(tag, pos, children=tuple(children)), stop

    def _indefinite(self, tag: int, pos: int, body: int, end: int, depth: int) -> tuple[Node, int]:
        children: list[Node] = []
        p = body
        while True:
            if p + 2 <= end and self.data[p] == 0 and self.data[p + 1] == 0:
                return Node(tag, pos, children=tuple(children), indefinite=True), p + 2
            if p >= end:
                raise DerError(f"indefinite-length element at offset {pos} has no end-of-contents")
            child, p = self.element(p, end, depth + 1)
            children.append(child)

    def _identifier(self, pos: int, end: int) -> int:
        if pos >= end:
            raise DerError(f"truncated: no identifier octet at offset {pos}")
        tag = self.data[pos]
        if tag & _HIGH_TAG == _HIGH_TAG:
            raise DerError(f"high-tag-number identifier 0x{tag:02x} at offset {pos} is not supported")
        if tag == 0:
            raise DerError(f"unexpected end-of-contents at offset {pos}")
        return tag

    def _length(self, pos: int, end: int, constructed: bool) -> tuple[int | None, int]:
        """(length, offset of the contents); length None means the indefinite form."""
        if pos >= end:
            raise DerError(f"truncated: no length octet at offset {pos}")
        first = self.data[pos]
        if first < 0x80:
            length, body = first, pos + 1
        elif first == 0x80:
            if not self.indefinite:
                raise DerError(f"indefinite length at offset {pos} (DER requires definite lengths)")
            if not constructed:
                raise DerError(f"indefinite length on a primitive element at offset {pos}")
            return None, pos + 1
        else:
            n = first & 0x7F
            if n > _MAX_LENGTH_OCTETS:
                raise DerError(f"length of {n} octets at offset {pos} (at most {_MAX_LENGTH_OCTETS})")
            if pos + 1 + n > end:
                raise DerError(f"truncated: length octets run past the end at offset {pos}")
            raw = self.data[pos + 1 : pos + 1 + n]
            length, body = int.from_bytes(raw, "big"), pos + 1 + n
            if raw[0] == 0 or length < 0x80:
                raise DerError(f"length at offset {pos} is not in its shortest form")
        if length > end - body:
            raise DerError(f"length {length} at offset {pos} runs past the end of its container")
        return length, body


# --- one node at a time ------------------------------------------------------------------------


def expect(node: Node, tag: int, what: str) -> Node:
    if node.tag != tag:
        raise DerError(f"{what}: expected tag 0x{tag:02x}, found 0x{node.tag:02x} at offset {node.offset}")
    return node


def definite(node: Node, what: str) -> Node:
    """`node`, which must use the definite length form."""
    if node.indefinite:
        raise DerError(f"{what}: indefinite length at offset {node.offset} where DER is required")
    return node


def oid(node: Node, what: str) -> str:
    """An OBJECT IDENTIFIER in dotted form (minimal sub-identifiers, at most 64 octets)."""
    content = expect(node, OID, what).content
    if not 0 < len(content) <= _MAX_OID_BYTES:
        raise DerError(f"{what}: OBJECT IDENTIFIER of {len(content)} octets at offset {node.offset}")
    if content[-1] & 0x80:
        raise DerError(f"{what}: OBJECT IDENTIFIER ends inside a sub-identifier at offset {node.offset}")
    arcs: list[int] = []
    value, start = 0, True
    for byte in content:
        if start and byte == 0x80:
            raise DerError(f"{what}: OBJECT IDENTIFIER sub-identifier not minimal at offset {node.offset}")
        value = (value << 7) | (byte & 0x7F)
        start = not byte & 0x80
        if start:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [first // 40, first % 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def integer(node: Node, what: str, *, max_bytes: int = 8) -> int:
    """An INTEGER in minimal two's complement, of at most `max_bytes` octets."""
    content = expect(node, INTEGER, what).content
    if not 0 < len(content) <= max_bytes:
        raise DerError(f"{what}: INTEGER of {len(content)} octets at offset {node.offset}")
    if len(content) > 1 and ((content[0] == 0x00 and content[1] < 0x80) or (content[0] == 0xFF and content[1] >= 0x80)):
        raise DerError(f"{what}: INTEGER at offset {node.offset} is not minimal")
    return int.from_bytes(content, "big", signed=True)


def null(node: Node, what: str) -> None:
    if expect(node, NULL, what).content:
        raise DerError(f"{what}: NULL with contents at offset {node.offset}")


def octets(node: Node, what: str, *, tag: int = OCTET_STRING, segmented: bool = False) -> bytes:
    """An OCTET STRING (or an IMPLICIT one under `tag`, given as its primitive identifier).

    With `segmented`, the BER constructed form is accepted too: the same tag with the
    constructed bit, holding primitive OCTET STRING segments (one level, as KMS sends).
    """
    if node.tag == tag:
        return node.content
    if segmented and node.tag == tag | _CONSTRUCTED:
        return b"".join(octets(seg, f"{what} segment") for seg in node.children)
    raise DerError(
        f"{what}: expected an OCTET STRING (tag 0x{tag:02x}), found 0x{node.tag:02x} at offset {node.offset}"
    )


def fields(node: Node, what: str, count: int, *, tag: int = SEQUENCE) -> tuple[Node, ...]:
    """The children of a SEQUENCE (or `tag`) that must have exactly `count` of them."""
    expect(node, tag, what)
    if len(node.children) != count:
        raise DerError(f"{what}: {len(node.children)} fields at offset {node.offset}, expected {count}")
    return node.children
