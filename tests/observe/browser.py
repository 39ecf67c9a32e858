"""Open a page in a real headless browser (Debian's chromium, installed by scripts/_browser.sh)
and return its rendered DOM and every console message it logged.

Chromium's `--enable-logging=stderr` prints each console message (errors, warnings, CSP
violations, failed loads) as an `INFO:CONSOLE` line; the pages under test run no script, so any
console message at all is a finding.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? ?(.*)")


@dataclass
class Rendered:
    dom: str
    console: list[str]


def need_browser() -> None:
    if not CHROMIUM.exists():
        why = os.environ.get("CLOISTER_BROWSER_MISSING") or "no /usr/bin/chromium (scripts/_browser.sh installs it)"
        pytest.skip(f"no headless browser: {why}")


def render(url: str, *, timeout: float = 60) -> Rendered:
    need_browser()
    with tempfile.TemporaryDirectory(prefix="cloister-chromium-") as profile:
        out = subprocess.run(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    console = [m.group(1) for line in out.stderr.splitlines() if (m := CONSOLE.search(line))]
    return Rendered(out.stdout, console)


def rows(dom: str, table_after: str) -> list[list[str]]:
    """The body rows of the first table after the heading `table_after`, as cell texts."""
    start = dom.index(table_after)
    body = dom[start:].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    out = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S):
        cells = re.findall(r"<td>(.*?)</td>", row, re.S)
        out.append([re.sub(r"<[^>]+>", "", c) for c in cells])
    return out
