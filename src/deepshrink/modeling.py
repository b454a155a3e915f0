"""Calling a model and reading what it returns: the one place that knows the input forms.

Every technique family calls models through this module, so a model that accepts a tensor, a
tuple of positional tensors or a dict of keyword tensors (what a `transformers` tokenizer or image
processor returns) works everywhere, and so does one whose output is a tensor, a tuple, a
`transformers` ``ModelOutput`` with ``logits`` or only ``last_hidden_state`` (a plain encoder).

The vocabulary:

* **inputs** — one batch of model inputs: a ``Tensor``, a ``tuple`` of positional tensors, or a
  ``dict`` of keyword tensors. (A ``list`` is *not* an input: it is a list of batches.)
* **batch** — what a data source yields: inputs, or an ``(inputs, target)`` pair. A pair is
  recognised as a 2-tuple/list whose second item is a 1-D integer tensor as long as the batch
  (class labels), or a dict with a ``labels`` key (the `transformers` convention).
* **calibration** — a source of batches: a ``DataBundle`` (its train split), a ``DataLoader``, a
  list of batches, any iterable of batches, or a single inputs value (split into batches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from deepshrink.errors import DataError, ModelError

Inputs = torch.Tensor | tuple | dict
Batch = tuple[Inputs, torch.Tensor | None]

#: Output fields tried in order when no output name is given.
OUTPUT_FIELDS = ("logits", "last_hidden_state")

__all__ = [
    "OUTPUT_FIELDS",
    "Batch",
    "Inputs",
    "as_inputs",
    "batch_size",
    "calibration_batches",
    "call",
    "eval_mode",
    "forward",
    "input_batches",
    "output_shape",
    "output_tensor",
    "select",
    "set_submodule",
    "split_batch",
    "tile",
    "to_device",
]


# -- inputs -----------------------------------------------------------------------------------
def _is_tensorish(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def as_inputs(x: Any, what: str = "example_inputs") -> Inputs:
    """Check that ``x`` is one batch of inputs (tensor, tuple of tensors, dict of tensors) and
    return it. A ``list`` is read as a list of batches and its first batch is returned; a
    ``BatchEncoding`` (a dict subclass) becomes a plain dict."""
    if isinstance(x, list):
        if not x:
            raise DataError(f"{what} is an empty list", hint="give a tensor, tuple or dict of tensors")
        return as_inputs(split_batch(x[0])[0], what)
    if _is_tensorish(x):
        return x
    if isinstance(x, tuple) and x and all(_is_tensorish(t) or t is None for t in x):
        return x
    if isinstance(x, Mapping) and x and all(isinstance(k, str) for k in x):
        bad = [k for k, v in x.items() if not (_is_tensorish(v) or v is None)]
        if not bad:
            return dict(x)
        raise DataError(f"{what}: the values of keys {bad} are not tensors",
                        hint="pass return_tensors='pt' to the tokenizer")
    raise DataError(f"{what} must be a tensor, a tuple of positional tensors or a dict of keyword "
                    f"tensors, got {type(x).__name__}")


def split_batch(batch: Any) -> Batch:
    """``(inputs, target or None)`` from one batch (see the module docstring for the forms)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and _looks_like_labels(batch[1], batch[0]):
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0], None
    if isinstance(batch, Mapping) and "labels" in batch:
        rest = {k: v for k, v in batch.items() if k != "labels"}
        return rest, batch["labels"]
    if isinstance(batch, list):
        return tuple(batch), None
    return batch, None


def _looks_like_labels(y: Any, x: Any) -> bool:
    if not isinstance(y, torch.Tensor) or y.dim() != 1:
        return False
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        return False
    try:
        return y.shape[0] == batch_size(x)
    except DataError:
        return False


def batch_size(inputs: Inputs) -> int:
    """The leading dimension of the first tensor in ``inputs``."""
    for t in _tensors(inputs):
        if t.dim() == 0:
            break
        return int(t.shape[0])
    raise DataError("cannot tell the batch size of the inputs (no tensor with a batch dimension)")


