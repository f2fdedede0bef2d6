"""The one progress helper: bars on a terminal, plain lines (no carriage returns) in a redirected log."""

from __future__ import annotations

import io

import pytest

from sae.progress import LineProgress, format_bytes, progress_bar, status, use_bars


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_redirected_progress_prints_plain_lines(monkeypatch):
    monkeypatch.delenv("SPARSE_CIRCUITS_PROGRESS", raising=False)
    log = io.StringIO()
    with progress_bar(total=1000, desc="training SAEs", unit="step", stream=log) as bar:
        for step in range(1000):
            bar.update(1)
            bar.set_postfix({"l0": step})
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 11  # one per tenth and one at the end, not one per step
    assert lines[-1].startswith("training SAEs: done, 1000/1000 step in")
    assert "l0=" in lines[-1]


def test_iterating_redirected_progress_and_disabled_progress():
    log = io.StringIO()
    assert list(progress_bar(range(5), desc="scan", stream=log)) == [0, 1, 2, 3, 4]
    assert "\r" not in log.getvalue() and log.getvalue().splitlines()[-1].startswith("scan: done, 5/5")
    quiet = io.StringIO()
    assert list(progress_bar(range(3), desc="scan", enabled=False, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""
    status("phase done", enabled=False, stream=quiet)
    assert quiet.getvalue() == ""


def test_terminal_gets_a_bar_and_the_variable_forces_a_mode(monkeypatch):
    monkeypatch.delenv("SPARSE_CIRCUITS_PROGRESS", raising=False)
    assert use_bars(FakeTerminal()) and not use_bars(io.StringIO())
    assert not isinstance(progress_bar(range(2), stream=FakeTerminal()), LineProgress)
    monkeypatch.setenv("SPARSE_CIRCUITS_PROGRESS", "lines")
    assert isinstance(progress_bar(range(2), stream=FakeTerminal()), LineProgress)
    monkeypatch.setenv("SPARSE_CIRCUITS_PROGRESS", "bars")
    assert use_bars(io.StringIO())


@pytest.mark.parametrize("size, shown", [(512, "512 B"), (1_234_567, "1.2 MB"), (3.2e9, "3.2 GB")])
def test_format_bytes(size, shown):
    assert format_bytes(size) == shown
