"""Prune, then recover by distillation from the unpruned model; iteratively if asked.

    result = prune_and_recover(model, ChannelConfig(ratio=0.5, hidden=True), data, TrainConfig(epochs=2),
                               example_inputs=x, recover=RecoverConfig(rounds=3))

Each of ``rounds`` rounds removes the same share of what is left (so that the last round reaches
``config``'s ratios), then fine-tunes through the shared loop :func:`deepshrink.train.train` with
the unpruned model as teacher:

* labelled batches ``(inputs, labels)``: :func:`deepshrink.distill.kd_loss` - soft targets at
  ``temperature`` mixed with the labels by ``alpha``;
* unlabelled inputs (a tensor, tokenizer dicts, a list of either): feature distillation - the
  mean squared error between the student's and the teacher's output tensors (logits or
  ``last_hidden_state``), the recommended recovery for an encoder after hidden-size pruning;
* optionally, ``hidden_states``: module names whose outputs are matched too (MSE through a learned
  per-channel linear map where the student's width differs, FitNets-style).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.config import Config, check
from deepshrink.data import DataBundle
from deepshrink.distill.loss import kd_loss
from deepshrink.errors import ConfigError, DataError
from deepshrink.modeling import call, input_batches, output_tensor
from deepshrink.pruning.structured import ChannelConfig, PruneResult, prune_channels
from deepshrink.train import Callback, TrainConfig, TrainState, train


@dataclasses.dataclass
class RecoverConfig(Config):
    """How to recover. ``rounds``: prune a little, recover, repeat (1 = one shot).
    ``temperature`` / ``alpha``: the KD loss on labelled data (``alpha`` = weight of the soft
    term). ``hidden_states``: module names whose outputs the student matches to the teacher's,
    weighted by ``hidden_weight``. ``max_batches``: cap on unlabelled batches read."""

    rounds: int = 1
    temperature: float = 4.0
    alpha: float = 0.9
    hidden_states: tuple[str, ...] = ()
    hidden_weight: float = 1.0
    max_batches: int = 10_000

    def validate(self) -> None:
        n = type(self).__name__
        check(isinstance(self.rounds, int) and self.rounds >= 1, n, "rounds",
              f"must be >= 1, got {self.rounds}")
        check(self.temperature > 0, n, "temperature", f"must be > 0, got {self.temperature}")
        check(0.0 <= self.alpha <= 1.0, n, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.hidden_weight >= 0, n, "hidden_weight", f"must be >= 0, got {self.hidden_weight}")
        check(self.max_batches >= 1, n, "max_batches", f"must be >= 1, got {self.max_batches}")


@dataclasses.dataclass
class RecoverResult:
    """The pruned, recovered model, each round's :class:`PruneResult` and training history."""

    model: nn.Module
    rounds: list[PruneResult]
    history: list[list[dict[str, Any]]]


