"""Persistent pruning masks: which weights are gone, kept so that fine-tuning cannot revive them.

A mask set is a plain dict ``{parameter_name: bool tensor}`` (``True`` = weight kept), with names as
in ``model.named_parameters()``. :func:`apply_masks` zeroes the pruned weights in place and attaches
the dict to the model (an attribute, not a buffer, so ``state_dict`` and checkpoints stay those of the
ordinary architecture); :class:`MaskCallback` keeps them exactly zero through
:func:`deepshrink.train.train`; :func:`make_permanent` drops the bookkeeping, leaving the zeros.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from deepshrink import distributed
from deepshrink.errors import ModelError
from deepshrink.train import Callback, TrainState

Masks = dict[str, torch.Tensor]
MASKS_ATTR = "deepshrink_masks"


def get_masks(model: nn.Module) -> Masks:
    """The masks attached to ``model`` (an empty dict if it was never pruned)."""
    return getattr(model, MASKS_ATTR, None) or {}


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def check_masks(model: nn.Module, masks: Masks) -> None:
    """Raise :class:`ModelError` naming the parameter if a mask does not fit the model."""
    params = _params(model)
    for name, m in masks.items():
        if name not in params:
            raise ModelError(f"mask for {name!r}: the model has no such parameter",
                             hint=f"parameters: {sorted(params)[:8]}")
        if m.shape != params[name].shape:
            raise ModelError(f"mask for {name!r} has shape {tuple(m.shape)}, "
                             f"the parameter {tuple(params[name].shape)}")
        if m.dtype != torch.bool:
            raise ModelError(f"mask for {name!r} must be a bool tensor, got {m.dtype}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks, *, combine: bool = True) -> nn.Module:
    """Zero the masked-out weights of ``model`` in place and attach ``masks`` to it.

    With ``combine`` (default) the new masks are AND-ed with masks already attached, so a weight
    pruned once stays pruned. Returns the model.
    """
    check_masks(model, masks)
    merged = dict(get_masks(model)) if combine else {}
    for name, m in masks.items():
        old = merged.get(name)
        merged[name] = m.clone() if old is None else (old & m)
    params = _params(model)
    for name, m in merged.items():
        params[name].mul_(m.to(params[name].device, params[name].dtype))
    object.__setattr__(model, MASKS_ATTR, merged)  # plain attribute: never saved as state
    return model


@torch.no_grad()
def reapply_masks(model: nn.Module) -> None:
    """Zero the attached masks' pruned weights again (after an optimizer step, a weight load)."""
    params = _params(model)
    for name, m in get_masks(model).items():
        params[name].mul_(m.to(params[name].device, params[name].dtype))


def masks_from_zeros(model: nn.Module, names: Iterable[str] | None = None) -> Masks:
    """Masks that keep exactly the non-zero entries of the named parameters (default: every
    weight of a Linear/Conv layer). Use after loading a pruned checkpoint to resume fine-tuning."""
    params = _params(model)
    if names is None:
        names = [f"{mod_name}.weight" if mod_name else "weight"
                 for mod_name, mod in model.named_modules()
                 if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    out: Masks = {}
    for n in names:
        if n not in params:
            raise ModelError(f"masks_from_zeros: the model has no parameter {n!r}")
        out[n] = params[n].detach() != 0
    return out


def make_permanent(model: nn.Module) -> nn.Module:
    """Forget the masks, keeping the zeros they produced: the model becomes an ordinary model whose
    pruned weights are zero (and may be trained back to non-zero). Returns the model."""
    reapply_masks(model)
    if hasattr(model, MASKS_ATTR):
        object.__delattr__(model, MASKS_ATTR)
    return model


remove = make_permanent  # the name torch.nn.utils.prune uses for the same step


def mask_sparsity(masks: Masks) -> dict[str, float]:
    """Fraction of pruned entries per masked parameter, plus ``"(all)"`` over all of them."""
    out = {n: 1.0 - float(m.sum()) / m.numel() for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    out["(all)"] = 1.0 - kept / total if total else 0.0
    return out


class MaskCallback(Callback):
    """Keeps pruned weights exactly zero during :func:`deepshrink.train.train`.

    After ``backward`` the gradients of pruned weights are zeroed (so momentum and Adam moments
    never build up for them); after each optimizer step the masks are re-applied, which also undoes
    what weight decay or stale optimizer state could move. ``masks=None`` uses the masks attached
    to the model when training begins (and follows later changes, e.g. by a gradual schedule).
    """

    def __init__(self, masks: Masks | None = None) -> None:
        self.masks = masks

    def _current(self, model: nn.Module) -> Masks:
        return self.masks if self.masks is not None else get_masks(model)

    def on_train_begin(self, state: TrainState) -> None:
        masks = self._current(state.model)
        check_masks(state.model, masks)
        # Data-parallel: every process must keep the same weights; masks scored on each
        # process's own data could differ, so rank 0's win (a no-op in one process).
        distributed.broadcast(masks.values())
        if self.masks is not None:
            apply_masks(state.model, self.masks)
        else:
            reapply_masks(state.model)
        self._params = _params(state.model)

    def after_backward(self, state: TrainState) -> None:
        for name, m in self._current(state.model).items():
            g = self._params[name].grad
            if g is not None:
                g.mul_(m.to(g.device, g.dtype))

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        for name, m in self._current(state.model).items():
            p = self._params[name]
            p.mul_(m.to(p.device, p.dtype))

    def on_train_end(self, state: TrainState) -> None:
        # train(keep_best=True) loads a saved state after the last step: mask it too.
        self.on_step_end(state)
