"""Sensitivity analysis: prune each layer alone at several ratios, measure the accuracy drop on
validation data, and derive per-layer ratios for a target overall sparsity or a maximum drop.

The model is never changed: each trial prunes a copy of one layer's weight and restores it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.errors import ConfigError
from deepshrink.measure import ResultTable
from deepshrink.pruning.unstructured import (
    UnstructuredConfig,
    magnitude_scores,
    masks_for_ratio,
    select_layers,
    weight_name,
)
from deepshrink.train import evaluate

DEFAULT_RATIOS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


@dataclasses.dataclass
class Sensitivity:
    """Validation top-1 for every (layer, ratio) trial. ``top1[layer][i]`` is at ``ratios[i]``."""

    baseline_top1: float
    ratios: list[float]
    top1: dict[str, list[float]]
    params: dict[str, int]  # weights per layer (to weigh layers in an overall sparsity)

    def drop(self, layer: str) -> list[float]:
        """Accuracy drop in points (percent) at each ratio."""
        return [100.0 * (self.baseline_top1 - a) for a in self.top1[layer]]

    def table(self) -> ResultTable:
        rows = [{"layer": name, "params": self.params[name],
                 **{f"drop@{r:.2f}": d for r, d in zip(self.ratios, self.drop(name), strict=True)}}
                for name in self.top1]
        return ResultTable(f"sensitivity: val top-1 drop (pt), baseline {100 * self.baseline_top1:.2f}%",
                           rows)

    def to_json_dict(self) -> dict[str, Any]:
        """Plot-ready: one series per layer (x = ratio, y = top-1 and drop in points)."""
        return {"baseline_top1": self.baseline_top1, "x": list(self.ratios),
                "series": [{"layer": n, "params": self.params[n], "top1": self.top1[n],
                            "drop_pt": self.drop(n)} for n in self.top1]}

    def ratios_for_drop(self, max_drop_pt: float) -> dict[str, float]:
        """Per layer, the largest tried ratio whose drop alone stays within ``max_drop_pt``
        (0 when none does)."""
        out = {}
        for name in self.top1:
            ok = [r for r, d in zip(self.ratios, self.drop(name), strict=True) if d <= max_drop_pt]
            out[name] = max(ok, default=0.0)
        return out

    def overall_sparsity(self, ratios: dict[str, float]) -> float:
        total = sum(self.params.values())
        return sum(ratios[n] * self.params[n] for n in self.params) / total

    def ratios_for_sparsity(self, target: float) -> dict[str, float]:
        """Per-layer ratios reaching ``target`` overall sparsity (weighted by layer size) with the
        smallest common per-layer drop budget: the least sensitive layers are pruned hardest."""
        if not 0.0 <= target < 1.0:
            raise ConfigError(f"ratios_for_sparsity.target: must be in [0, 1), got {target}")
        budgets = sorted({d for n in self.top1 for d in self.drop(n)} | {0.0})
        for b in budgets:
            ratios = self.ratios_for_drop(b)
            if self.overall_sparsity(ratios) >= target - 1e-12:
                return _scale_down(ratios, self, target)
        raise ConfigError(f"target sparsity {target} is above what the tried ratios reach "
                          f"({self.overall_sparsity({n: max(self.ratios) for n in self.params}):.3f})",
                          hint="add larger ratios to the scan")


def _scale_down(ratios: dict[str, float], s: Sensitivity, target: float) -> dict[str, float]:
    """Lower all ratios by one factor so the overall sparsity is exactly ``target`` (the budget
    step that first reaches it may overshoot)."""
    got = s.overall_sparsity(ratios)
    if got <= 0:
        return ratios
    f = target / got
    return {n: r * f for n, r in ratios.items()}


@torch.no_grad()
def sensitivity_scan(model: nn.Module, val_loader: DataLoader, *,
                     ratios: Sequence[float] = DEFAULT_RATIOS,
                     cfg: UnstructuredConfig | None = None) -> Sensitivity:
    """Prune each selected layer alone (magnitude, per layer) at each ratio and measure val top-1.

    ``cfg`` selects the layers (layer_types / ignore / skip_last); its ratio is not used.
    """
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad or not ratios:
        raise ConfigError(f"sensitivity_scan.ratios: each must be in [0, 1), got {list(ratios)}")
    cfg = cfg or UnstructuredConfig()
    layers = select_layers(model, cfg)
    base = evaluate(model, val_loader)["top1"]
    top1: dict[str, list[float]] = {}
    for name, layer in layers.items():
        w = layer.weight
        orig = w.detach().clone()
        scores = magnitude_scores({name: layer})
        accs = []
        for r in ratios:
            mask = masks_for_ratio(scores, r)[weight_name(name)]
            w.copy_(orig * mask)
            accs.append(evaluate(model, val_loader)["top1"])
        w.copy_(orig)
        top1[name] = accs
    return Sensitivity(base, [float(r) for r in ratios], top1,
                       {n: m.weight.numel() for n, m in layers.items()})