class _Outputs(nn.Module):
    """The model as the training loop calls it: any input form in, the output tensor out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> torch.Tensor:
        return output_tensor(call(self.model, x))


class _HiddenMatch(Callback):
    """Adds the hidden-state term: MSE(adapter(student feature), teacher feature)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str], weight: float,
                 lr: float) -> None:
        self.weight, self.lr = weight, lr
        self.s_feats: dict[str, torch.Tensor] = {}
        self.t_feats: dict[str, torch.Tensor] = {}
        self.handles = [student.get_submodule(n).register_forward_hook(self._tap(self.s_feats, n))
                        for n in names] + \
                       [teacher.get_submodule(n).register_forward_hook(self._tap(self.t_feats, n))
                        for n in names]
        self.adapters = nn.ModuleDict()
        self.opt: torch.optim.Optimizer | None = None

    @staticmethod
    def _tap(store: dict[str, torch.Tensor], name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            store[name] = output_tensor(out)
        return hook

    def _adapter(self, name: str, s: torch.Tensor, t: torch.Tensor) -> nn.Module:
        key = name.replace(".", "_")
        if key not in self.adapters:
            axis = 1 if s.dim() == 4 else -1  # conv maps: channels first; tokens: channels last
            lin = nn.Linear(s.shape[axis], t.shape[axis])
            self.adapters[key] = lin
            self.opt = torch.optim.Adam(self.adapters.parameters(), lr=self.lr)
        lin = self.adapters[key]
        return lambda x: lin(x.movedim(1, -1)).movedim(-1, 1) if x.dim() == 4 else lin(x)

    def on_loss(self, state: TrainState, loss: torch.Tensor) -> torch.Tensor:
        terms = [F.mse_loss(self._adapter(n, s, self.t_feats[n])(s.float()), self.t_feats[n].detach().float())
                 for n, s in self.s_feats.items()]
        return loss + self.weight * torch.stack(terms).mean() if terms else loss

    def on_step_end(self, state: TrainState) -> None:
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def on_train_end(self, state: TrainState) -> None:
        for h in self.handles:
            h.remove()


def _loader(data: Any, batch_size: int, seed: int, limit: int) -> tuple[Any, bool]:
    """A loader of ``(inputs, labels)`` (labels a placeholder for unlabelled data) and whether the
    data is labelled."""
    if isinstance(data, DataBundle):
        return data.loader("train", batch_size, seed=seed), True
    if isinstance(data, DataLoader):
        first = next(iter(data))
        labelled = isinstance(first, (tuple, list)) and len(first) >= 2
        return data, labelled
    batches = input_batches(data, limit, batch_size_hint=batch_size, what="recovery data")
    labelled = all(y is not None for _, y in batches)
    if not labelled and any(y is not None for _, y in batches):
        raise DataError("recovery data mixes labelled and unlabelled batches")
    return batches, labelled


def _placeholders(batches: list, teacher: nn.Module) -> list:
    """Unlabelled batches get a zero "label" shaped like ``output.argmax(1)``, so the loop's
    running accuracy (meaningless here) can still be computed."""
    out = []
    with torch.no_grad():
        for x, y in batches:
            if y is None:
                t = output_tensor(call(teacher.eval(), x))
                y = torch.zeros(t.shape[:1] + t.shape[2:], dtype=torch.long)
            out.append((x, y))
    return out


def _round_config(config: ChannelConfig, rounds: int) -> ChannelConfig:
    """The per-round config: each round removes the same share of what is left."""
    step = lambda r: None if r is None else 1.0 - (1.0 - r) ** (1.0 / rounds)  # noqa: E731
    return dataclasses.replace(config, ratio=step(config.ratio), heads_ratio=step(config.heads_ratio),
                               hidden_ratio=step(config.hidden_ratio),
                               overrides={k: step(v) for k, v in config.overrides.items()})


def prune_and_recover(model: nn.Module, config: ChannelConfig, data: Any, train_config: TrainConfig, *,
                      example_inputs: Any = None, calibration: Any = None,
                      recover: RecoverConfig | None = None) -> RecoverResult:
    """Prune ``model`` in place as ``config`` says and recover it by distillation from a frozen
    copy of the unpruned model (see the module docstring). ``data``: a DataBundle, a DataLoader
    of ``(inputs, labels)``, or unlabelled inputs (tensor, dict, list of batches)."""
    rc = recover or RecoverConfig()
    if not isinstance(config, ChannelConfig):
        raise ConfigError(f"prune_and_recover needs a ChannelConfig, got {type(config).__name__}")
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    loader, labelled = _loader(data, train_config.batch_size, train_config.seed, rc.max_batches)
    if isinstance(loader, list):
        loader = _placeholders(loader, teacher)
    step_cfg = _round_config(config, rc.rounds) if rc.rounds > 1 else config
    results, history = [], []
    for k in range(rc.rounds):
        results.append(prune_channels(model, step_cfg, example_inputs=example_inputs,
                                      calibration=calibration))
        history.append(_finetune(model, teacher, loader, labelled, rc,
                                 dataclasses.replace(train_config, seed=train_config.seed + k)))
    return RecoverResult(model, results, history)


def _finetune(model: nn.Module, teacher: nn.Module, loader: Any, labelled: bool, rc: RecoverConfig,
              tcfg: TrainConfig) -> list[dict[str, Any]]:
    student = _Outputs(model)
    logits = labelled

    def loss_fn(out: torch.Tensor, y: torch.Tensor, batch: Sequence[Any]) -> Any:
        with torch.no_grad():
            t = output_tensor(call(teacher, batch[0]))
        if logits:
            return kd_loss(out, t, y, temperature=rc.temperature, alpha=rc.alpha)
        return {"loss": F.mse_loss(out.float(), t.float())}

    callbacks = [_HiddenMatch(model, teacher, rc.hidden_states, rc.hidden_weight, tcfg.lr)] \
        if rc.hidden_states else []
    res = train(student, loader, dataclasses.replace(tcfg, keep_best=False), callbacks=callbacks,
                loss_fn=loss_fn, val_loader=None)
    model.eval()
    return res.history


__all__ = ["RecoverConfig", "RecoverResult", "prune_and_recover"]
