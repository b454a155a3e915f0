"""What an exit policy costs and earns: per-exit MACs, and accuracy, exit shares and mean MACs
per sample on a data split."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from deepshrink.early_exit.model import MultiExitModel
from deepshrink.measure import count_macs
from deepshrink.modeling import as_inputs, input_batches, output_tensor, select


@dataclasses.dataclass
class ExitCosts:
    """MACs of one sample: ``backbone[k]`` = the base model up to exit point ``k``
    (``backbone[K]`` = the whole base model), ``heads[k]`` = exit head ``k``."""

    backbone: list[int]
    heads: list[int]

    def per_exit(self, thresholds: list[float | None]) -> list[int]:
        """MACs of a sample leaving at each exit (final last) under ``thresholds``: the base
        model up to there, plus every *active* head it passed, plus the one it left by."""
        out, heads_paid = [], 0
        for k, t in enumerate(thresholds):
            out.append(self.backbone[k] + heads_paid + self.heads[k])
            if t is not None:
                heads_paid += self.heads[k]
        out.append(self.backbone[-1] + heads_paid)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def exit_costs(model: MultiExitModel, example: Any) -> ExitCosts:
    """Count each exit's MACs with :func:`deepshrink.measure.count_macs` on one sample, by
    running the model with every sample forced out at exit ``k`` (so the counter sees exactly
    the layers such a sample runs)."""
    x = select(as_inputs(example), slice(0, 1))
    saved = (list(model.thresholds), model.criterion)
    feats: dict[int, torch.Tensor] = {}
    try:
        backbone, heads = [], []
        for k in range(model.num_exits):
            model.always_exit_at(k)
            total, _ = count_macs(model, x)
            feats[k] = _feature(model, x, k)
            h, _ = count_macs(model.heads[k], feats[k])
            backbone.append(total - h)
            heads.append(h)
        model.never_exit()
        total, _ = count_macs(model, x)
        backbone.append(total)
    finally:
        model.set_policy(*saved)
    return ExitCosts(backbone, heads)


def _feature(model: MultiExitModel, x: Any, k: int) -> torch.Tensor:
    got: list[torch.Tensor] = []
    h = model.base.get_submodule(model.points[k]).register_forward_hook(
        lambda _m, _a, out: got.append(output_tensor(out)))
    try:
        with torch.no_grad():
            model.all_exits(x)
    finally:
        h.remove()
    return got[0]


@dataclasses.dataclass
class ExitReport:
    """A multi-exit model on one split under its current policy."""

    split: str
    n: int
    top1: float
    shares: list[float]  # fraction of samples leaving at each exit, final last
    exit_top1: list[float | None]  # accuracy of the samples that left at each exit
    mean_macs: float
    full_macs: int  # the base model alone (no heads)
    thresholds: list[float | None]
    criterion: str
    points: list[str]

    @property
    def mac_reduction(self) -> float:
        return self.full_macs / self.mean_macs if self.mean_macs else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mac_reduction": self.mac_reduction}


@torch.no_grad()
def evaluate_exits(model: MultiExitModel, data: Iterable[Any], *, split: str = "test",
                   costs: ExitCosts | None = None, limit: int = 1_000_000) -> ExitReport:
    """Run ``model`` with real skipping over labelled batches and report accuracy, the share
    of samples leaving at each exit and the mean MACs per sample."""
    batches = input_batches(data, limit, what=split)
    correct, exits = [], []
    model.eval()
    for x, y in batches:
        if y is None:
            raise ValueError(f"{split}: batches must carry labels")
        run = model.run(x)
        correct.append((run.logits.argmax(-1) == y).numpy())
        exits.append(run.exits.numpy())
    hit, ex = np.concatenate(correct), np.concatenate(exits)
    costs = costs or exit_costs(model, batches[0][0])
    per_exit = costs.per_exit(model.thresholds)
    k1 = model.num_exits + 1
    counts = np.bincount(ex, minlength=k1)
    exit_top1 = [float(hit[ex == k].mean()) if counts[k] else None for k in range(k1)]
    return ExitReport(split, len(hit), float(hit.mean()), (counts / len(hit)).tolist(), exit_top1,
                      float(np.dot(counts, per_exit) / len(hit)), int(costs.backbone[-1]),
                      list(model.thresholds), model.criterion, list(model.points))
