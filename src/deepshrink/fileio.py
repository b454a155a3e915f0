"""Atomic file writes: outputs appear whole or not at all, and never replace the input."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepshrink.errors import DeepShrinkError


@contextmanager
def atomic_path(path: str | Path, *, protect: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success rename it over ``path``.

    ``protect`` lists input files that must never be overwritten by this output.
    """
    path = Path(path)
    for p in protect:
        if Path(p).exists() and path.exists() and os.path.samefile(p, path):
            raise DeepShrinkError(
                f"refusing to overwrite the input file {p}", hint="choose another output path"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, **kw: object) -> None:
    with atomic_path(path, **kw) as tmp:  # type: ignore[arg-type]
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, **kw: object) -> None:
    atomic_write_bytes(path, text.encode(), **kw)
