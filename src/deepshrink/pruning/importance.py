"""Channel importance: one score per channel of every group, higher = keep.

Criteria are registered by name; :func:`score_groups` runs one. Scores aggregate over every layer
of a group (a residual group sums its producers' filter norms, a flattened channel its block of
features), so coupled layers are judged together.

========== ======================================================================= =========
name       score of channel c                                                      data
========== ======================================================================= =========
l1         sum over producing layers of the L1 norm of c's output filter / row     none
l2         sqrt of the summed squared weights of c's output filters / rows         none
activation mean |a| of c where the consumers read it (after the activation)        batches
apoz       1 - average percentage of zeros (a <= 0) of c at its consumers          batches
taylor     mean over samples of |sum of a * dL/da| of c at its consumers            labelled
========== ======================================================================= =========

The data criteria hook the *inputs* of the consuming layers, which is exactly the signal a removed
channel stops contributing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.errors import ConfigError, ModelError
from deepshrink.pruning.graph import ChannelGroup

Batch = tuple[Any, torch.Tensor | None]
ImportanceFn = Callable[[nn.Module, Sequence[ChannelGroup], Sequence[Batch]], list[torch.Tensor]]
_IMPORTANCE: dict[str, ImportanceFn] = {}
_NEEDS_DATA: set[str] = set()


def register_importance(name: str, needs_data: bool = False) -> Callable[[ImportanceFn], ImportanceFn]:
    """Decorator: ``fn(model, groups, batches) -> [scores per group]`` becomes criterion ``name``."""

    def wrap(fn: ImportanceFn) -> ImportanceFn:
        _IMPORTANCE[name] = fn
        if needs_data:
            _NEEDS_DATA.add(name)
        return fn

    return wrap


def list_importance() -> list[str]:
    return sorted(_IMPORTANCE)


def needs_data(name: str) -> bool:
    return name in _NEEDS_DATA


def as_batches(data: Any, limit: int) -> list[Batch]:
    """Normalise calibration data (a DataLoader, a list of ``(x, y)`` or of tensors, a tensor)."""
    if data is None:
        return []
    if isinstance(data, torch.Tensor):
        return [(data, None)]
    out: list[Batch] = []
    for batch in data:
        if isinstance(batch, (tuple, list)):
            out.append((batch[0], batch[1] if len(batch) > 1 else None))
        else:
            out.append((batch, None))
        if len(out) >= limit:
            break
    return out


def score_groups(model: nn.Module, groups: Sequence[ChannelGroup], name: str,
                 batches: Sequence[Batch] = ()) -> list[torch.Tensor]:
    """Scores (float tensors of ``group.size``) for every group with criterion ``name``."""
    if name not in _IMPORTANCE:
        raise ConfigError(f"unknown importance {name!r}", hint=f"known: {', '.join(list_importance())}")
    if needs_data(name) and not batches:
        raise ConfigError(f"importance {name!r} needs calibration batches",
                          hint="pass calibration=<DataLoader or list of (x, y)> to prune_channels")
    with torch.no_grad() if name != "taylor" else torch.enable_grad():
        return _IMPORTANCE[name](model, groups, batches)


# -- weight norms ---------------------------------------------------------------------------------
def out_rows(module: nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """The weights that produce output channels ``positions`` of ``module``, one row each."""
    w = module.weight.detach()
    if isinstance(module, nn.Embedding):
        return w[:, positions].t()
    return w.reshape(w.shape[0], -1)[positions]


def _norm_scores(model: nn.Module, groups: Sequence[ChannelGroup], p: int) -> list[torch.Tensor]:
    modules = dict(model.named_modules())
    scores = []
    for g in groups:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            if m.role != "out":
                continue
            pos = torch.as_tensor(m.positions, dtype=torch.long)
            rows = out_rows(modules[m.module], pos).double()
            per_row = rows.abs().sum(1) if p == 1 else rows.pow(2).sum(1)
            acc.index_add_(0, torch.as_tensor(m.channels, dtype=torch.long), per_row)
        scores.append(acc if p == 1 else acc.sqrt())
    return scores


@register_importance("l1")
def l1_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch]
                  ) -> list[torch.Tensor]:
    return _norm_scores(model, groups, 1)


@register_importance("l2")
def l2_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch]
                  ) -> list[torch.Tensor]:
    return _norm_scores(model, groups, 2)


# -- data-based criteria --------------------------------------------------------------------------
def in_axis(module: nn.Module) -> int:
    """The channel axis of a consuming layer's input."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


