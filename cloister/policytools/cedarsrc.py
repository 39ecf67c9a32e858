"""Cedar source text: policies split into statements, and parse errors placed on a line.

cedarpy (4.x) reports a parse error as a bare message such as "unexpected token `}`", with no
offset. An LR parser has the viable-prefix property: every prefix of the text that ends
before the offending token fails only with "unexpected end of input". So the offending token
is the shortest token prefix that fails with any other message, found by bisection. Errors
that only appear once a statement is complete (an unknown function, a duplicate annotation)
are placed on the first token the message quotes, or else on the statement's first line.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

# Comments, string literals (with escapes), identifiers, numbers, two-character operators, and
# any other single character. Whitespace is skipped by the scanner.
_TOKEN = re.compile(r'//[^\n]*|"(?:[^"\\\n]|\\.)*"|[A-Za-z_][A-Za-z0-9_]*|\d+|::|==|!=|<=|>=|&&|\|\||\S')
# For splitting statements only comments, strings and `;` matter: coarser tokens, far fewer matches.
_COARSE = re.compile(r'//[^\n]*|"(?:[^"\\\n]|\\.)*"|;|[^\s;"/]+|\S')
_EOF_MESSAGES = ("unexpected end of input",)


@dataclass(frozen=True)
class Token:
    text: str
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.text)

    @property
    def is_comment(self) -> bool:
        return self.text.startswith("//")


@dataclass(frozen=True)
class Statement:
    """One policy as written: `index` is its position in the file, which is cedarpy's `policy<index>`."""

    index: int
    start: int  # offset of its first token (an annotation or the effect)
    end: int  # offset just after its terminating `;` (or the end of the text)
    line: int  # 1-based line of `start`
    end_line: int
    text: str  # from the first token to the `;`
    comment: str  # the `//` comment lines directly above it, if any


@dataclass(frozen=True)
class Location:
    line: int
    column: int


def tokens(text: str) -> list[Token]:
    return [Token(m.group(0), m.start()) for m in _TOKEN.finditer(text)]


def line_col(text: str, offset: int) -> Location:
    line = text.count("\n", 0, offset) + 1
    return Location(line, offset - (text.rfind("\n", 0, offset) + 1) + 1)


class LineIndex:
    """Offsets to lines in O(log n), for files with thousands of policies."""

    def __init__(self, text: str) -> None:
        self._starts = [0, *(m.end() for m in re.finditer("\n", text))]

    def line(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset)


def split_statements(text: str) -> list[Statement]:
    """The policies of a .cedar file, split at top-level `;` (Cedar has no other use for it
    outside string literals and comments, which the tokenizer keeps whole)."""
    out: list[Statement] = []
    lines = LineIndex(text)
    current: list[Token] = []
    comment: list[Token] = []
    pending_comment: list[Token] = []

    def flush(end: int) -> None:
        first = current[0]
        above = _comment_block(lines, pending_comment, first)
        out.append(
            Statement(
                index=len(out),
                start=first.start,
                end=end,
                line=lines.line(first.start),
                end_line=lines.line(max(end - 1, first.start)),
                text=text[first.start : end],
                comment=above,
            )
        )

    for tok in (Token(m.group(0), m.start()) for m in _COARSE.finditer(text)):
        if tok.is_comment:
            if not current:
                comment.append(tok)
            continue
        if not current:
            pending_comment = comment
            comment = []
        current.append(tok)
        if tok.text == ";":
            flush(tok.end)
            current = []
    if current:
        flush(current[-1].end)
    return out


def _comment_block(lines: LineIndex, comments: list[Token], first: Token) -> str:
    """The comments that sit directly above `first` (no blank line between)."""
    block: list[str] = []
    expect = lines.line(first.start) - 1
    for tok in reversed(comments):
        if lines.line(tok.start) != expect:
            break
        block.append(tok.text)
        expect -= 1
    return "\n".join(reversed(block))


def locate_parse_error(text: str, parse: Callable[[str], object], message: str) -> Location:  # noqa: C901 (over the gate before it existed; split when next changed)
    """Where in `text` the parse error `message` (raised by `parse(text)`) sits."""
    toks = [t for t in tokens(text) if not t.is_comment]
    if not toks:
        return Location(1, 1)

    def fails_early(k: int) -> bool:  # does the prefix of k tokens fail with a non-EOF error?
        try:
            parse(text[: toks[k - 1].end])
        except ValueError as exc:
            return not any(m in str(exc) for m in _EOF_MESSAGES)
        return False

    if any(m in message for m in _EOF_MESSAGES):
        return line_col(text, toks[-1].end)
    lo, hi = 1, len(toks)
    if fails_early(hi):
        while lo < hi:
            mid = (lo + hi) // 2
            if fails_early(mid):
                hi = mid
            else:
                lo = mid + 1
        # A syntax error names the token it stopped at; a semantic one fails only at the end
        # of its construct, so look for what the message quotes instead.
        if "unexpected token" in message or "invalid token" in message or hi < len(toks):
            # The parser recovers from some errors and reports them a token or two later; the
            # message names the token, so step back to it.
            named = re.search(r"unexpected token `([^`]+)`", message)
            k = hi - 1
            if named:
                k = next((i for i in range(hi - 1, -1, -1) if toks[i].text == named.group(1)), k)
            return line_col(text, toks[k].start)
    dup = re.search(r"duplicate annotation: @(\w+)", message)
    if dup:  # the second occurrence is the one at fault
        seen = [m.start() for m in re.finditer(rf"@{dup.group(1)}\b", text)]
        if len(seen) > 1:
            return line_col(text, seen[1])
    quoted = quoted_names(message)
    for tok in toks:
        if tok.text.strip('"') in quoted:
            return line_col(text, tok.start)
    for name in quoted:  # a qualified name such as Cloister::Nope spans several tokens
        at = text.find(name)
        if at >= 0:
            return line_col(text, at)
    return line_col(text, toks[0].start)


def quoted_names(message: str) -> list[str]:
    """Names a Cedar message quotes: `backticked` ones, and the one after "type: "."""
    names = re.findall(r"`([^`]+)`", message)
    m = re.search(r"(?:type|name|function|method|effect): ([A-Za-z_][A-Za-z0-9_:]*)\s*$", message)
    if m:
        names.append(m.group(1))
    return names
