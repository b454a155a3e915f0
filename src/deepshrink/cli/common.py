"""Shared CLI plumbing: one-line errors with a hint, and --json output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from deepshrink import distributed
from deepshrink.errors import ConfigError, DeepShrinkError
from deepshrink.progress import console as progress_console

F = TypeVar("F", bound=Callable[..., Any])
# Wide enough for the results tables when stdout is a pipe or file (rich defaults to 80 there).
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object instead of tables.")
DEVICE_OPTION = typer.Option(None, "--device", help="cpu, cuda (under torchrun: each process's own "
                             "GPU), cuda:N or auto. Default: the config's (cpu).")


def quiet_unless_main() -> None:
    """Launched by torchrun, only rank 0 prints: results, notes ("wrote ..."), progress and
    deepshrink's one-line errors (the same on every rank; a crash's traceback still shows, and
    torchrun names the rank that failed)."""
    if not distributed.is_main():
        out.quiet = err.quiet = progress_console.quiet = True


def friendly_errors(fn: F) -> F:
    """Turn deepshrink (and common user) errors into one readable line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeepShrinkError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc.args[0]))}", highlight=False, soft_wrap=True)
            if exc.hint:
                err.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            err.print(f"[red]error:[/red] {escape(str(exc.filename))}: {exc.strerror}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def json_object(text: str | None, option: str) -> dict[str, Any]:
    """Parse an option's value as a JSON object ({} when absent), naming the option on error."""
    if not text:
        return {}
    try:
        val = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON: {exc}") from exc
    if not isinstance(val, dict):
        raise ConfigError(f"{option} must be a JSON object")
    return val


def emit_json(obj: Any) -> None:
    if not distributed.is_main():
        return
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
