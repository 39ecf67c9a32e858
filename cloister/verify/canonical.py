"""Canonical JSON per RFC 8785 (JSON Canonicalization Scheme), and a capped JSON parser.

Grants and log entries commit to tool arguments and results by the SHA-256 of their
canonical JSON, so the enclave, the relay, the upstream's grant verifier and an auditor
holding the bodies all compute the same bytes from the same JSON value.

- Object members are sorted by the UTF-16 code units of their names (RFC 8785 §3.2.3).
- Strings use the shortest escapes of RFC 8785 §3.2.2.2; other characters are emitted as UTF-8.
- Numbers are serialised as ECMAScript's Number.prototype.toString (RFC 8785 §3.2.2.3).
  Python integers are emitted exactly; integers beyond 2**53 therefore keep their digits
  where a JavaScript implementation would round them. Values outside float range are refused.

`parse_json` is the one parser for untrusted JSON text: it refuses duplicate member names,
NaN/Infinity, lone surrogates (text that has no UTF-8 form), integers longer than Python reads,
excessive size and excessive nesting, with a DecodeError that says where.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cloister.verify.errors import DecodeError

MAX_JSON_BYTES = 1 << 20
MAX_DEPTH = 64
# A \uD800-\uDFFF escape without its pair decodes to a lone surrogate: not Unicode text, not UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

_ESCAPES = {
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0C: "\\f",
    0x0D: "\\r",
    0x22: '\\"',
    0x5C: "\\\\",
}


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON value (dict/list/str/int/float/bool/None)."""
    try:
        if _plain(value):
            # Without floats or astral-plane member names, json.dumps emits exactly RFC 8785:
            # same escapes, and code point order equals UTF-16 order inside the BMP.
            return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        out: list[str] = []
        _emit(value, out, 0)
        return "".join(out).encode("utf-8")
    except DecodeError:
        raise
    except UnicodeEncodeError as exc:
        raise DecodeError(f"JSON value: {_surrogate_message(exc.object[exc.start])}") from exc
    except ValueError as exc:  # str() of an integer longer than sys.get_int_max_str_digits()
        raise DecodeError(f"JSON value has an integer of more than {sys.get_int_max_str_digits()} digits") from exc


def _surrogate_message(char: str, holder: str = "a string") -> str:
    return f"{holder} holds a lone surrogate (U+{ord(char):04X}), which is not Unicode text"


def _plain(value: Any) -> bool:
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str) or any(ord(c) > 0xFFFF for c in k):
                    return False
                stack.append((x, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, float) or not (v is None or isinstance(v, str | int)):
            return False
    return True


def canonical_sha256(value: Any) -> bytes:
    return hashlib.sha256(canonical_json(value)).digest()


def _emit(value: Any, out: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise DecodeError(f"JSON value nested deeper than {MAX_DEPTH} levels")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, Mapping):
        out.append("{")
        items = sorted(value.items(), key=lambda kv: _utf16_key(kv[0]))
        for i, (k, v) in enumerate(items):
            if not isinstance(k, str):
                raise DecodeError(f"JSON object member name must be a string, got {type(k).__name__}")
            if i:
                out.append(",")
            out.append(_string(k))
            out.append(":")
            _emit(v, out, depth + 1)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(",")
            _emit(v, out, depth + 1)
        out.append("]")
    else:
        raise DecodeError(f"not a JSON value: {type(value).__name__}")


def _utf16_key(key: Any) -> bytes:
    if not isinstance(key, str):
        raise DecodeError(f"JSON object member name must be a string, got {type(key).__name__}")
    return key.encode("utf-16-be", "surrogatepass")


def _string(s: str) -> str:
    parts = ['"']
    for ch in s:
        code = ord(ch)
        if code in _ESCAPES:
            parts.append(_ESCAPES[code])
        elif code < 0x20:
            parts.append(f"\\u{code:04x}")
        else:
            parts.append(ch)
    parts.append('"')
    return "".join(parts)


def _number(x: float) -> str:
    """ECMAScript Number::toString (ECMA-262 §7.1.12.1), which RFC 8785 §3.2.2.3 adopts."""
    if math.isnan(x) or math.isinf(x):
        raise DecodeError("JSON numbers must be finite (NaN and Infinity have no JSON form)")
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    # repr() gives the shortest round-tripping digits, as ECMAScript requires.
    mantissa, _, exp_text = repr(abs(x)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    # n: position of the decimal point relative to the first significant digit.
    n = len(int_part.lstrip("0")) if int_part.strip("0") else -(len(frac_part) - len(frac_part.lstrip("0")))
    if exp_text:
        n += int(exp_text)
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    exp = f"e{'+' if e >= 0 else '-'}{abs(e)}"
    if k == 1:
        return sign + digits + exp
    return sign + digits[0] + "." + digits[1:] + exp


def parse_json(data: bytes | str, *, what: str = "JSON", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse untrusted JSON text with caps. Errors name `what` and the position."""
    size = len(data.encode("utf-8") if isinstance(data, str) else data)
    if size > max_bytes:
        raise DecodeError(f"{what}: {size} bytes exceeds the limit of {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what}: not UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DecodeError(f"{what}: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise DecodeError(f"{what}: nested too deeply") from exc
    except ValueError as exc:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise DecodeError(f"{what}: a number has more than {sys.get_int_max_str_digits()} digits") from exc
    _check_depth(value, what)
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DecodeError(f"duplicate member name {k!r}")
        if (m := _LONE_SURROGATE.search(k)) is not None:
            raise DecodeError(_surrogate_message(m.group(), "a member name"))
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise DecodeError(f"{name} is not valid JSON")


def _check_depth(value: Any, what: str) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if d > MAX_DEPTH:
            raise DecodeError(f"{what}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, dict):
            stack.extend((c, d + 1) for c in v.values())
        elif isinstance(v, list):
            stack.extend((c, d + 1) for c in v)
        elif isinstance(v, float) and math.isinf(v):
            raise DecodeError(f"{what}: number out of range")
        elif isinstance(v, str) and (m := _LONE_SURROGATE.search(v)) is not None:
            raise DecodeError(f"{what}: {_surrogate_message(m.group())}")
