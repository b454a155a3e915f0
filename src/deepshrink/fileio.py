"""Atomic file writes: outputs appear whole or not at all, and never replace the input.

Temporaries are named after the writing process (``.NAME.<pid>.<random>.tmp`` next to the output,
``deepshrink-<pid>-<random>`` directories in ``$TMPDIR``). They are removed when the write ends,
however it ends short of ``kill -9``; after a ``kill -9``, the next write to the same directory
(or the next scratch directory) removes the leftovers of processes that no longer exist.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepshrink.errors import OutputError

_TMP_FILE = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp")
_TMP_DIR = re.compile(r"deepshrink-(?P<pid>\d+)-[^/]+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _remove_stale(directory: Path, pattern: re.Pattern[str], name: str | None = None) -> None:
    """Remove temporaries left in ``directory`` by processes that are gone (``kill -9``)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for e in entries:
        m = pattern.fullmatch(e.name)
        if m and (name is None or m.group("name") == name) and not _alive(int(m.group("pid"))):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                Path(e.path).unlink(missing_ok=True)


def refuse_overwrite(output: str | Path, inputs: tuple[str | Path, ...]) -> None:
    """Raise :class:`OutputError` if ``output`` is (a link to) one of ``inputs``."""
    out = Path(output)
    for p in inputs:
        if Path(p).exists() and out.exists() and os.path.samefile(p, out):
            raise OutputError(f"refusing to overwrite the input file {p}",
                              hint="choose another output path")


@contextmanager
def atomic_path(path: str | Path, *, protect: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success rename it over ``path``.

    ``protect`` lists input files that must never be overwritten by this output. A failure to
    create or write the output is an :class:`OutputError` naming it.
    """
    path = Path(path)
    refuse_overwrite(path, protect)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory", hint="give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path.parent, _TMP_FILE, path.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the output: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory in ``$TMPDIR``, removed on exit (stale ones of dead processes too)."""
    base = Path(tempfile.gettempdir())
    _remove_stale(base, _TMP_DIR)
    d = Path(tempfile.mkdtemp(prefix=f"deepshrink-{os.getpid()}-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, **kw: object) -> None:
    with atomic_path(path, **kw) as tmp:  # type: ignore[arg-type]
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, **kw: object) -> None:
    atomic_write_bytes(path, text.encode(), **kw)
