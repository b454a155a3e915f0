"""Choosing ranks: fixed, by kept spectral energy, or a global parameter / MACs budget spread
over the layers by their measured sensitivity.

The budget search measures, for every candidate layer and every rank of a geometric grid, how far
the model's output moves (relative squared error on the calibration batches) when only that
layer's weight is replaced by its rank-r reconstruction. It then starts from the unfactorized
model and repeatedly lowers the rank of the layer whose next step costs the least error per saved
parameter (or MAC) until the model fits the budget — the usual greedy knapsack on marginal
ratios, assuming the layers' errors add up.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deepshrink.measure import count_macs, count_params
from deepshrink.modeling import Inputs, batch_size, call, eval_mode, output_tensor
from deepshrink.redesign import lowrank


@dataclasses.dataclass
class Candidate:
    name: str
    layer: nn.Module
    form: str
    positions: int  # output positions per sample (pixels / tokens); 1 when unknown
    in_positions: int = 1

    def cost(self, rank: list[int] | None, metric: str) -> int:
        """Parameters or MACs per sample of the layer's weights at ``rank`` (None: as it is)."""
        if metric == "params":
            return self.layer.weight.numel() if rank is None else lowrank.weight_params(
                self.layer, self.form, rank)
        return lowrank.macs(self.layer, None if rank is None else self.form, rank or [],
                            self.positions, self.in_positions)


@dataclasses.dataclass
class Curve:
    """The options of one layer, from ``keep`` (index 0) to the lowest rank: cost and error."""

    candidate: Candidate
    ranks: list[list[int] | None]
    costs: list[int]
    errors: list[float]


def model_total(model: nn.Module, inputs: Inputs | None, metric: str) -> int:
    """The whole model's parameters, or its MACs per sample on ``inputs``."""
    if metric == "params":
        return count_params(model)[0]
    assert inputs is not None
    if isinstance(inputs, (torch.Tensor, tuple)):
        total = count_macs(model, inputs)[0]
    else:  # keyword inputs: count matrix products directly
        counter = FlopCounterMode(display=False)
        with eval_mode(model), torch.no_grad(), counter:
            call(model, inputs)
        total = counter.get_total_flops() // 2
    return total // max(1, batch_size(inputs))


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: list[Inputs]) -> list[torch.Tensor]:
    with eval_mode(model):
        return [output_tensor(call(model, b)).float() for b in batches]


@torch.no_grad()
def output_error(model: nn.Module, batches: list[Inputs], refs: list[torch.Tensor]) -> float:
    """sum ||f(x) - ref||^2 / sum ||ref||^2 over the batches."""
    num = den = 0.0
    with eval_mode(model):
        for b, ref in zip(batches, refs, strict=True):
            out = output_tensor(call(model, b)).float()
            num += float(((out - ref) ** 2).sum())
            den += float((ref ** 2).sum())
    return num / max(den, 1e-30)


@torch.no_grad()
def sensitivity_curves(model: nn.Module, cands: list[Candidate], batches: list[Inputs],
                       metric: str) -> list[Curve]:
    """Per layer, the output error at every grid rank that is smaller than the layer itself."""
    refs = reference_outputs(model, batches)
    curves = []
    for c in cands:
        ranks: list[list[int] | None] = [None]
        costs, errors = [c.cost(None, metric)], [0.0]
        saved = c.layer.weight.detach().clone()
        try:
            for r in lowrank.grid(lowrank.full_rank(c.layer, c.form)):
                cost = c.cost(r, metric)
                if cost >= costs[0]:
                    continue
                c.layer.weight.copy_(lowrank.dense_weight(saved, c.form, r))
                ranks.append(r)
                costs.append(cost)
                errors.append(output_error(model, batches, refs))
        finally:
            c.layer.weight.copy_(saved)
        curves.append(Curve(c, ranks, costs, errors))
    return curves


def allocate(curves: list[Curve], target: int) -> tuple[dict[str, list[int]], int]:
    """Greedy: lower ranks where the error per saved unit is smallest until the candidates'
    total cost is at most ``target``. Returns the chosen ranks (factorized layers only) and the
    candidates' total cost reached."""
    pos = [0] * len(curves)
    total = sum(cv.costs[0] for cv in curves)
    while total > target:
        best, best_k, best_ratio = -1, 0, float("inf")
        for i, cv in enumerate(curves):
            j = pos[i]
            # Look ahead to the next option that saves something (errors need not be monotone).
            for k in range(j + 1, len(cv.costs)):
                saved = cv.costs[j] - cv.costs[k]
                if saved > 0:
                    ratio = max(cv.errors[k] - cv.errors[j], 0.0) / saved
                    if ratio < best_ratio:
                        best, best_ratio = i, ratio
                        best_k = k
                    break
        if best < 0:
            break
        total -= curves[best].costs[pos[best]] - curves[best].costs[best_k]
        pos[best] = best_k
    chosen = {cv.candidate.name: list(cv.ranks[p] or []) for cv, p in zip(curves, pos, strict=True)
              if p > 0}
    return chosen, total


def budget_ranks(model: nn.Module, cands: list[Candidate], batches: list[Inputs], budget: float,
                 metric: str) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Ranks that bring the whole model to ``budget`` x its parameters (or MACs), and a summary
    of the search (totals, whether the budget was reached, the measured curves)."""
    total = model_total(model, batches[0], metric)
    fixed = total - sum(c.cost(None, metric) for c in cands)
    target = int(budget * total) - fixed
    curves = sensitivity_curves(model, cands, batches, metric)
    chosen, reached = allocate(curves, target)
    info = {"metric": metric, "model_total": total, "target_total": int(budget * total),
            "planned_total": fixed + reached, "reached": fixed + reached <= int(budget * total),
            "curves": {cv.candidate.name: {"ranks": cv.ranks, "costs": cv.costs, "errors": cv.errors}
                       for cv in curves}}
    return chosen, info
