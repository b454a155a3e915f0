"""Mixed precision: per-layer weight bits chosen from a sensitivity pass.

Sensitivity of a layer at b bits = mean squared change of the model's logits on calibration
batches when only that layer's weights are quantized to b bits (weight-only, the others float).
:func:`choose_bits` then solves the small knapsack (minimum summed sensitivity under the bit
budget) exactly when the search space is small and greedily otherwise (cf. HAWQ's Pareto
selection). Summing single-layer sensitivities assumes their effects add — a first-order
approximation, fine for picking widths.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from deepshrink.modeling import call, output_tensor
from deepshrink.quantization.modules import QuantizedLayer


@torch.no_grad()
def layer_sensitivity(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Any],
                      cfg: Any) -> dict[str, dict[int, float]]:
    """{layer name: {bits: mean squared logit change}} for each candidate width."""
    refs = [output_tensor(call(model, x)).float() for x in batches]
    out: dict[str, dict[int, float]] = {}
    for name, layer in layers:
        w = layer.weight.data.clone()
        out[name] = {}
        for b in cfg.candidate_bits:
            spec = cfg.spec_for(name, b)
            q = QuantizedLayer.from_float(layer, spec, "weight-only", method=cfg.weight_range)
            layer.weight.data.copy_(q.weight)
            err = sum(float((output_tensor(call(model, x)).float() - r).pow(2).mean())
                      for x, r in zip(batches, refs, strict=True))
            out[name][b] = err / len(batches)
            layer.weight.data.copy_(w)
    return out


def choose_bits(sens: dict[str, dict[int, float]], sizes: dict[str, int], target_bits: float
                ) -> dict[str, int]:
    """Per-layer bits minimising the summed sensitivity with a parameter-weighted average of at
    most ``target_bits``: exhaustive for up to 4096 combinations, else greedy upgrades from the
    narrowest width (each step buys the largest sensitivity drop per added bit that still fits)."""
    names = list(sens)
    total = sum(sizes.values())
    budget = target_bits * total + 1e-6
    options = [sorted(sens[n]) for n in names]
    if math.prod(len(o) for o in options) <= 4096:
        best: tuple[float, tuple[int, ...]] | None = None
        for combo in itertools.product(*options):
            if sum(b * sizes[n] for n, b in zip(names, combo, strict=True)) > budget:
                continue
            cost = sum(sens[n][b] for n, b in zip(names, combo, strict=True))
            if best is None or cost < best[0]:
                best = (cost, combo)
        if best is not None:
            return dict(zip(names, best[1], strict=True))
    bits = {n: min(sens[n]) for n in names}
    used = sum(bits[n] * sizes[n] for n in names)
    while True:
        step: tuple[float, str, int] | None = None
        for n in names:
            higher = [b for b in sens[n] if b > bits[n]]
            if not higher:
                continue
            nb = min(higher)
            extra = (nb - bits[n]) * sizes[n]
            if used + extra > budget:
                continue
            gain = (sens[n][bits[n]] - sens[n][nb]) / extra
            if step is None or gain > step[0]:
                step = (gain, n, nb)
        if step is None:
            return bits
        used += (step[2] - bits[step[1]]) * sizes[step[1]]
        bits[step[1]] = step[2]
