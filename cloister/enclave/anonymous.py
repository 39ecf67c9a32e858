"""A budget of individual log entries for anonymous denials (docs/decisions/0009).

An anonymous denial is one made before the enclave knew who was calling: the token did not
verify (or named no agent of the bundle), or the arguments were refused before the token was
looked at. Anyone who can reach the relay can cause one, so they cannot each cost a log entry:
per window of `WINDOW_MS`, the first `PER_WINDOW` get their own decision entry, and the rest are
counted. The count of a window is appended as one `DenialsEntry` (count, first and last time, by
deny code, and the SHA-256 of the first one's decision entry) before the first decision of a
later window. So anonymous requests add at most `PER_WINDOW + 1` entries per window, whatever
their rate: 660 per hour with the values below.

A denial that is only counted is still a denial, answered at once: nothing is acknowledged
that is not in the log, and the count of a window is held in the enclave's memory until it is
appended (a stop loses it; the denials it counted changed no state).

Not thread-safe: `EnclaveCore` uses it under the sequencer lock only.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from cloister.verify.entries import DecisionEntry, DenialsEntry, encode_entry

WINDOW_MS = 60_000
PER_WINDOW = 10


class AnonymousDenials:
    def __init__(self, *, window_ms: int = WINDOW_MS, per_window: int = PER_WINDOW) -> None:
        self._window_ms = window_ms
        self._per_window = per_window
        self._window = -1  # the window the counts below belong to
        self._logged = 0  # anonymous denials of that window logged one by one
        self._count = 0  # ... and only counted
        self._first_ms = 0
        self._last_ms = 0
        self._codes: Counter[str] = Counter()
        self._sample = b""

    def _number(self, now_ms: int) -> int:
        return max(self._window, now_ms // self._window_ms)  # a clock that steps back stays in its window

    def closed(self, now_ms: int) -> DenialsEntry | None:
        """The count of an earlier window, to append now (it stays here until `settle`)."""
        if not self._count or self._number(now_ms) == self._window:
            return None
        return DenialsEntry(
            time_ms=max(now_ms, self._last_ms),
            first_ms=self._first_ms,
            last_ms=self._last_ms,
            count=self._count,
            codes=dict(self._codes),
            sample_sha256=self._sample,
        )

    def has_room(self, now_ms: int) -> bool:
        """Whether an anonymous denial now gets its own entry."""
        return self._number(now_ms) != self._window or self._logged < self._per_window

    def settle(self, now_ms: int, denial: DecisionEntry | None, *, logged: bool) -> None:
        """After the append of a decision (with the count `closed` offered before it, if any):
        `denial` is that decision when it was an anonymous denial, `logged` whether it got its
        own entry (`has_room`) or is to be counted."""
        number = self._number(now_ms)
        if number != self._window:
            self._window, self._logged, self._count, self._codes = number, 0, 0, Counter()
        if denial is None:
            return
        if logged:
            self._logged += 1
            return
        if not self._count:
            self._first_ms, self._sample = now_ms, hashlib.sha256(encode_entry(denial)).digest()
        self._count += 1
        self._last_ms = now_ms if self._count == 1 else max(self._last_ms, now_ms)
        self._codes[denial.code] += 1
