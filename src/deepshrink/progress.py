"""One place for progress bars, so every long loop looks the same and can be silenced."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
T = TypeVar("T")


def progress_enabled(requested: bool = True) -> bool:
    return requested and os.environ.get("DEEPSHRINK_NO_PROGRESS", "") == "" and sys.stderr.isatty()


def make_progress(enabled: bool = True) -> Progress:
    """A rich progress bar on stderr (stdout stays clean for tables and --json)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not progress_enabled(enabled), transient=False,
    )


def status_lines_enabled(requested: bool = True) -> bool:
    """Periodic one-line status on stderr: when progress is wanted but stderr is no terminal
    (a log file, CI, a pipe), where a live bar would print nothing useful."""
    return requested and os.environ.get("DEEPSHRINK_NO_PROGRESS", "") == "" and not sys.stderr.isatty()


class Ticker:
    """Prints ``description: done/total (pct), elapsed`` at most every ``every_s`` seconds, and
    a final line when the work took longer than ``every_s`` — the non-terminal form of a bar."""

    def __init__(self, description: str, total: int | None, every_s: float = 5.0) -> None:
        self.description, self.total, self.every_s = description, total, every_s
        self.start = self.last = time.perf_counter()
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            console.print(self.line(now), highlight=False, soft_wrap=True)

    def line(self, now: float) -> str:
        of = f"/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.description}: {self.done}{of}, {now - self.start:.0f} s"

    def close(self) -> None:
        now = time.perf_counter()
        if now - self.start >= self.every_s:
            console.print(self.line(now) + " — done", highlight=False, soft_wrap=True)


def track(iterable: Iterable[T], description: str, *, total: int | None = None,
          enabled: bool = True, every_s: float = 5.0) -> Iterator[T]:
    """Iterate with a live bar on a terminal, periodic status lines elsewhere, or silently."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if progress_enabled(enabled):
        with make_progress() as bar:
            task = bar.add_task(description, total=total, info="")
            for item in iterable:
                yield item
                bar.advance(task)
        return
    ticker = Ticker(description, total, every_s) if status_lines_enabled(enabled) else None
    for item in iterable:
        yield item
        if ticker:
            ticker.advance()
    if ticker:
        ticker.close()


@contextlib.contextmanager
def step(description: str, *, enabled: bool = True, every_s: float = 2.0) -> Iterator[None]:
    """A step without countable iterations (k-means, an export): a spinner on a terminal, and a
    line saying how long it took elsewhere when it took over ``every_s`` seconds."""
    if progress_enabled(enabled):
        with console.status(description):
            yield
        return
    t0 = time.perf_counter()
    yield
    took = time.perf_counter() - t0
    if status_lines_enabled(enabled) and took >= every_s:
        console.print(f"{description}: {took:.0f} s", highlight=False, soft_wrap=True)
