"""Regression (boundary fuzzer, log_entry target): an entry field holding an integer of more than
4,300 digits made the error message's repr() raise ValueError (Python's int-to-str limit), so
parse_entry crashed instead of refusing the entry."""

from __future__ import annotations

import cbor2
import pytest

from cloister.verify.entries import parse_entry, quoted
from cloister.verify.errors import DecodeError


def test_quoting_a_huge_integer_names_its_size_not_its_digits() -> None:
    assert quoted(10**5000) == f"<an integer of {(10**5000).bit_length()} bits>"
    assert quoted(12345) == "12345"


def test_an_entry_with_a_huge_integer_is_refused_not_a_crash() -> None:
    # A negative "time" is refused, and the refusal quotes the value.
    entry = {
        "t": "outcome",
        "v": 1,
        "time": -(10**5000),
        "decision": 0,
        "result": None,
        "error": "",
        "duration_us": 0,
        "paid": "",
    }
    with pytest.raises(DecodeError, match="bits"):
        parse_entry(cbor2.dumps(entry))