class _Probe:
    """Forward pre-hooks on every consuming layer; ``stat(x, grad)`` -> per-position values."""

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], with_grad: bool) -> None:
        self.modules = dict(model.named_modules())
        self.groups = groups
        self.sums = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
        self.counts = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
        self.seen: list[tuple[str, torch.Tensor]] = []
        self.with_grad = with_grad
        self.by_module: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for gi, g in enumerate(groups):
            for m in g.members:
                if m.role == "in":
                    self.by_module.setdefault(m.module, []).append(
                        (gi, torch.as_tensor(m.positions, dtype=torch.long),
                         torch.as_tensor(m.channels, dtype=torch.long)))
        if not self.by_module and any(g.blocked is None for g in groups):
            raise ModelError("no consuming layer found to measure activations at")
        self.handles = [self.modules[name].register_forward_pre_hook(self._hook(name))
                        for name in self.by_module]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if self.with_grad:
                if x.requires_grad:
                    x.retain_grad()
                    self.seen.append((name, x))
            else:
                self.seen.append((name, x.detach()))
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _flat(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """(N, positions-of-other-dims, C) view of a consumer input, channel axis last."""
    x = x.movedim(in_axis(module), -1)
    return x.reshape(x.shape[0], -1, x.shape[-1]).double()


def _activation_scores(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch],
                       stat: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    probe = _Probe(model, groups, with_grad=False)
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            probe.seen.clear()
            model(*x) if isinstance(x, tuple) else model(x)
            for name, a in probe.seen:
                v = stat(_flat(a, probe.modules[name]))  # (N, K, C) -> per element value
                per_pos = v.sum((0, 1))
                n = v.shape[0] * v.shape[1]
                for gi, pos, ch in probe.by_module[name]:
                    probe.sums[gi].index_add_(0, ch, per_pos[pos])
                    probe.counts[gi].index_add_(0, ch, torch.full((len(pos),), float(n), dtype=torch.float64))
    finally:
        probe.close()
        model.train(was_training)
    return [s / c.clamp(min=1) for s, c in zip(probe.sums, probe.counts, strict=True)]


@register_importance("activation", needs_data=True)
def activation_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch]
                          ) -> list[torch.Tensor]:
    return _activation_scores(model, groups, batches, torch.abs)


@register_importance("apoz", needs_data=True)
def apoz_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch]
                    ) -> list[torch.Tensor]:
    # After a ReLU the non-positive values are exactly the zeros; after GELU they are squashed to ~0.
    zeros = _activation_scores(model, groups, batches, lambda v: (v <= 0).double())
    return [1.0 - z for z in zeros]


@register_importance("taylor", needs_data=True)
def taylor_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch]
                      ) -> list[torch.Tensor]:
    from deepshrink.train.loop import logits_of

    if any(y is None for _, y in batches):
        raise ConfigError("importance 'taylor' needs labelled batches (x, y)",
                          hint="pass calibration=a DataLoader of (inputs, labels)")
    probe = _Probe(model, groups, with_grad=True)
    was_training = model.training
    model.eval()
    n_samples = 0
    try:
        for x, y in batches:
            probe.seen.clear()
            out = model(*x) if isinstance(x, tuple) else model(x)
            loss = F.cross_entropy(logits_of(out), y)
            model.zero_grad(set_to_none=True)
            loss.backward()
            n_samples += int(y.shape[0])
            for name, a in probe.seen:
                if a.grad is None:
                    continue
                mod = probe.modules[name]
                ag = (_flat(a.detach(), mod) * _flat(a.grad, mod)).sum(1)  # (N, C): per sample
                for gi, pos, ch in probe.by_module[name]:
                    per = torch.zeros(ag.shape[0], groups[gi].size, dtype=torch.float64)
                    per.index_add_(1, ch, ag[:, pos])
                    probe.sums[gi] += per.abs().sum(0)
    finally:
        probe.close()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return [s / max(1, n_samples) for s in probe.sums]


def rank(scores: torch.Tensor) -> list[int]:
    """Channel indices from least to most important (ties by index)."""
    return torch.sort(scores, stable=True).indices.tolist()

