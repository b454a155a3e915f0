"""Teachers: one model or an ensemble, run frozen (eval mode, no autograd), and an optional
cache of their outputs over a fixed transfer set.

A :class:`Teacher` never modifies the models it wraps: it does not flip ``requires_grad`` (a
teacher is often the very baseline other steps go on to fine-tune); it runs them under
``torch.no_grad()`` in eval mode and restores each model's train/eval flag afterwards.
It returns the members' logits stacked as (N, K, C); how they are combined (mean of logits or
of probabilities, weights) is the loss's business, since averaging probabilities depends on T.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from deepshrink.errors import ModelError
from deepshrink.modeling import Inputs, call, eval_mode, output_tensor


def _first_tensor(output: object, name: str) -> torch.Tensor:
    """A module's output as one tensor: itself, or the first element of a tuple / HF output."""
    if hasattr(output, "to_tuple"):  # transformers ModelOutput: its first field
        output = output.to_tuple()
    try:
        return output_tensor(output)
    except ModelError:
        raise ModelError(f"module {name!r} returns {type(output).__name__}, not a tensor to match") from None


class FeatureTap:
    """Forward hooks that keep the latest output of the named submodules of ``model``."""

    def __init__(self, model: nn.Module, names: Sequence[str], what: str = "model") -> None:
        modules = dict(model.named_modules())
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in self.names:
            if name not in modules:
                known = [n for n in modules if n]
                raise ModelError(f"{what} has no module named {name!r}",
                                 hint=f"modules: {', '.join(known[:30])}")
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            self.features[name] = _first_tensor(output, name)

        return hook

    def get(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise ModelError(f"modules {missing} did not run in the forward pass")
        return [self.features[n] for n in self.names]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.features.clear()


class Teacher:
    """One frozen model or an ensemble. ``teacher(inputs)`` -> stacked logits (N, K, C); inputs
    are a tensor, a tuple of positional tensors or a dict of keyword tensors."""

    def __init__(self, models: nn.Module | Sequence[nn.Module]) -> None:
        members = [models] if isinstance(models, nn.Module) else list(models)
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise ModelError("a teacher is an nn.Module or a non-empty sequence of them")
        self.members = members

    def __len__(self) -> int:
        return len(self.members)

    def __call__(self, x: Inputs) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for m in self.members:
                with eval_mode(m):
                    outs.append(output_tensor(call(m, x)).float())
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) != 1:
            raise ModelError(f"ensemble members disagree on output shape: {sorted(shapes)}")
        return torch.stack(outs, dim=1)


def as_teacher(teacher: Teacher | nn.Module | Sequence[nn.Module]) -> Teacher:
    return teacher if isinstance(teacher, Teacher) else Teacher(teacher)


def transfer_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A seeded loader. A TensorDataset is indexed once per batch (it accepts index lists),
    several times faster than collating single samples when the model is small."""
    gen = torch.Generator().manual_seed(seed)
    if not isinstance(dataset, TensorDataset):
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)
    base = RandomSampler(dataset, generator=gen) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(base, batch_size, drop_last=False), batch_size=None)


def cache_teacher_outputs(teacher: Teacher | nn.Module | Sequence[nn.Module], dataset: Dataset,
                          *, features: Sequence[str] = (), batch_size: int = 512) -> TensorDataset:
    """Run the teacher once over ``dataset`` (items ``(x, y, ...)``) and return a TensorDataset
    of ``(x, y, teacher_logits (N, K, C), *features)``. ``features`` name modules of the first
    teacher whose outputs are cached too (for hint distillation).

    The cache is only valid for these exact inputs: training on it with input augmentation
    would pair augmented images with the logits of the clean ones, so :func:`distill` refuses
    that combination.
    """
    t = as_teacher(teacher)
    tap = FeatureTap(t.members[0], features, "teacher") if features else None
    xs, ys, logits, feats = [], [], [], []
    try:
        for batch in transfer_loader(dataset, batch_size, shuffle=False):
            x, y = batch[0], batch[1]
            xs.append(x)
            ys.append(y)
            logits.append(t(x))
            if tap is not None:
                feats.append([f.detach() for f in tap.get()])
    finally:
        if tap is not None:
            tap.remove()
    cols = [torch.cat(xs), torch.cat(ys), torch.cat(logits)]
    cols += [torch.cat([f[i] for f in feats]) for i in range(len(features))]
    return TensorDataset(*cols)
