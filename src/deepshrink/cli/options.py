"""Options every command takes, added to each registered command in one place:

- ``--import MODULE`` or ``--import path/to/file.py`` (repeatable) imports the code that defines a
  user's model before the command runs. It is also the safe-loading opt-in: a model file may name
  ``module:callable`` architectures only from modules given here (``load(path, trust=[...])``).
  The current directory is importable (appended to ``sys.path``, so it never shadows an installed
  package), the way ``python -c`` users expect.
- ``--threads N``: torch (and ONNX Runtime) threads; default: the physical cores this process may
  use, or ``$DEEPSHRINK_THREADS`` (``bench/results/cli_threads.json``: more threads than cores is
  slower, never faster).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer

from deepshrink.errors import ConfigError, ModelError

MAX_THREADS = 1024
THREADS_ENV = "DEEPSHRINK_THREADS"  # the default of --threads when set (e.g. 1 in the test suite)


@dataclasses.dataclass
class Session:
    """What the common options chose, read by the commands (one process runs one command)."""

    trust: tuple[str, ...] = ()
    threads: int = 1
    tokenizer: str | None = None
    arch: str | None = None  # --arch: the architecture a bare state_dict file's weights go into
    arch_args: tuple[str, ...] = ()  # --arch-arg NAME=VALUE


SESSION = Session()


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(),
                       (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _cwd_importable() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _import_file(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"--import {path}: no such file", hint="give a .py file or a module name")
    name = path.stem
    if not name.isidentifier():
        raise ConfigError(f"--import {path}: {name!r} is not a valid module name",
                          hint="rename the file to letters, digits and underscores")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ModelError(f"--import {path}: the file raised {type(exc).__name__}: {str(exc)[:200]}",
                         hint="run `python " + str(path) + "` to see the full error") from exc
    return name


def import_user_code(spec: str) -> str:
    """Import ``spec`` (a dotted module name or a ``.py`` path); returns the module name to trust."""
    if spec.endswith(".py") or os.sep in spec:
        return _import_file(Path(spec))
    if not all(part.isidentifier() for part in spec.split(".")):
        raise ConfigError(f"--import {spec!r} is neither a module name (a.b.c) nor a .py file")
    _cwd_importable()
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--import {spec}: no module named {exc.name!r}",
                          hint="run from the folder that holds it, add that folder to PYTHONPATH, "
                               "or give the .py file's path") from None
    except Exception as exc:
        raise ModelError(f"--import {spec}: importing it raised {type(exc).__name__}: "
                         f"{str(exc)[:200]}", hint=f"run `python -c 'import {spec}'` to see why") from exc
    return spec


def apply(imports: list[str], threads: int | None, tokenizer: Path | None = None,
          arch: str | None = None, arch_args: list[str] | None = None) -> None:
    """Import the user's code (and trust it for loading), set the thread count, the tokenizer and
    the architecture for state_dict files."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    _cwd_importable()
    SESSION.trust = tuple(import_user_code(s) for s in imports)
    SESSION.threads = threads or int(os.environ.get(THREADS_ENV) or 0) or physical_cores()
    torch.set_num_threads(SESSION.threads)
    SESSION.tokenizer = str(tokenizer.resolve()) if tokenizer is not None else None
    SESSION.arch, SESSION.arch_args = arch, tuple(arch_args or ())


_EXTRA = [
    inspect.Parameter("import_", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                      default=typer.Option([], "--import", help="Module (a.b.c) or .py file that "
                                           "defines your model; repeat. Also allows model files to "
                                           "name code from it (safe-loading opt-in).")),
    inspect.Parameter("threads_", inspect.Parameter.KEYWORD_ONLY, annotation=int | None,
                      default=typer.Option(None, "--threads", help="torch / ONNX Runtime threads "
                                           "(default: physical cores).")),
    inspect.Parameter("tokenizer_", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                      default=typer.Option(None, "--tokenizer", help="Tokenizer folder for text data "
                                           "(default: the one the model file records, or the model "
                                           "folder's own).")),
    inspect.Parameter("arch_", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                      default=typer.Option(None, "--arch", help="For a torch.save state_dict file: the "
                                           "registry name or module:callable whose weights it holds.")),
    inspect.Parameter("arch_arg_", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                      default=typer.Option([], "--arch-arg", help="NAME=VALUE passed to the --arch "
                                           "factory (repeat), e.g. in_size=28.")),
]


def with_common_options(fn: Callable[..., Any], on_error: Callable[[Callable[..., Any]], Any]
                        ) -> Callable[..., Any]:
    """``fn`` with ``--import`` and ``--threads`` added to its command-line signature.
    ``on_error`` wraps the option handling so its errors are one line too."""
    sig = inspect.signature(fn, eval_str=True)
    handle = on_error(apply)

    @functools.wraps(fn)
    def wrapper(*args: Any, import_: list[str], threads_: int | None, tokenizer_: Path | None,
                arch_: str | None, arch_arg_: list[str], **kwargs: Any) -> Any:
        from deepshrink.models import trusting

        handle(import_, threads_, tokenizer_, arch_, arch_arg_)
        with trusting(SESSION.trust):  # also the files pipelines write and read back
            return fn(*args, **kwargs)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()]
    wrapper.__signature__ = sig.replace(parameters=[*params, *_EXTRA])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    del wrapper.__wrapped__  # typer must read the new signature, not the original's
    return wrapper
