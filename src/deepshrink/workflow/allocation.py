"""Per-layer pruning ratios from one overall target: by one-shot sensitivity (greedy, cheapest
accuracy per removed weight first) or by Han et al.'s rule (one ratio everywhere, the output layer
and tiny layers spared). Used by the search and by a recipe's ``prune`` stage (``allocate:``),
so a recipe need not name an architecture's layers."""

from __future__ import annotations

import itertools
from typing import Any

from torch import nn

from deepshrink.data import DataBundle
from deepshrink.errors import ConfigError
from deepshrink.pruning import UnstructuredConfig, select_layers, sensitivity_scan

SENS_RATIOS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
ALLOCATIONS = ("even", "sensitivity")


def allocate(sens: dict[str, Any], target: float, cap: float = 0.98, step: float = 0.01) -> dict[str, float]:
    """Per-layer pruning ratios reaching ``target`` of all weights, cheapest accuracy first.

    Each layer's drop curve (one-shot, from the scan) is made monotone and interpolated; the
    ratio of the layer whose next ``step`` costs the least accuracy per removed weight grows
    until enough weights are gone.
    """
    names = list(sens["top1"])
    params = sens["params"]
    total = sum(params[n] for n in names)
    xs = [0.0, *sens["ratios"]]
    base = sens["baseline_top1"]
    # each layer's drop curve, made monotone once (the greedy loop below reads it many times)
    curves = {n: list(itertools.accumulate((max(0.0, base - a) for a in [base, *sens["top1"][n]]), max))
              for n in names}

    def drop(name: str, r: float) -> float:
        ys = curves[name]
        for i in range(1, len(xs)):
            if r <= xs[i]:
                return ys[i - 1] + (ys[i] - ys[i - 1]) * (r - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[-1]

    ratios = dict.fromkeys(names, 0.0)
    removed = 0.0
    while removed < target * total:
        best, best_cost = None, float("inf")
        for n in names:
            r = ratios[n]
            if r + step > cap + 1e-9:
                continue
            cost = (max(0.0, drop(n, r + step) - drop(n, r)) + 1e-6) / (step * params[n])
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            break
        ratios[best] = round(ratios[best] + step, 4)
        removed += step * params[best]
    return ratios


def allocate_even(sens: dict[str, Any], target: float, cap: float = 0.98) -> dict[str, float]:
    """Han et al.'s pattern as a rule: one ratio for every layer, reaching ``target`` of all
    weights, except the output layer and tiny layers (< 1 % of the weights: a first conv), which
    keep three times the density (92 % overall -> classifier 76 %; Han et al. 2016: 74 %)."""
    params = sens["params"]  # only the weight counts are needed, in module order
    names = list(params)
    total = sum(params[n] for n in names)
    spared = {n for n in names if n == names[-1] or params[n] < 0.01 * total}
    light = max(0.0, 1 - 3 * (1 - target))
    rest = total - sum(params[n] for n in spared)
    r = (target * total - light * (total - rest)) / rest if rest else target
    return {n: round(min(cap, light if n in spared else max(0.0, r)), 4) for n in names}


def sensitivity(model: nn.Module, data: DataBundle) -> dict[str, Any]:
    s = sensitivity_scan(model, data.loader("val", 1000), ratios=SENS_RATIOS)
    return {"baseline_top1": s.baseline_top1, "ratios": s.ratios, "top1": s.top1, "params": s.params}


def layer_ratios(model: nn.Module, cfg: UnstructuredConfig, rule: str, data: DataBundle | None = None
                 ) -> dict[str, float]:
    """Per-layer ratios for the layers ``cfg`` prunes, reaching ``cfg.ratio`` of their weights
    by ``rule`` (one of :data:`ALLOCATIONS`; ``sensitivity`` scans ``data``'s validation split)."""
    if rule not in ALLOCATIONS:
        raise ConfigError(f"allocate: must be one of {ALLOCATIONS}, got {rule!r}")
    if rule == "sensitivity":
        if data is None:
            raise ConfigError("allocate: 'sensitivity' needs data (its validation split is scanned)")
        return allocate(sensitivity(model, data), cfg.ratio)
    layers = select_layers(model, cfg)
    params = {n: m.weight.numel() for n, m in layers.items()}
    return allocate_even({"params": params}, cfg.ratio)
