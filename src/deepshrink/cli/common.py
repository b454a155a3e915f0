"""Shared CLI plumbing: one-line errors with a hint, and --json output."""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import typer
from rich.console import Console
from rich.markup import escape

from deepshrink.errors import ConfigError, DataError, DeepShrinkError

F = TypeVar("F", bound=Callable[..., Any])
# Wide enough for the results tables when stdout is a pipe or file (rich defaults to 80 there).
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object instead of tables.")


def fail(message: str, hint: str | None = None, code: int = 2) -> typer.Exit:
    """Print ``error: message`` (and the hint) on stderr; return the Exit to raise."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[yellow]hint:[/yellow] {escape(hint)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def friendly_errors(fn: F) -> F:
    """Turn deepshrink (and common user) errors into one readable line and exit code 2.

    The commands raise deepshrink errors with their own messages for every bad input they know
    of; the last clause is a fallback so that even an unforeseen failure is one line, not a
    traceback (exit code 1, with a hint that it is a bug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeepShrinkError as exc:
            raise fail(str(exc.args[0]), exc.hint) from None
        except OSError as exc:  # a file named on the command line: missing, a directory, disk full
            name = exc.filename if exc.filename is not None else "I/O"
            raise fail(f"{name}: {exc.strerror or exc}") from None
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None
        except MemoryError:
            raise fail("out of memory", "use a smaller model, batch or file", code=1) from None
        except Exception as exc:
            raise fail(f"unexpected {type(exc).__name__}: {str(exc)[:300]}",
                       "this is a deepshrink bug; please report the command line", code=1) from None

    return wrapper  # type: ignore[return-value]


def check_inputs(model: Any, example: torch.Tensor, what: str) -> None:
    """Run ``model`` on one example so that a size mismatch is a clear error, not a torch trace."""
    try:
        with torch.no_grad():
            model.eval()(example)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise DataError(f"the model cannot take {what} of shape {list(example.shape[1:])}: "
                        f"{str(exc).splitlines()[0][:200]}",
                        hint="use data of the size the model was trained on") from None


def first_images(bundle: Any, split: str) -> torch.Tensor:
    """One example of ``split`` (a batch of 1), for :func:`check_inputs`."""
    for x, _ in bundle.loader(split, 1, shuffle=False):
        return x
    raise DataError(f"the {split} split of {bundle.name} is empty")


def parse_shape(text: str, option: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> (1, 28, 28): positive ints, at most 8 of them, a modest total."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not 1 <= len(shape) <= 8 or any(d < 1 for d in shape) or math.prod(shape) > 1 << 26:
        raise ConfigError(f"{option} must be 1 to 8 positive sizes (at most 2^26 elements), got {text!r}")
    return shape


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
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
