"""RFC 8785 canonical JSON against the RFC's own vectors, and the capped parser."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister.verify.canonical import canonical_json, parse_json
from cloister.verify.errors import DecodeError

# RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical serialisation.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


def _f(hex_bits: str) -> float:
    return float(struct.unpack(">d", bytes.fromhex(hex_bits))[0])


@pytest.mark.parametrize(("bits", "want"), APPENDIX_B)
def test_rfc8785_numbers(bits: str, want: str) -> None:
    assert canonical_json(_f(bits)) == want.encode()


@pytest.mark.parametrize("bad", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_non_finite_refused(bad: str) -> None:
    with pytest.raises(DecodeError, match="finite"):
        canonical_json(_f(bad))


def test_rfc8785_section_3_2_3_sorting() -> None:
    # RFC 8785 §3.2.3: members sorted by UTF-16 code units, not code points.
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    keys = list(json.loads(canonical_json(value)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_rfc8785_section_3_2_4_example() -> None:
    text = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/", "literals": [null, true, false]}'
    )
    want = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical_json(parse_json(text)) == want.encode()


def test_integral_floats_and_ints_agree() -> None:
    assert canonical_json(10.0) == canonical_json(10) == b"10"
    assert canonical_json(-0.0) == b"0"


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_round_trip(x: float) -> None:
    assert float(canonical_json(x)) == x or (x == 0 and math.copysign(1, x) < 0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"a": 1, "a": 2}', "duplicate member name 'a'"),
        ('{"a": NaN}', "NaN"),
        ('{"a": 1', "line 1 column"),
        ("[" * 100 + "]" * 100, "nested"),
        ('{"a": 1e400}', "out of range"),
    ],
)
def test_parser_refuses(text: str, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        parse_json(text, what="arguments")


def test_parser_size_cap() -> None:
    with pytest.raises(DecodeError, match="exceeds the limit of 10 bytes"):
        parse_json(b'{"a": "0123456789"}', what="arguments", max_bytes=10)


def test_parser_not_utf8() -> None:
    with pytest.raises(DecodeError, match="not UTF-8"):
        parse_json(b'{"a": "\xff"}')


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(_json)
def test_fast_path_equals_the_general_serialiser(value: object) -> None:
    from cloister.verify import canonical

    out: list[str] = []
    canonical._emit(value, out, 0)
    assert canonical_json(value) == "".join(out).encode()
