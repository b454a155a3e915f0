"""Intermediate ("hint") distillation, FitNets style (Romero et al. 2015).

A student module's output is mapped by a small learned adapter to the shape of a teacher
module's output and pulled towards it with a mean-squared error. Modules are chosen by name
(``dict(model.named_modules())`` keys, e.g. ``"3"`` in an ``nn.Sequential`` or ``"layers.1"``),
and their outputs are captured with forward hooks, so neither model's code changes.

Adapters: a 1x1 convolution when both features are (N, C, H, W) (followed by adaptive average
pooling if the spatial sizes differ); otherwise a linear map between the flattened features.
The adapters are built on the first batch (when the shapes are known) and trained by their own
Adam optimizer, stepped after the student's, so the shared loop's optimizer and schedule are
untouched and the adapters never end up in the student's checkpoint. Unlike the original
two-stage FitNets recipe, the hint term is simply added to the KD loss for the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink import distributed
from deepshrink.distill.teachers import FeatureTap


class HintAdapter(nn.Module):
    """Maps a student feature of shape ``s_shape`` to a teacher feature of shape ``t_shape``
    (shapes without the batch dimension)."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__()
        self.t_shape = tuple(t_shape)
        self.conv = len(s_shape) == 3 and len(t_shape) == 3
        if self.conv:
            self.map: nn.Module = nn.Conv2d(s_shape[0], t_shape[0], 1)
        else:
            self.map = nn.Linear(math.prod(s_shape), math.prod(t_shape))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if self.conv:
            out = self.map(s)
            if tuple(out.shape[-2:]) != self.t_shape[-2:]:
                out = F.adaptive_avg_pool2d(out, self.t_shape[-2:])
            return out
        return self.map(s.flatten(1)).view(s.shape[0], *self.t_shape)


class Hints:
    """Hooks, adapters and the hint loss for ``{student_module: teacher_module}`` pairs."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, pairs: dict[str, str],
                 weight: float = 1.0) -> None:
        self.pairs = dict(pairs)
        self.weight = weight
        self.student_tap = FeatureTap(student, list(self.pairs), "student")
        # teacher is None when its features come from a cache instead of a live forward.
        self.teacher_tap = FeatureTap(teacher, list(self.pairs.values()), "teacher") \
            if teacher is not None else None
        self.adapters: nn.ModuleList | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _build(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor], lr: float) -> None:
        self.adapters = nn.ModuleList(HintAdapter(s.shape[1:], t.shape[1:])
                                      for s, t in zip(s_feats, t_feats, strict=True))
        self.adapters.to(s_feats[0].device)
        # Data-parallel: the adapters live outside the DDP model; start them equal everywhere.
        distributed.broadcast(p.data for p in self.adapters.parameters())
        self.optimizer = torch.optim.Adam(self.adapters.parameters(), lr=lr)

    def loss(self, teacher_feats: Sequence[torch.Tensor] | None = None, lr: float = 1e-3) -> torch.Tensor:
        """Weighted mean over pairs of MSE(adapter(student feature), teacher feature).
        ``teacher_feats`` are cached features; None reads the live teacher's hooks."""
        s_feats = self.student_tap.get()
        if teacher_feats is None:
            assert self.teacher_tap is not None, "no cached teacher features and no live teacher"
            teacher_feats = self.teacher_tap.get()
        t_feats = [t.detach().float() for t in teacher_feats]
        if self.adapters is None:
            self._build(s_feats, t_feats, lr)
        assert self.adapters is not None
        terms = [F.mse_loss(a(s.float()), t) for a, s, t in zip(self.adapters, s_feats, t_feats, strict=True)]
        return self.weight * torch.stack(terms).mean()

    def step(self) -> None:
        """Update the adapters (after the loss's backward pass) and clear their gradients."""
        if self.optimizer is not None:
            assert self.adapters is not None
            distributed.average_gradients(self.adapters.parameters())  # as DDP does for the student
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def remove(self) -> None:
        self.student_tap.remove()
        if self.teacher_tap is not None:
            self.teacher_tap.remove()
