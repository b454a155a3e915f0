"""Unit importance: one score per unit (channel, head, conv group) of every group, higher = keep.

Criteria are registered by name; :func:`score_groups` runs one. Weight criteria score each tensor
dimension of a group (one value per position: the norm of the slice that position cuts) and add
the positions of a unit up. With ``over="producers"`` only the dimensions that *make* the
channels count (weight rows of a Linear, conv filters, embedding columns); with ``over="group"``
(Torch-Pruning's group importance) every parameter dimension the unit removes counts - the
consumers' columns and the norm scales too - each divided by its own mean so that no layer
dominates by scale.

========== ======================================================================= =========
name       score of a unit                                                         data
========== ======================================================================= =========
l1         sum of |w| over the slices the unit removes                             none
l2         sqrt of the summed squares over those slices                            none
activation mean |a| of its channels where consuming layers read them                batches
apoz       1 - average percentage of zeros (a <= 0) of its channels at consumers   batches
taylor     mean over samples of |sum of a * dL/da| at its consumers                labelled
========== ======================================================================= =========

The data criteria hook the *inputs* of the consuming layers, which is exactly the signal a removed
channel stops contributing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.errors import ConfigError, ModelError
from deepshrink.modeling import call, eval_mode, output_tensor
from deepshrink.pruning.graph import ChannelGroup, Graph

Batch = tuple[Any, torch.Tensor | None]
ImportanceFn = Callable[..., list[torch.Tensor]]
_IMPORTANCE: dict[str, ImportanceFn] = {}
_NEEDS_DATA: set[str] = set()


def register_importance(name: str, needs_data: bool = False) -> Callable[[ImportanceFn], ImportanceFn]:
    """Decorator: ``fn(model, groups, batches, *, over, graph) -> [scores per group]``."""

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


def score_groups(model: nn.Module, groups: Sequence[ChannelGroup], name: str,
                 batches: Sequence[Batch] = (), *, over: str = "group",
                 graph: Graph | None = None) -> list[torch.Tensor]:
    """Scores (float64 tensors of ``group.size``) for every group with criterion ``name``."""
    if name not in _IMPORTANCE:
        raise ConfigError(f"unknown importance {name!r}", hint=f"known: {', '.join(list_importance())}")
    if needs_data(name) and not batches:
        raise ConfigError(f"importance {name!r} needs calibration batches",
                          hint="pass calibration=<DataLoader or list of (inputs, labels)>")
    if needs_data(name) and graph is None:
        raise ConfigError(f"importance {name!r} needs the traced graph")
    with torch.no_grad() if name != "taylor" else torch.enable_grad():
        return _IMPORTANCE[name](model, groups, batches, over=over, graph=graph)


# -- weight norms ---------------------------------------------------------------------------------
def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


def _norm_scores(model: nn.Module, groups: Sequence[ChannelGroup], p: int, over: str
                 ) -> list[torch.Tensor]:
    params = _tensors(model)
    scores = []
    for g in groups:
        members = [m for m in g.members if m.tensor in params]
        if over == "producers":
            members = [m for m in members if m.role == "out"] or members
        acc = torch.zeros(g.size, dtype=torch.float64)
        for m in members:
            w = params[m.tensor].detach().double()
            other = [d for d in range(w.dim()) if d != m.dim]
            per = (w.abs().sum(other) if p == 1 else w.pow(2).sum(other)) if other else \
                (w.abs() if p == 1 else w.pow(2))
            if over == "group":
                per = per / per.mean().clamp(min=1e-12)
            acc.index_add_(0, torch.as_tensor(m.units), per[torch.as_tensor(m.positions)])
        scores.append(acc if p == 1 else acc.sqrt())
    return scores


@register_importance("l1")
def l1_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch], *,
                  over: str = "group", graph: Graph | None = None) -> list[torch.Tensor]:
    return _norm_scores(model, groups, 1, over)


@register_importance("l2")
def l2_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch], *,
                  over: str = "group", graph: Graph | None = None) -> list[torch.Tensor]:
    return _norm_scores(model, groups, 2, over)


# -- data-based criteria --------------------------------------------------------------------------
class _Probe:
    """Forward pre-hooks on every consuming module; per-position statistics go to the units."""

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], graph: Graph,
                 with_grad: bool) -> None:
        index = {id(g): i for i, g in enumerate(groups)}
        gindex = {i: index[id(g)] for i, g in enumerate(graph.groups) if id(g) in index}
        self.sums = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
        self.counts = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
        self.sites: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self.axis: dict[str, int] = {}
        for c in graph.consumers:
            pairs = graph.unit_of(c.nodes)
            ok = np.array([gi in gindex for gi in pairs[:, 0].tolist()], dtype=bool)
            if not ok.any():
                continue
            local = np.array([gindex.get(gi, -1) for gi in pairs[:, 0].tolist()])
            for gl in np.unique(local[ok]).tolist():
                sel = np.nonzero(local == gl)[0]
                self.sites.setdefault(c.module, []).append(
                    (gl, torch.as_tensor(sel), torch.as_tensor(pairs[sel, 1])))
            self.axis[c.module] = c.axis
        if not self.sites:
            raise ModelError("no consuming layer found to measure activations at")
        self.seen: list[tuple[str, torch.Tensor]] = []
        self.with_grad = with_grad
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_pre_hook(self._hook(name)) for name in self.sites]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            if self.with_grad:
                if x.requires_grad:
                    x.retain_grad()
                    self.seen.append((name, x))
            else:
                self.seen.append((name, x.detach()))
        return hook

    def flat(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """(N, other positions, C) view of a consumer input, channel axis last."""
        x = x.movedim(self.axis[name], -1)
        return x.reshape(x.shape[0], -1, x.shape[-1]).double()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _activation_scores(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch],
                       graph: Graph, stat: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    probe = _Probe(model, groups, graph, with_grad=False)
    try:
        with eval_mode(model):
            for x, _ in batches:
                probe.seen.clear()
                call(model, x)
                for name, a in probe.seen:
                    v = stat(probe.flat(name, a))
                    per_pos, n = v.sum((0, 1)), v.shape[0] * v.shape[1]
                    for gi, pos, units in probe.sites[name]:
                        probe.sums[gi].index_add_(0, units, per_pos[pos])
                        probe.counts[gi].index_add_(0, units, torch.full((len(pos),), float(n),
                                                                         dtype=torch.float64))
    finally:
        probe.close()
    return [s / c.clamp(min=1) for s, c in zip(probe.sums, probe.counts, strict=True)]


@register_importance("activation", needs_data=True)
def activation_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch],
                          *, over: str = "group", graph: Graph | None = None) -> list[torch.Tensor]:
    return _activation_scores(model, groups, batches, graph, torch.abs)  # type: ignore[arg-type]


@register_importance("apoz", needs_data=True)
def apoz_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch], *,
                    over: str = "group", graph: Graph | None = None) -> list[torch.Tensor]:
    # After a ReLU the non-positive values are exactly the zeros; after GELU they are squashed to ~0.
    zeros = _activation_scores(model, groups, batches, graph,  # type: ignore[arg-type]
                               lambda v: (v <= 0).double())
    return [1.0 - z for z in zeros]


@register_importance("taylor", needs_data=True)
def taylor_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Batch], *,
                      over: str = "group", graph: Graph | None = None) -> list[torch.Tensor]:
    if any(y is None for _, y in batches):
        raise ConfigError("importance 'taylor' needs labelled batches (inputs, labels)",
                          hint="pass calibration=a DataLoader of (inputs, labels)")
    probe = _Probe(model, groups, graph, with_grad=True)  # type: ignore[arg-type]
    n_samples = 0
    try:
        with eval_mode(model):
            for x, y in batches:
                probe.seen.clear()
                loss = F.cross_entropy(output_tensor(call(model, x)), y)
                model.zero_grad(set_to_none=True)
                loss.backward()
                n_samples += int(y.shape[0])
                for name, a in probe.seen:
                    if a.grad is None:
                        continue
                    ag = (probe.flat(name, a.detach()) * probe.flat(name, a.grad)).sum(1)  # (N, C)
                    for gi, pos, units in probe.sites[name]:
                        per = torch.zeros(ag.shape[0], groups[gi].size, dtype=torch.float64)
                        per.index_add_(1, units, ag[:, pos])
                        probe.sums[gi] += per.abs().sum(0)
    finally:
        probe.close()
        model.zero_grad(set_to_none=True)
    return [s / max(1, n_samples) for s in probe.sums]


def rank(scores: torch.Tensor) -> list[int]:
    """Unit indices from least to most important (ties by index)."""
    return torch.sort(scores, stable=True).indices.tolist()
