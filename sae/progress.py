"""Progress for every loop a user waits on: the one helper over tqdm, and one-line phase statuses.

On a terminal, `progress_bar` is a tqdm bar (redrawn at most twice a second). When stderr is not a
terminal (a log file, a pipe, CI), the same calls print plain lines instead: one per 10 % of the
total and one at the end, never a carriage return, so a redirected log stays small and readable.
`SPARSE_CIRCUITS_PROGRESS=lines` (or `bars`) forces either mode. `status(...)` prints one plain line
for a phase that has no loop of its own (a fetch, a conversion, an IOI search phase).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, TextIO

MODE_VARIABLE = "SPARSE_CIRCUITS_PROGRESS"


def use_bars(stream: TextIO | None = None) -> bool:
    """Whether progress is drawn as bars (stderr is a terminal) or printed as plain lines."""
    forced = os.environ.get(MODE_VARIABLE, "").strip().lower()
    if forced in ("bars", "bar", "tty"):
        return True
    if forced in ("lines", "line", "plain"):
        return False
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, initial: int = 0, stream: TextIO | None = None):
    """A tqdm bar on a terminal, plain lines otherwise (see module docstring), nothing when not `enabled`.

    Supports what the loops here use: iteration, `update(n)`, `set_postfix(...)`, `close()`, `with`.
    """
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    stream = stream or sys.stderr
    if use_bars(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream, mininterval=0.5,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, stream=stream)


def status(message: str, enabled: bool = True, stream: TextIO | None = None) -> None:
    """One plain line of progress (on stderr, flushed) for a phase without a loop of its own."""
    if enabled:
        stream = stream or sys.stderr
        print(message, file=stream, flush=True)


def format_bytes(size: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as download sizes are usually given)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


class LineProgress:
    """Progress as plain lines: `desc: 30% (3/10 step, 1.2 s)` at each tenth, `desc: done ...` at the end.

    Without a total, a line at most every 30 s and one at the end."""

    UNKNOWN_TOTAL_INTERVAL = 30.0

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, stream: TextIO | None = None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.stream, self.postfix = initial, stream or sys.stderr, ""
        self.start = self.last_print = time.perf_counter()
        self.tenth = self._tenth()
        self.closed = False

    def __len__(self) -> int:
        return self.total or 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tenth(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.total:
            tenth = self._tenth()
            if tenth > self.tenth and self.n < self.total:
                self.tenth = tenth
                self._print(f"{100 * self.n // self.total}% ({self.n}/{self.total} {self.unit}, "
                            f"{now - self.start:.1f} s)")
        elif now - self.last_print >= self.UNKNOWN_TOTAL_INTERVAL:
            self._print(f"{self.n} {self.unit}, {now - self.start:.1f} s")

    def set_postfix(self, values: dict | None = None, refresh: bool = True, **more) -> None:
        values = {**(values or {}), **more}
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        counted = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        self._print(f"done, {counted} {self.unit} in {time.perf_counter() - self.start:.1f} s")

    def _print(self, text: str) -> None:
        self.last_print = time.perf_counter()
        postfix = f" [{self.postfix}]" if self.postfix else ""
        prefix = f"{self.desc}: " if self.desc else ""
        print(f"{prefix}{text}{postfix}", file=self.stream, flush=True)