def _tensors(inputs: Any) -> Iterator[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        yield inputs
    elif isinstance(inputs, (tuple, list)):
        for v in inputs:
            yield from _tensors(v)
    elif isinstance(inputs, Mapping):
        for v in inputs.values():
            yield from _tensors(v)


def select(inputs: Inputs, index: Any) -> Inputs:
    """The rows ``index`` (a slice, an index tensor or a mask) of every tensor in ``inputs``."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if isinstance(inputs, tuple):
        return tuple(None if t is None else t[index] for t in inputs)
    if isinstance(inputs, Mapping):
        return {k: None if v is None else v[index] for k, v in inputs.items()}
    raise DataError(f"cannot index inputs of type {type(inputs).__name__}")


def tile(inputs: Inputs, n: int) -> Inputs:
    """A batch of ``n`` copies of the first row of ``inputs`` (for timing at a batch size)."""
    def rep(t: torch.Tensor) -> torch.Tensor:
        return t[:1].expand(n, *t.shape[1:]).contiguous()

    if isinstance(inputs, torch.Tensor):
        return rep(inputs)
    if isinstance(inputs, tuple):
        return tuple(None if t is None else rep(t) for t in inputs)
    if isinstance(inputs, Mapping):
        return {k: None if v is None else rep(v) for k, v in inputs.items()}
    raise DataError(f"cannot tile inputs of type {type(inputs).__name__}")


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """Move every tensor in ``inputs`` (any nesting of tuples, lists and dicts) to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs


# -- calling ----------------------------------------------------------------------------------
def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model(x)``, ``model(*args)`` or ``model(**kwargs)`` according to the form of ``inputs``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def output_tensor(output: Any, name: str | None = None) -> torch.Tensor:
    """The tensor a technique should look at in a model's ``output``.

    ``name`` picks a field of a dict / ``ModelOutput`` (or an index into a tuple, as a string of
    digits). Without it: a tensor is itself; a ``ModelOutput`` gives ``logits`` or else
    ``last_hidden_state``; a tuple gives its first item.
    """
    if name is not None:
        return _named_output(output, name)
    if isinstance(output, torch.Tensor):
        return output
    for field in OUTPUT_FIELDS:
        value = output.get(field) if isinstance(output, Mapping) else getattr(output, field, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"cannot find the output tensor in a model output of type {type(output).__name__}",
                     hint=f"name the output to use (one of the fields of the output, e.g. {OUTPUT_FIELDS})")


def _named_output(output: Any, name: str) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and name.isdigit() and int(name) < len(output):
        value = output[int(name)]
    elif isinstance(output, Mapping):
        value = output.get(name)
    else:
        value = getattr(output, name, None)
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"the model output has no tensor named {name!r}")
    return value


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch ``model`` to eval mode, restoring every submodule's own training flag on exit
    (a model may be partly frozen in eval mode on purpose)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def run_hooked(model: nn.Module, batches: Iterable[Any], hooks: list[Any]) -> None:
    """Run ``model`` over ``batches`` (each one model input) in eval mode for what the forward
    ``hooks`` (handles already registered on it) record; the hooks are removed afterwards, also
    on an error, so a failed calibration never leaves the model instrumented."""
    try:
        with eval_mode(model):
            for x in batches:
                call(model, x)
    finally:
        for h in hooks:
            h.remove()


def forward(model: nn.Module, inputs: Any, *, output: str | None = None, grad: bool = False) -> torch.Tensor:
    """Run ``model`` on ``inputs`` in eval mode (no grad unless asked) and return its output
    tensor (see :func:`output_tensor`)."""
    inputs = as_inputs(inputs)
    with eval_mode(model), torch.set_grad_enabled(grad):
        return output_tensor(call(model, inputs), output)


def output_shape(model: nn.Module, inputs: Any, output: str | None = None) -> tuple[int, ...]:
    """The shape of :func:`forward`'s result (used to check that an edit kept the interface)."""
    return tuple(forward(model, inputs, output=output).shape)


# -- module tree ------------------------------------------------------------------------------
def set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted path ``name`` by ``new``; returns the old one."""
    if not name:
        raise ModelError("cannot replace the root module in place")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = parent.get_submodule(child)
    except AttributeError as e:
        raise ModelError(f"the model has no submodule {name!r}") from e
    setattr(parent, child, new)
    return old


# -- calibration ------------------------------------------------------------------------------
def input_batches(calibration: Any, limit: int, *, batch_size_hint: int = 64,
                  what: str = "calibration") -> list[Batch]:
    """Up to ``limit`` ``(inputs, target or None)`` batches from any calibration source."""
    if calibration is None:
        return []
    if limit < 1:
        raise DataError(f"{what}: the number of batches must be at least 1, got {limit}")
    loader = getattr(calibration, "loader", None)
    if callable(loader) and hasattr(calibration, "train"):  # a DataBundle
        calibration = loader("train", batch_size_hint, shuffle=True, seed=0)
    if isinstance(calibration, (torch.Tensor, tuple, Mapping)):
        return _split_inputs(as_inputs(calibration, what), limit, batch_size_hint)
    if not isinstance(calibration, Iterable):
        raise DataError(f"{what} must be a DataLoader, a list of batches, an iterable or a tensor, "
                        f"got {type(calibration).__name__}")
    out: list[Batch] = []
    for batch in calibration:
        if len(out) >= limit:
            break
        x, y = split_batch(batch)
        out.append((as_inputs(x, f"{what} batch {len(out)}"), y))
    if not out:
        raise DataError(f"{what} yielded no batches")
    return out


def calibration_batches(calibration: Any, limit: int, *, batch_size_hint: int = 64,
                        what: str = "calibration") -> list[Inputs]:
    """Like :func:`input_batches` but the inputs only (targets dropped)."""
    return [x for x, _ in input_batches(calibration, limit, batch_size_hint=batch_size_hint, what=what)]


def _split_inputs(inputs: Inputs, limit: int, size: int) -> list[Batch]:
    n = batch_size(inputs)
    return [(select(inputs, slice(i, i + size)), None) for i in range(0, n, size)][:limit]
