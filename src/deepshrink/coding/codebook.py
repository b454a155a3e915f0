"""Codebook-coded tensors: a small codebook plus one index per element (``-1``: pruned zero).

The representation weight sharing produces and the .dsz format stores. It lives here, below
both, so that the file format does not depend on the technique (and the technique may use the
format).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

SHARING_ATTR = "deepshrink_sharing"


@dataclasses.dataclass
class SharedTensor:
    """One shared parameter: float32 ``codebook`` (k,) and int64 ``index`` (param shape),
    with ``-1`` where the weight is pruned (exactly zero)."""

    codebook: torch.Tensor
    index: torch.Tensor

    @property
    def bits(self) -> int:
        return max(1, int(len(self.codebook) - 1).bit_length())

    def weight(self) -> torch.Tensor:
        """The dense weight ``codebook[index]`` with zeros where ``index == -1``."""
        w = self.codebook[self.index.clamp(min=0)]
        return torch.where(self.index >= 0, w, torch.zeros((), dtype=w.dtype))


Sharing = dict[str, SharedTensor]


def get_sharing(model: nn.Module) -> Sharing:
    """The shared tensors of ``model`` by parameter name (empty if never shared)."""
    return getattr(model, SHARING_ATTR, None) or {}


def set_sharing(model: nn.Module, sharing: Sharing) -> None:
    object.__setattr__(model, SHARING_ATTR, sharing)  # plain attribute: never saved as state
