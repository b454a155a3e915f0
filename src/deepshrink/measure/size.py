"""Real serialized bytes: what a model costs on disk."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from deepshrink.fileio import scratch_dir


def file_bytes(path: str | Path) -> int:
    """Size of a file on disk, in bytes; of a folder (a ``save_pretrained`` model), every file in it."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return os.path.getsize(path)


def fp32_safetensors_bytes(model: nn.Module) -> int:
    """Bytes of the model's state saved as an fp32 safetensors file (the uncompressed baseline).

    The file is really written (to a temp dir) and measured; nothing is estimated.
    """
    with scratch_dir() as d:
        path = Path(d) / "model.safetensors"
        fp32 = _as_fp32(model)
        save_model(fp32, str(path))
        return file_bytes(path)


def _as_fp32(model: nn.Module) -> nn.Module:
    if all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point()):
        return model
    import copy

    return copy.deepcopy(model).float()


def size_change(before: int, after: int) -> str:
    """``"3.89x smaller"``, or ``"1.25x larger"`` when the result grew (never "0.80x smaller")."""
    if after <= 0 or before <= 0:
        return "size unknown"
    if after <= before:
        return f"{before / after:.2f}x smaller"
    return f"{after / before:.2f}x larger"
