"""``distill(student, KDConfig(...), teacher=..., data=...)``: train a student on a teacher's
soft targets through the shared loop :func:`deepshrink.train.train`.

:class:`Distiller` is the plug: its :meth:`Distiller.loss_fn` is the loop's ``loss_fn`` (KD
loss from cached or live teacher logits) and it is a :class:`~deepshrink.train.Callback` whose
``on_loss`` adds the hint term. Any ``nn.Module`` can be the student, including a pruned,
low-rank or fake-quantized one: pass the technique's own callbacks (e.g. the mask re-applier)
in ``callbacks`` and they run in the same loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from deepshrink.config import Config, check
from deepshrink.data import DataBundle
from deepshrink.distill.hints import Hints
from deepshrink.distill.loss import COMBINE_MODES, kd_loss
from deepshrink.distill.teachers import Teacher, as_teacher, cache_teacher_outputs, transfer_loader
from deepshrink.errors import ConfigError, ModelError
from deepshrink.train import Callback, TrainConfig, TrainResult, TrainState, train


@dataclasses.dataclass
class KDConfig(Config):
    """Knowledge distillation. ``alpha`` weighs the soft (teacher) term: 1 = soft targets only,
    0 = hard labels only. ``combine``/``weights`` say how an ensemble's members are averaged.
    ``cache`` runs the teacher once over the transfer set instead of every epoch (not allowed
    with input augmentation). ``hints`` maps student module names to teacher module names
    (first member of an ensemble) for FitNets-style feature matching, weighted by
    ``hint_weight``."""

    temperature: float = 4.0
    alpha: float = 0.9
    combine: str = "logits"  # logits | probs
    weights: tuple[float, ...] | None = None
    cache: bool = True
    hints: dict[str, str] = dataclasses.field(default_factory=dict)
    hint_weight: float = 1.0

    def __post_init__(self) -> None:
        # A list from Python code or YAML compares equal to the tuple a JSON round trip gives.
        if isinstance(self.weights, list):
            self.weights = tuple(self.weights)
        super().__post_init__()

    def validate(self) -> None:
        n = type(self).__name__
        check(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
              and self.temperature > 0, n, "temperature",
              f"must be a finite number > 0, got {self.temperature}")
        check(isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0, n, "alpha",
              f"must be in [0, 1] (1 = soft targets only, 0 = hard labels only), got {self.alpha}")
        check(self.combine in COMBINE_MODES, n, "combine",
              f"must be one of {COMBINE_MODES}, got {self.combine!r}")
        if self.weights is not None:
            check(len(self.weights) > 0 and all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
                  n, "weights", f"must be non-negative with a positive sum, got {self.weights}")
        check(self.hint_weight >= 0, n, "hint_weight", f"must be >= 0, got {self.hint_weight}")
        check(all(isinstance(k, str) and isinstance(v, str) for k, v in self.hints.items()), n, "hints",
              "must map student module names to teacher module names (strings)")


class Distiller(Callback):
    """Loss function and callback for :func:`deepshrink.train.train`.

    Batches are ``(x, y)`` (the teacher runs live on ``x``, so input augmentation is fine) or
    ``(x, y, teacher_logits, *hint_features)`` from :func:`cache_teacher_outputs`.
    One Distiller serves one training run: :meth:`close` (called when training ends) removes
    the hint hooks.
    """

    def __init__(self, student: nn.Module, teacher: Teacher | nn.Module | Sequence[nn.Module],
                 config: KDConfig | None = None) -> None:
        self.config = config or KDConfig()
        self.student = student
        self.teacher = as_teacher(teacher)
        if self.config.weights is not None and len(self.config.weights) != len(self.teacher):
            raise ConfigError(f"KDConfig.weights: {len(self.config.weights)} weights given for "
                              f"{len(self.teacher)} teacher(s)")
        self.hints = Hints(student, self.teacher.members[0], self.config.hints, self.config.hint_weight) \
            if self.config.hints else None
        self._cached_feats: Sequence[torch.Tensor] | None = None
        self.last_parts: dict[str, float] = {}

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor, batch: Sequence[torch.Tensor]) -> Any:
        cfg = self.config
        if len(batch) > 2:
            teacher_logits = batch[2]
            self._cached_feats = batch[3:] if self.hints else None
            if self.hints and len(self._cached_feats) != len(cfg.hints):
                raise ModelError(f"batches carry cached teacher logits but {len(self._cached_feats)} hint "
                                 f"features for {len(cfg.hints)} hints",
                                 hint="cache with cache_teacher_outputs(..., features=hint teacher modules)")
        else:
            teacher_logits = self.teacher(batch[0])
            self._cached_feats = None
        res = kd_loss(outputs, teacher_logits, targets, temperature=cfg.temperature, alpha=cfg.alpha,
                      combine=cfg.combine, weights=cfg.weights)
        self.last_parts = {k: float(v.detach()) for k, v in res.items()}
        return res

    def on_loss(self, state: TrainState, loss: torch.Tensor) -> torch.Tensor:
        if self.hints is None:
            return loss
        hint = self.hints.loss(self._cached_feats, lr=state.config.lr)
        self.last_parts["hint"] = float(hint.detach())
        return loss + hint

    def on_step_end(self, state: TrainState) -> None:
        if self.hints is not None:
            self.hints.step()

    def on_train_end(self, state: TrainState) -> None:
        self.close()

    def close(self) -> None:
        if self.hints is not None:
            self.hints.remove()

    def fit(self, student: nn.Module, data: DataBundle | Dataset | DataLoader,
            train_config: TrainConfig | None = None, *, callbacks: Iterable[Callback] = (),
            val_loader: DataLoader | None = None) -> TrainResult:
        """Run the shared loop on ``data`` (see :func:`distill`) and return its history.
        ``student`` must be the model this Distiller was built for (its hint hooks are on it)."""
        if student is not self.student:
            raise ModelError("Distiller.fit got a different student than the one it was built for")
        tcfg = train_config or TrainConfig()
        if isinstance(data, DataBundle):
            dataset: Dataset | None = data.train
            val_loader = val_loader or data.loader("val", 512)
        elif isinstance(data, DataLoader):
            dataset = None
        else:
            dataset = data
        if dataset is None:
            loader = data  # a DataLoader is used as is; a third tensor in its batches is the cache
        else:
            precached = isinstance(dataset, TensorDataset) and len(dataset.tensors) > 2
            if (self.config.cache or precached) and tcfg.augment != "none":
                raise ConfigError(
                    f"TrainConfig.augment: {tcfg.augment!r} cannot be used with cached teacher logits "
                    "(they belong to the un-augmented inputs)",
                    hint="set augment='none', or KDConfig(cache=False) to run the teacher on every batch")
            if self.config.cache and not precached:
                dataset = cache_teacher_outputs(self.teacher, dataset,
                                                features=list(self.config.hints.values()))
            loader = transfer_loader(dataset, tcfg.batch_size, shuffle=True, seed=tcfg.seed)
        try:
            return train(student, loader, tcfg, callbacks=[self, *callbacks], loss_fn=self.loss_fn,
                         val_loader=val_loader)
        finally:
            self.close()


@dataclasses.dataclass
class DistillResult:
    """The distilled student (trained in place) and the shared loop's per-epoch history."""

    model: nn.Module
    train: TrainResult


def distill(student: nn.Module, config: KDConfig | None = None, *,
            teacher: Teacher | nn.Module | Sequence[nn.Module],
            data: DataBundle | Dataset | DataLoader, train_config: TrainConfig | None = None,
            callbacks: Iterable[Callback] = (), val_loader: DataLoader | None = None) -> DistillResult:
    """Distil ``teacher`` (a model, a list of models = ensemble, or a :class:`Teacher`) into
    ``student``, trained in place and returned in the result with its history. The teacher is
    not modified.

    ``data``: a :class:`DataBundle` (train split = transfer set, val split for per-epoch
    validation), a Dataset of ``(x, y)`` or of ``(x, y, teacher_logits, *features)`` already
    cached, or a DataLoader (used as is). With ``config.cache`` the teacher runs once over the
    transfer set; ``train_config.augment`` must then be ``"none"``.
    """
    history = Distiller(student, teacher, config).fit(student, data, train_config, callbacks=callbacks,
                                                      val_loader=val_loader)
    return DistillResult(student, history)
