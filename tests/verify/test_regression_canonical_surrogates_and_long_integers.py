"""Regressions found by the fuzzer (cloister/dev/fuzz.py): JSON that parses but has no canonical form.

`parse_json` accepted a lone surrogate escape ("\\ud800") and `canonical_json` then raised
UnicodeEncodeError: arguments_json of that shape made the enclave answer INTERNAL instead of denying
with "bad-arguments". An integer of more than 4300 digits made `parse_json` raise the bare ValueError
of Python's int() limit.
"""

from __future__ import annotations

import pytest

from cloister.verify.canonical import canonical_json, canonical_sha256, parse_json
from cloister.verify.errors import DecodeError


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"a":"\\ud800"}', "arguments: a string holds a lone surrogate (U+D800), which is not Unicode text"),
        (b'["x\\udc00"]', "arguments: a string holds a lone surrogate (U+DC00), which is not Unicode text"),
        (b'{"\\udfff":1}', "arguments: a member name holds a lone surrogate (U+DFFF), which is not Unicode text"),
        (b"[" + b"9" * 4301 + b"]", "arguments: a number has more than 4300 digits"),
        (b'{"a":-' + b"1" * 100_000 + b"}", "arguments: a number has more than 4300 digits"),
    ],
)
def test_parse_json_refuses_what_has_no_canonical_form(text: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_json(text, what="arguments")
    assert str(info.value) == message


def test_a_surrogate_pair_escape_is_one_character_and_still_accepted() -> None:
    value = parse_json(b'{"e":"\\ud83d\\ude00"}')
    assert value == {"e": "\U0001f600"}
    assert canonical_json(value) == '{"e":"\U0001f600"}'.encode()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": "\ud800"}, "JSON value: a string holds a lone surrogate (U+D800), which is not Unicode text"),
        ({"\udc00": 1.5}, "JSON value: a string holds a lone surrogate (U+DC00), which is not Unicode text"),
        ([int("9" * 4300) * 10], "JSON value has an integer of more than 4300 digits"),
    ],
)
def test_canonical_json_of_such_values_is_a_decode_error(value: object, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        canonical_sha256(value)
    assert str(info.value) == message
