"""Guards of the compressing commands: a result is written only when its measured accuracy drop
stays within ``--max-drop`` (or with ``--force``), and the commands warn about results that are not
smaller, bit widths the target format stores wider, and layer patterns that match no layer.

The output is first written to a staged file beside it; only a result that passes the guard is
moved into place, so a refused result never replaces (or leaves) a file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import typer

from deepshrink.cli.common import err
from deepshrink.errors import ConfigError, DeepShrinkError
from deepshrink.fileio import refuse_overwrite
from deepshrink.measure import Speedup

DEFAULT_MAX_DROP = 1.0
MAX_DROP = typer.Option(None, "--max-drop", help="Refuse to write a result whose test top-1 drops "
                        f"more than this many points (default {DEFAULT_MAX_DROP} where the data has labels).")
FORCE = typer.Option(False, "--force", help="Write the result even past --max-drop.")


class QualityError(DeepShrinkError):
    """A compressed result lost more accuracy than allowed; nothing was written."""


class Warnings(list[str]):
    """Warnings of one command: printed on stderr as they come, and kept for --json."""

    def add(self, message: str) -> None:
        self.append(message)
        err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def staged(output: Path, inputs: Iterable[Path]) -> Iterator[Path]:
    """A temporary path beside ``output`` (same suffix) to write the result to; call
    :func:`commit` to move it into place. Removed if the command fails or is refused."""
    refuse_overwrite(output, tuple(inputs))
    tmp = output.with_name(f".{output.stem}.staged-{os.getpid()}{output.suffix}")
    try:
        yield tmp
    finally:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def commit(tmp: Path, output: Path) -> None:
    os.replace(tmp, output)


def check_drop(before: float | None, after: float | None, max_drop: float | None, force: bool,
               output: Path, warnings: Warnings) -> float | None:
    """The measured drop in points; :class:`QualityError` past ``max_drop`` unless ``force``."""
    if max_drop is not None and not 0 <= max_drop <= 100:
        raise ConfigError(f"--max-drop must be in [0, 100] points, got {max_drop}")
    if before is None or after is None:
        return None
    drop = 100 * (before - after)
    limit = DEFAULT_MAX_DROP if max_drop is None else max_drop
    if drop > limit:
        what = (f"test top-1 fell {drop:.2f} points ({100 * before:.2f}% -> {100 * after:.2f}%), "
                f"more than --max-drop {limit:g}")
        if not force:
            raise QualityError(f"{what}; {output} was not written",
                               hint="fine-tune (--epochs), compress less, raise --max-drop, or pass "
                                    "--force to write it anyway")
        warnings.add(f"{what}; written anyway (--force)")
    return drop


def ratio_text(before: float, after: float, smaller: str = "smaller", larger: str = "larger") -> str:
    """``before / after`` as "3.20x smaller", or "1.50x larger" when the result grew."""
    if after <= 0 or before <= 0:
        return "n/a"
    r = before / after
    return f"{r:.2f}x {smaller}" if r >= 1 else f"{1 / r:.2f}x {larger}"


def check_size(in_bytes: int, out_bytes: int, warnings: Warnings) -> None:
    if out_bytes >= in_bytes:
        warnings.add(f"the result is not smaller: {out_bytes:,} B vs {in_bytes:,} B for the input")


def check_speed(baseline: Any, candidate: Any, example: Any, warnings: Warnings) -> tuple[Speedup, int]:
    """Time both in one interleaved run; warn when the result is slower or the spread of the
    ratio includes 1.0 (no speedup this machine can measure). Returns the ratio and the batch."""
    from deepshrink.measure import compare_latency, speedup

    lat = compare_latency({"input": baseline, "output": candidate}, example, rounds=3, repeats=10,
                          min_time_s=0.1)
    s, batch = speedup(lat["input"], lat["output"]), lat["input"].batch
    if s.high < 1.0:
        warnings.add(f"the result is slower than the input: {s} at batch {batch}")
    elif s.overlaps_one:
        warnings.add(f"no measurable speedup at batch {batch}: {s}")
    return s, batch


def check_patterns(names: Iterable[str], patterns: Iterable[str], option: str,
                   warnings: Warnings) -> None:
    from deepshrink.config import unmatched_patterns

    names = list(names)
    for p in unmatched_patterns(names, list(patterns)):
        warnings.add(f"{option} pattern {p!r} matches no layer (layers: {', '.join(names[:8])}"
                     f"{', ...' if len(names) > 8 else ''})")


def layer_names(model: Any) -> list[str]:
    """Names of the modules that hold weights (what ``--override`` / ``--ignore`` address)."""
    return [n for n, m in model.named_modules() if n and getattr(m, "weight", None) is not None]
