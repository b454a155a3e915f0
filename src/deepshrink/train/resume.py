"""Training state that survives a restart: ``<checkpoint>.resume.pt`` next to the checkpoint.

Written by the main process after every epoch (atomically), read by every process when
``TrainConfig.resume`` is set (so under torchrun the path must be visible to all of them, e.g.
on a shared filesystem). It holds the model's current weights, the optimizer and schedule
state, the augmentation RNG, the history, the best-so-far weights (``keep_best``) and each
callback's :meth:`~deepshrink.train.Callback.state_dict`. The file is read with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only, nothing
that could import or call code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deepshrink.errors import FormatError
from deepshrink.fileio import atomic_path

FORMAT = "deepshrink-train-state"
VERSION = 1
_REQUIRED = {"format": str, "version": int, "epoch": int, "step": int, "model": dict,
             "optimizer": dict, "scheduler": dict, "aug_rng": torch.Tensor, "history": str,
             "best_val": float, "callbacks": list}


def resume_path(checkpoint: str | Path) -> Path:
    return Path(f"{checkpoint}.resume.pt")


def write_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)


def read_state(path: Path) -> dict[str, Any]:
    """The saved training state, checked field by field; :class:`FormatError` names what is wrong."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, not a traceback
        raise FormatError(f"{path}: not a readable training-state file ({type(exc).__name__}: {exc})",
                          hint="delete it to start training from scratch") from None
    if not isinstance(state, dict):
        raise FormatError(f"{path}: training state must be a dict, got {type(state).__name__}")
    for key, kind in _REQUIRED.items():
        if not isinstance(state.get(key), kind):
            raise FormatError(f"{path}: training state field {key!r} missing or not a {kind.__name__}")
    if state["format"] != FORMAT or state["version"] != VERSION:
        raise FormatError(f"{path}: format {state['format']!r} v{state['version']}, "
                          f"expected {FORMAT!r} v{VERSION}")
    try:
        history = json.loads(state["history"])
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: training state field 'history' is not JSON: {exc}") from None
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise FormatError(f"{path}: training state field 'history' must be a list of objects")
    state["history"] = history
    return state
