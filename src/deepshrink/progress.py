"""One place for progress bars, so every long loop looks the same and can be silenced."""

from __future__ import annotations

import os
import sys

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


def progress_enabled(requested: bool = True) -> bool:
    return requested and os.environ.get("DEEPSHRINK_NO_PROGRESS", "") == "" and sys.stderr.isatty()


def make_progress(enabled: bool = True) -> Progress:
    """A rich progress bar on stderr (stdout stays clean for tables and --json)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not progress_enabled(enabled), transient=False,
    )
