"""Training the exits through the shared loop :func:`deepshrink.train.train`.

The loop sees a thin wrapper whose output is the final logits (so its accuracy and validation
read the final head) and whose forward also keeps every head's logits for the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.distill import kd_loss
from deepshrink.early_exit.config import ExitTrainConfig
from deepshrink.early_exit.model import MultiExitModel
from deepshrink.errors import ConfigError
from deepshrink.train import Callback, TrainResult, TrainState, train


class _AllExits(nn.Module):
    """model(x) -> final logits; the heads' logits of the same call are kept in ``exits``."""

    def __init__(self, model: MultiExitModel) -> None:
        super().__init__()
        self.model = model
        self.exits: list[torch.Tensor] = []

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        inputs = kwargs if kwargs else (args[0] if len(args) == 1 else tuple(args))
        *self.exits, final = self.model.all_exits(inputs)
        return final


class _FrozenBackbone(Callback):
    """Keep the base model in eval mode (BatchNorm statistics frozen) while the heads train."""

    def __init__(self, model: MultiExitModel) -> None:
        self.model = model

    def on_epoch_begin(self, state: TrainState) -> None:
        self.model.base.eval()


def _weights(cfg: ExitTrainConfig, n: int) -> list[float]:
    if not cfg.weights:
        return [1.0] * n
    if len(cfg.weights) != n:
        what = "one per exit and one for the final head" if cfg.mode == "joint" else "one per exit"
        raise ConfigError(f"ExitTrainConfig.weights: {len(cfg.weights)} given, {n} needed ({what})")
    return [float(w) for w in cfg.weights]


def train_exits(model: MultiExitModel, data: Any, config: ExitTrainConfig | None = None) -> TrainResult:
    """Train ``model``'s exits (in place) on ``data`` (a DataBundle or a DataLoader of
    ``(inputs, labels)``), jointly with the backbone or heads-only with distillation from the
    final head (see :class:`ExitTrainConfig`)."""
    cfg = config or ExitTrainConfig()
    wrapper = _AllExits(model)
    k = model.num_exits
    callbacks: list[Callback] = []
    if cfg.mode == "joint":
        w = _weights(cfg, k + 1)

        def loss(final: torch.Tensor, y: torch.Tensor, _batch: Sequence[torch.Tensor]) -> Any:
            parts = {f"exit{i}": F.cross_entropy(z, y) for i, z in enumerate(wrapper.exits)}
            parts["final"] = F.cross_entropy(final, y)
            total = sum(wi * p for wi, p in zip(w, parts.values(), strict=True))
            return {"loss": total, **parts}
    else:
        w = _weights(cfg, k)
        for p in model.base.parameters():
            p.requires_grad_(False)
        callbacks.append(_FrozenBackbone(model))

        def loss(final: torch.Tensor, y: torch.Tensor, _batch: Sequence[torch.Tensor]) -> Any:
            teacher = final.detach()
            parts = {f"exit{i}": kd_loss(z, teacher, y, temperature=cfg.temperature, alpha=cfg.alpha)["loss"]
                     for i, z in enumerate(wrapper.exits)}
            total = sum(wi * p for wi, p in zip(w, parts.values(), strict=True))
            return {"loss": total, **parts}
    try:
        return train(wrapper, data, cfg.train, callbacks=callbacks, loss_fn=loss)
    finally:
        if cfg.mode == "heads":
            for p in model.base.parameters():
                p.requires_grad_(True)
        model.eval()
