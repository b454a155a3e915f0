"""Lottery-ticket rewinding (Frankle & Carbin 2019; Frankle et al. 2020 for rewinding to an early
iteration): train, prune the smallest weights, reset the survivors to their values at
initialisation (or after ``rewind_steps`` steps), retrain with the mask; repeat.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.data import DataBundle
from deepshrink.errors import ConfigError
from deepshrink.pruning.masks import MaskCallback, Masks, apply_masks, get_masks, mask_sparsity
from deepshrink.pruning.unstructured import UnstructuredConfig, prune_unstructured
from deepshrink.train import TrainConfig, evaluate, train


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter (by name): the point to rewind to."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def rewind(model: nn.Module, state: dict[str, torch.Tensor], masks: Masks | None = None) -> nn.Module:
    """Reset every parameter to ``state`` and re-apply ``masks`` (default: the attached ones), so
    surviving weights hold exactly their snapshot values and pruned ones zero. In place."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    if missing:
        raise ConfigError(f"rewind: snapshot lacks parameter(s) {missing[:5]}")
    for n, p in params.items():
        p.copy_(state[n])
    masks = get_masks(model) if masks is None else masks
    return apply_masks(model, masks, combine=False)


@dataclasses.dataclass
class LotteryRound:
    round: int
    sparsity: float
    val_top1: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lottery_ticket(model: nn.Module, cfg: UnstructuredConfig, data: DataBundle | DataLoader,
                   train_cfg: TrainConfig, *, rounds: int = 3, rewind_steps: int = 0,
                   val_loader: DataLoader | None = None) -> tuple[nn.Module, list[LotteryRound]]:
    """Iterative magnitude pruning with rewinding, from the model's *current* (initial) weights.

    Round 0 trains the dense model (after ``rewind_steps`` steps its weights become the rewind
    point; 0 = the initialisation). Each of the ``rounds`` rounds then prunes toward ``cfg``
    (``cfg.scaled(k / rounds)``), rewinds the survivors and retrains with the mask. Returns the
    model (final ticket, trained, masks attached) and the per-round sparsity and val accuracy.
    """
    if rounds < 1 or rewind_steps < 0:
        raise ConfigError(f"lottery_ticket: rounds must be >= 1 and rewind_steps >= 0, "
                          f"got rounds={rounds}, rewind_steps={rewind_steps}")
    if val_loader is None and isinstance(data, DataBundle):
        val_loader = data.loader("val", 512)
    if rewind_steps:
        train(model, data, dataclasses.replace(train_cfg, max_steps=rewind_steps, keep_best=False),
              callbacks=[MaskCallback()], val_loader=val_loader)
    point = snapshot(model)
    train(model, data, train_cfg, callbacks=[MaskCallback()], val_loader=val_loader)
    history = [LotteryRound(0, mask_sparsity(get_masks(model))["(all)"] if get_masks(model) else 0.0,
                            evaluate(model, val_loader)["top1"] if val_loader is not None else None)]
    for k in range(1, rounds + 1):
        prune_unstructured(model, cfg.scaled(k / rounds) if k < rounds else cfg)
        rewind(model, point)
        train(model, data, dataclasses.replace(train_cfg, seed=train_cfg.seed + k),
              callbacks=[MaskCallback()], val_loader=val_loader)
        history.append(LotteryRound(k, mask_sparsity(get_masks(model))["(all)"],
                                    evaluate(model, val_loader)["top1"] if val_loader is not None else None))
    return model, history


def random_reinit_control(model: nn.Module, seed: int = 0) -> nn.Module:
    """The lottery paper's control: the same mask with fresh random weights (a copy, masked)."""
    ctrl = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _n, p in ctrl.named_parameters():
            if p.dim() > 1:
                bound = 1.0 / max(1, p[0].numel()) ** 0.5  # the nn.Linear / Conv default range
                p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=gen))
    return apply_masks(ctrl, get_masks(model), combine=False)
