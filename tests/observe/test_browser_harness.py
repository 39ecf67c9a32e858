"""The browser harness sees what it must: rendered DOM, and console messages (a script error, a
blocked load) that would make a page fail its test."""

from __future__ import annotations

from pathlib import Path

from cloister.audit.report import page
from tests.observe.browser import render


def test_console_messages_are_seen(tmp_path: Path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><p>x</p><script>console.error("boom-error")</script></body></html>')
    assert any("boom-error" in m for m in render(bad.as_uri()).console)


def test_the_report_page_shell_blocks_scripts_and_loads(tmp_path: Path) -> None:
    # The CSP the report and /log/ page carry: an injected script or a remote image is blocked,
    # and the block itself shows up as a console message (so a test would fail on it).
    f = tmp_path / "inj.html"
    f.write_text(page("t", '<p id="ok">fine</p><script>document.body.innerHTML="pwned"</script>'))
    r = render(f.as_uri())
    assert 'id="ok"' in r.dom and "pwned" not in r.dom.split("</script>")[-1]
    assert any("Content Security Policy" in m for m in r.console)
    clean = tmp_path / "clean.html"
    clean.write_text(page("t", '<p id="ok">fine</p>'))
    assert render(clean.as_uri()).console == []
