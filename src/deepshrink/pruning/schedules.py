"""When to prune: one-shot, iterative prune -> fine-tune rounds (Han et al. 2015), and gradual
polynomial sparsity during training (Zhu & Gupta 2017).

The schedules only decide *how much* and *when*; the masks come from
:func:`deepshrink.pruning.unstructured.prune_unstructured` and every fine-tune step runs through
:func:`deepshrink.train.train` with :class:`MaskCallback`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from deepshrink.data import DataBundle
from deepshrink.errors import ConfigError
from deepshrink.pruning.masks import MaskCallback, get_masks, mask_sparsity
from deepshrink.pruning.unstructured import UnstructuredConfig, prune_unstructured
from deepshrink.train import Callback, TrainConfig, TrainState, evaluate, train
from deepshrink.train.loop import LossFn


def oneshot(model: nn.Module, cfg: UnstructuredConfig) -> nn.Module:
    """Prune to the target in one step (no fine-tuning). Returns the model (edited in place)."""
    return prune_unstructured(model, cfg)


@dataclasses.dataclass
class RoundRecord:
    round: int
    sparsity: float  # over the pruned tensors
    val_top1_pruned: float | None  # right after pruning, before fine-tuning
    val_top1: float | None  # after fine-tuning
    layer_sparsity: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def iterative_prune(model: nn.Module, cfg: UnstructuredConfig, data: DataBundle | DataLoader,
                    train_cfg: TrainConfig, *, rounds: int = 3,
                    val_loader: DataLoader | None = None,
                    callbacks: Iterable[Callback] = (),
                    loss_fn: LossFn | None = None,
                    spacing: str = "geometric") -> tuple[nn.Module, list[RoundRecord]]:
    """Han et al. 2015: ``rounds`` times, prune a step further toward ``cfg`` then fine-tune with
    masks. Round ``k`` prunes to ``cfg.scaled(k / rounds, spacing)``: with ``geometric`` spacing
    each round removes the same share of what is left; ``cubic`` takes big steps first and small
    ones near the target. The last round reaches ``cfg`` exactly. ``callbacks`` and ``loss_fn``
    (e.g. distillation from the dense model) go to every fine-tune. Returns the model (edited in
    place, masks attached) and one record per round.
    """
    if rounds < 1:
        raise ConfigError(f"iterative_prune.rounds: must be >= 1, got {rounds}")
    cfg.scaled(1.0, spacing)  # rejects an unknown spacing before any training
    if val_loader is None and isinstance(data, DataBundle):
        val_loader = data.loader("val", 512)
    callbacks = list(callbacks)  # reused every round
    history: list[RoundRecord] = []
    for k in range(1, rounds + 1):
        prune_unstructured(model, cfg.scaled(k / rounds, spacing) if k < rounds else cfg)
        before = evaluate(model, val_loader)["top1"] if val_loader is not None else None
        rcfg = dataclasses.replace(train_cfg, seed=train_cfg.seed + k)
        res = train(model, data, rcfg, callbacks=[MaskCallback(), *callbacks], loss_fn=loss_fn,
                    val_loader=val_loader)
        after = evaluate(model, val_loader)["top1"] if val_loader is not None else res.best_val_top1
        sp = mask_sparsity(get_masks(model))
        history.append(RoundRecord(k, sp.pop("(all)"), before, after, sp))
    return model, history


def polynomial_sparsity(step: int, initial: float, final: float, begin_step: int, n: int,
                        frequency: int) -> float:
    """Zhu & Gupta 2017: ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3``, held at
    ``s_i`` before ``t0`` and at ``s_f`` after ``t0 + n * dt``."""
    if step <= begin_step:
        return initial
    span = n * frequency
    t = min(step - begin_step, span)
    return final + (initial - final) * (1.0 - t / span) ** 3


def gradual_frequency(total_steps: int, updates: int, finish_at: float = 0.75) -> int:
    """Optimizer steps between pruning updates so that ``updates`` of them reach the target at
    ``finish_at`` of training (the rest recovers at the final sparsity)."""
    if updates < 1 or total_steps < 1 or not 0.0 < finish_at <= 1.0:
        raise ConfigError(f"gradual_frequency: need total_steps >= 1, updates >= 1 and finish_at in "
                          f"(0, 1], got {total_steps}, {updates}, {finish_at}")
    return max(1, math.floor(finish_at * total_steps / updates))


class GradualPruning(Callback):
    """Raise sparsity during training along the Zhu & Gupta cubic: every ``frequency`` optimizer
    steps from ``begin_step`` for ``n`` updates, prune to ``cfg.scaled`` at the current sparsity.
    Keeps pruned weights at exactly zero in between (it includes :class:`MaskCallback`). If
    training stops before the schedule ends (or ``keep_best`` restores an earlier epoch), the final
    masks are applied at the end, so the model always leaves at the target sparsity."""

    def __init__(self, cfg: UnstructuredConfig, *, initial: float = 0.0, begin_step: int = 0,
                 n: int = 10, frequency: int = 50) -> None:
        if cfg.method != "magnitude":
            raise ConfigError("GradualPruning needs an UnstructuredConfig with method 'magnitude'")
        if n < 1 or frequency < 1 or begin_step < 0:
            raise ConfigError(f"GradualPruning: n and frequency must be >= 1 and begin_step >= 0, "
                              f"got n={n}, frequency={frequency}, begin_step={begin_step}")
        if not 0.0 <= initial <= cfg.ratio:
            raise ConfigError(f"GradualPruning.initial: must be in [0, ratio={cfg.ratio}], got {initial}")
        self.cfg, self.initial, self.begin_step = cfg, initial, begin_step
        self.n, self.frequency = n, frequency
        self.masking = MaskCallback()
        self.log: list[tuple[int, float]] = []  # (step, sparsity target) at each pruning update

    def end_step(self) -> int:
        return self.begin_step + self.n * self.frequency

    def target(self, step: int) -> float:
        return polynomial_sparsity(step, self.initial, self.cfg.ratio, self.begin_step, self.n,
                                   self.frequency)

    def _prune_to(self, model: nn.Module, step: int) -> None:
        s = self.target(step)
        # frac such that the scaled default ratio equals s: 1 - (1 - r)^frac = s.
        r = self.cfg.ratio
        frac = 1.0 if s >= r else (0.0 if s <= 0 else math.log1p(-s) / math.log1p(-r))
        if frac > 0:
            prune_unstructured(model, self.cfg.scaled(frac) if frac < 1 else self.cfg)
        self.log.append((step, s))

    def on_train_begin(self, state: TrainState) -> None:
        if self.begin_step == 0 or self.initial > 0:
            self._prune_to(state.model, 0)
        self.masking.on_train_begin(state)

    def after_backward(self, state: TrainState) -> None:
        self.masking.after_backward(state)

    def on_step_end(self, state: TrainState) -> None:
        t = state.step
        if self.begin_step < t <= self.end_step() and (t - self.begin_step) % self.frequency == 0:
            self._prune_to(state.model, t)
        self.masking.on_step_end(state)

    def on_train_end(self, state: TrainState) -> None:
        if state.step < self.end_step():  # training ended early: reach the target anyway
            self._prune_to(state.model, self.end_step())
        self.masking.on_train_end(state)
