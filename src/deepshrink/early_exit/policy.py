"""Calibrating the exit policy on the validation split.

Every head and the final head are run once over the validation batches (no skipping); each
sample's score and correctness at every exit are kept. A policy (one threshold per exit) then
costs nothing to evaluate: a sample leaves at the first exit whose score reaches the threshold.
The search walks from "never exit" towards "always exit early", each step lowering one exit's
threshold to the candidate (a quantile of that exit's validation scores) that loses the least
validation accuracy per MAC saved. Every policy visited is a point of the trade-off curve; the
chosen one is the cheapest whose accuracy drop stays within the budget with confidence
``1 - risk`` (an upper bound from the paired per-sample differences, so that a policy tuned to
the last decimal on validation does not overshoot on new data). With ``holdout`` > 0 a seeded
share of the validation samples is kept out of the search and only checks the curve's points:
the walk picks each step because it looked good on its own samples, so judging the points on
those same samples is optimistic (LeNet-5 overshot its budget on test that way). The test
split is never read.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import numpy as np
import torch
from torch import nn

from deepshrink.data import DataBundle
from deepshrink.early_exit.config import CalibrationConfig
from deepshrink.early_exit.metrics import ExitCosts, exit_costs
from deepshrink.early_exit.model import MultiExitModel, exit_scores
from deepshrink.errors import DataError
from deepshrink.modeling import call, eval_mode, input_batches, output_tensor


@dataclasses.dataclass
class CurvePoint:
    thresholds: list[float | None]
    val_top1: float
    mean_macs: float
    shares: list[float]
    drop_se: float = 0.0  # standard error of the accuracy drop against the reference (paired)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CalibrationResult:
    """The chosen policy and the whole validation trade-off curve (cheapest first)."""

    criterion: str
    budget: float
    thresholds: list[float | None]
    val_top1: float
    reference_val_top1: float
    mean_macs: float
    full_macs: int
    shares: list[float]
    curve: list[CurvePoint]
    costs: ExitCosts
    n_val: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mac_reduction"] = self.full_macs / self.mean_macs
        return d

    def pick(self, budget: float, risk: float = 0.5) -> CurvePoint:
        """The cheapest point of the curve within ``budget`` accuracy points of the reference
        (at confidence ``1 - risk``, see :class:`CalibrationConfig`)."""
        return _pick(self.curve, self.reference_val_top1, budget, risk)


@dataclasses.dataclass
class _ValTable:
    scores: np.ndarray  # (K, N) exit scores
    correct: np.ndarray  # (K + 1, N) booleans, final last
    ref_correct: np.ndarray  # (N,)


def _val_batches(calibration: Any, cfg: CalibrationConfig) -> list[Any]:
    if isinstance(calibration, DataBundle):  # a bundle: its validation split, never test
        calibration = calibration.loader("val", cfg.batch_size)
    batches = input_batches(calibration, cfg.calibration_batches, batch_size_hint=cfg.batch_size,
                            what="calibration (validation split)")
    if any(y is None for _, y in batches):
        raise DataError("calibration batches need labels (the validation split)")
    return batches


@torch.no_grad()
def _val_table(model: MultiExitModel, batches: list[Any], criterion: str,
               reference: nn.Module | None) -> _ValTable:
    scores, correct, ref = [], [], []
    with eval_mode(model):
        for x, y in batches:
            outs = model.all_exits(x)
            scores.append(torch.stack([exit_scores(z, criterion) for z in outs[:-1]]).numpy())
            correct.append(torch.stack([z.argmax(-1) == y for z in outs]).numpy())
            if reference is not None:
                with eval_mode(reference):
                    r = output_tensor(call(reference, x), model.output)
                ref.append((r.argmax(-1) == y).numpy())
    c = np.concatenate(correct, axis=1)
    return _ValTable(np.concatenate(scores, axis=1), c, np.concatenate(ref) if ref else c[-1])


def _evaluate(table: _ValTable, costs: ExitCosts, thresholds: list[float | None]) -> CurvePoint:
    k = len(thresholds)
    leave = np.zeros((k + 1, table.correct.shape[1]), dtype=bool)
    for i, t in enumerate(thresholds):
        if t is not None:
            leave[i] = table.scores[i] >= t
    leave[k] = True
    first = leave.argmax(axis=0)
    counts = np.bincount(first, minlength=k + 1)
    n = first.shape[0]
    hit = table.correct[first, np.arange(n)]
    macs = float(np.dot(counts, costs.per_exit(thresholds)) / n)
    # Paired difference per sample (reference right / policy wrong = +1): its standard error
    # bounds how far the validation drop may be from the drop on unseen data.
    diff = table.ref_correct.astype(np.int8) - hit.astype(np.int8)
    se = float(diff.std() / np.sqrt(n))
    return CurvePoint(list(thresholds), float(hit.mean()), macs, (counts / n).tolist(), se)


def _candidates(table: _ValTable, grid: int) -> list[list[float]]:
    """Per exit, candidate thresholds from high to low (quantiles of its validation scores)."""
    qs = np.linspace(1.0, 0.0, grid)
    return [sorted({float(v) for v in np.quantile(s, qs)}, reverse=True) for s in table.scores]


def _search(table: _ValTable, costs: ExitCosts, grid: int) -> list[CurvePoint]:
    cands = _candidates(table, grid)
    pos = [-1] * len(cands)  # -1 = never exit; i = cands[k][i]
    cur = _evaluate(table, costs, [None] * len(cands))
    curve = [cur]
    while True:
        best: tuple[float, float, int, int, CurvePoint] | None = None
        for k, ck in enumerate(cands):
            for j in range(pos[k] + 1, len(ck)):
                ts = [None if p < 0 else cands[i][p] for i, p in enumerate(pos)]
                ts[k] = ck[j]
                pt = _evaluate(table, costs, ts)
                saved = cur.mean_macs - pt.mean_macs
                if saved <= 0:
                    continue
                key = ((cur.val_top1 - pt.val_top1) / saved, -saved)
                if best is None or key < best[:2]:
                    best = (*key, k, j, pt)
        if best is None:
            return curve
        pos[best[2]] = best[3]
        cur = best[4]
        curve.append(cur)


def _pick(curve: list[CurvePoint], reference: float, budget: float, risk: float = 0.5) -> CurvePoint:
    z = statistics.NormalDist().inv_cdf(1 - risk) if risk < 0.5 else 0.0
    ok = [p for p in curve if reference - p.val_top1 + z * p.drop_se <= budget / 100 + 1e-12]
    if not ok:  # even "never exit" misses the budget (heads cannot help): stay exact
        return curve[0]
    return min(ok, key=lambda p: (p.mean_macs, -p.val_top1))


def _subset(table: _ValTable, idx: np.ndarray) -> _ValTable:
    return _ValTable(table.scores[:, idx], table.correct[:, idx], table.ref_correct[idx])


def _search_and_pick(table: _ValTable, costs: ExitCosts, cfg: CalibrationConfig
                     ) -> tuple[list[CurvePoint], list[float | None]]:
    """The curve (searched on all samples, or on those not held out) and the chosen thresholds
    (judged on the held-out samples when there are any)."""
    n = table.correct.shape[1]
    n_check = round(n * cfg.holdout)
    if n_check == 0 or n_check == n:
        curve = _search(table, costs, cfg.grid)
        return curve, _pick(curve, float(table.ref_correct.mean()), cfg.budget, cfg.risk).thresholds
    order = np.random.default_rng(0).permutation(n)
    check, search = _subset(table, order[:n_check]), _subset(table, order[n_check:])
    curve = _search(search, costs, cfg.grid)
    checked = [_evaluate(check, costs, p.thresholds) for p in curve]
    chosen = _pick(checked, float(check.ref_correct.mean()), cfg.budget, cfg.risk)
    # every point re-scored on the whole validation split for the reported curve
    return [_evaluate(table, costs, p.thresholds) for p in curve], chosen.thresholds


def _pareto(curve: list[CurvePoint]) -> list[CurvePoint]:
    """The points no other point beats on both MACs and accuracy, cheapest first."""
    out: list[CurvePoint] = []
    for p in sorted(curve, key=lambda p: (p.mean_macs, -p.val_top1)):
        if not out or p.val_top1 > out[-1].val_top1:
            out.append(p)
    return out


def calibrate(model: MultiExitModel, config: CalibrationConfig | None = None, *, calibration: Any,
              reference: nn.Module | None = None) -> CalibrationResult:
    """Choose the exit thresholds of ``model`` (set in place) on labelled validation data.

    ``calibration``: a DataBundle (its *validation* split is used) or labelled batches of
    validation data. ``reference``: the model whose validation accuracy the budget is measured
    against (the original model); default: ``model``'s own final head.
    """
    cfg = config or CalibrationConfig()
    batches = _val_batches(calibration, cfg)
    costs = exit_costs(model, batches[0][0])
    table = _val_table(model, batches, cfg.criterion, reference)
    ref_top1 = float(table.ref_correct.mean())
    curve, thresholds = _search_and_pick(table, costs, cfg)
    chosen = _evaluate(table, costs, thresholds)
    model.set_policy(chosen.thresholds, cfg.criterion)
    return CalibrationResult(cfg.criterion, cfg.budget, list(chosen.thresholds), chosen.val_top1, ref_top1,
                             chosen.mean_macs, costs.backbone[-1], chosen.shares, _pareto(curve), costs,
                             int(table.correct.shape[1]))


def score_policies(model: MultiExitModel, policies: list[list[float | None]], data: Any, *,
                   criterion: str | None = None, limit: int = 1_000_000) -> list[CurvePoint]:
    """Accuracy, shares and mean MACs of several threshold lists on one labelled split, from a
    single pass over it (for *reporting* a curve on test; choose policies with :func:`calibrate`)."""
    cfg = CalibrationConfig(criterion=criterion or model.criterion, calibration_batches=limit)
    batches = _val_batches(data, cfg) if not isinstance(data, DataBundle) else None
    if batches is None:
        raise DataError("score_policies takes the batches of one split, not a DataBundle")
    costs = exit_costs(model, batches[0][0])
    table = _val_table(model, batches, cfg.criterion, None)
    return [_evaluate(table, costs, list(p)) for p in policies]
