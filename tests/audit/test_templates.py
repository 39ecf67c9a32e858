"""Templates never accept what parse_entry refuses, and agree with it on every field they report."""

from __future__ import annotations

import random

import pytest

from cloister.audit.templates import (
    KIND_DECISION_DENIED,
    KIND_DECISION_GRANTED,
    KIND_OUTCOME,
    DecisionInfo,
    OutcomeInfo,
    Template,
    TemplateCache,
    build_template,
)
from cloister.verify.entries import DecisionEntry, OutcomeEntry, encode_entry, parse_entry
from cloister.verify.errors import DecodeError
from tests.audit.logbuilder import TestLog


def _agrees(t: Template, data: bytes) -> None:
    """`data` matched `t`: parse_entry must accept it, with the template's facts."""
    m = t.fullmatch(data)
    assert m is not None
    entry = parse_entry(data)  # raises if the template accepted something invalid
    if t.kind == KIND_OUTCOME:
        assert isinstance(entry, OutcomeEntry) and isinstance(t.info, OutcomeInfo)
        index = int.from_bytes(m.group(t.decision_group), "big") if t.decision_group else t.decision_const
        assert index == entry.decision_index
        assert t.info == OutcomeInfo.of(entry)
    else:
        assert isinstance(entry, DecisionEntry) and isinstance(t.info, DecisionInfo)
        i = t.info
        assert (i.agent, i.server, i.tool, i.decision, i.code, i.mode, i.policy) == (
            entry.agent,
            entry.server,
            entry.tool,
            entry.decision,
            entry.code,
            entry.mode,
            (entry.policy_version, entry.policy_sha256),
        )
        assert t.kind == (KIND_DECISION_GRANTED if entry.grant_nonce is not None else KIND_DECISION_DENIED)
        reason = m.group(t.reason_group).decode() if t.reason_group else t.reason
        assert reason == entry.reason


def _templates(log: TestLog) -> list[tuple[Template, bytes]]:
    out = []
    for data in log.entries:
        t = build_template(data, parse_entry(data))
        if t is not None:
            out.append((t, data))
    return out


def test_every_template_matches_its_entry_and_agrees_with_the_parser_on_others(built: TestLog) -> None:
    pairs = _templates(built)
    assert len(pairs) > 200
    for t, data in pairs:
        _agrees(t, data)
    # Templates against every other entry of the same length: a match must mean agreement.
    by_length: dict[int, list[bytes]] = {}
    for e in built.entries:
        by_length.setdefault(len(e), []).append(e)
    matches = 0
    for t, data in pairs:
        for other in by_length[len(data)]:
            if t.fullmatch(other) is not None:
                matches += 1
                _agrees(t, other)
    assert matches > len(pairs)  # templates do generalise


def test_random_mutations_are_never_accepted_wrongly(built: TestLog) -> None:
    rnd = random.Random(20240607)
    pairs = _templates(built)
    accepted = 0
    for _ in range(20_000):
        t, data = rnd.choice(pairs)
        b = bytearray(data)
        for _ in range(rnd.randint(1, 3)):
            at = rnd.randrange(len(b))
            b[at] = rnd.randrange(256) if rnd.random() < 0.5 else b[at] ^ (1 << rnd.randrange(8))
        if t.fullmatch(bytes(b)) is not None:
            accepted += 1
            _agrees(t, bytes(b))
    assert accepted > 1000  # mutations inside slots (hashes, nonces, times) are still entries


def _outcome(decision: int, **kw: object) -> bytes:
    fields: dict[str, object] = {
        "time_ms": 1_700_000_000_000,
        "decision_index": decision,
        "result_sha256": b"\x05" * 32,
        "error": "",
        "duration_us": 300,
    }
    fields.update(kw)
    return encode_entry(OutcomeEntry(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("width_of", "values"),
    [
        (24, [24, 255]),
        (256, [256, 65535]),
        (65536, [65536, 2**32 - 1]),
        (2**32, [2**32, 2**64 - 1]),
    ],
)
def test_integer_slots_keep_the_shortest_form(width_of: int, values: list[int]) -> None:
    t = build_template(_outcome(width_of), parse_entry(_outcome(width_of)))
    assert t is not None
    for v in values:
        _agrees(t, _outcome(v))
    # The same head with a value that needs fewer bytes is not canonical: both refuse it.
    data = _outcome(width_of)
    head = data.index(b"hdecision") + len(b"hdecision")
    n = {24: 1, 256: 2, 65536: 4, 2**32: 8}[width_of]
    smaller = data[: head + 1] + (width_of - 1).to_bytes(n, "big") + data[head + 1 + n :]
    assert t.fullmatch(smaller) is None
    with pytest.raises(DecodeError, match="deterministic"):
        parse_entry(smaller)


def test_small_integers_are_constants_of_the_template() -> None:
    t = build_template(_outcome(5), parse_entry(_outcome(5)))
    assert t is not None and t.decision_group == 0 and t.decision_const == 5
    assert t.fullmatch(_outcome(6)) is None


def test_text_slots_take_ascii_only_and_non_ascii_entries_go_to_the_parser() -> None:
    ascii_entry = _outcome(100, error="upstream timeout!")
    t = build_template(ascii_entry, parse_entry(ascii_entry))
    assert t is not None
    other = _outcome(100, error="upstream timeout?")
    _agrees(t, other)
    non_ascii = _outcome(100, error="upstream tïmeout")  # 17 bytes in UTF-8, like the template
    assert len(non_ascii) == len(ascii_entry)
    assert t.fullmatch(non_ascii) is None
    parse_entry(non_ascii)  # valid: the parser takes it
    invalid = ascii_entry.replace(b"timeout!", b"timeout\xff")
    assert t.fullmatch(invalid) is None
    with pytest.raises(DecodeError):
        parse_entry(invalid)


def test_the_cache_indexes_many_templates_of_one_length() -> None:
    cache = TemplateCache()
    tools = [f"tool-{c}" for c in "abcdefghijklmnop"]  # same lengths, different bytes

    def decision(tool: str, t: int) -> bytes:
        return encode_entry(
            DecisionEntry(
                time_ms=1_700_000_000_000 + t,
                agent="a",
                roles=(),
                issuer="i",
                server="s",
                tool=tool,
                args_sha256=bytes([t % 256]) * 32,
                decision="allow",
                code="",
                reason="ok",
                policies=(),
                policy_sha256=b"\x01" * 32,
                policy_version=1,
                request_id=f"{t:04d}",
                grant_nonce=bytes(16),
                grant_expiry_ms=1_700_000_060_000 + t,
            )
        )

    for tool in tools:
        d = decision(tool, 0)
        cache.learn(d, parse_entry(d))
    (bucket,) = cache.by_length.values()
    assert len(bucket.templates) == len(tools) and bucket.p1 >= 0
    for i, tool in enumerate(tools * 3):
        d = decision(tool, i + 1)
        got = cache.match(d)
        assert got is not None and isinstance(got[0].info, DecisionInfo) and got[0].info.tool == tool
        assert len(bucket.candidates(d)) == 1
