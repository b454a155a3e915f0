"""Recovery after a redesign: fine-tune with the shared training loop, with knowledge
distillation from the original (unfactorized) model as one switch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from deepshrink.distill import KDConfig, distill
from deepshrink.train import Callback, TrainConfig, TrainResult, train


def recover(model: nn.Module, data: Any, train_config: TrainConfig | None = None, *,
            teacher: nn.Module | None = None, kd: KDConfig | None = None,
            callbacks: Iterable[Callback] = ()) -> nn.Module:
    """Fine-tune ``model`` in place on ``data`` (a DataBundle or a DataLoader) and return it.

    With ``teacher`` (typically the model before the redesign, kept aside with ``copy.deepcopy``)
    the loss is :func:`deepshrink.distill.kd_loss` against its logits (``kd`` sets temperature
    and weight; its default caches the teacher's outputs once); without it, plain cross-entropy.
    """
    tc = train_config or TrainConfig(epochs=2, lr=3e-4)
    if teacher is None:
        if kd is not None:
            from deepshrink.errors import ConfigError

            raise ConfigError("recover: a KDConfig was given but no teacher", hint="pass teacher=original")
        _result: TrainResult = train(model, data, tc, callbacks=callbacks)
        return model
    return distill(model, kd or KDConfig(), teacher=teacher, data=data, train_config=tc,
                   callbacks=callbacks).model
