"""Helpers both redesign transforms share: which layers are candidates, what their inputs look
like on the example/calibration data, whether a rewritten layer is really faster, and the
validation of recorded edits read back from a file."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepshrink.errors import FormatError
from deepshrink.modeling import Inputs, calibration_batches, call, eval_mode, set_submodule
from deepshrink.models.schema import Int, Map, Obj, Schema

# Inputs kept per layer for fitting (rows of the batch dimension); enough for a least-squares fit
# of a few thousand unknowns over many pixels/tokens, small enough to hold every layer at once.
MAX_ROWS = 256


def tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters owned by more than one module (tied weights): never rewritten."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {k for k, n in owners.items() if n > 1}


def candidates(model: nn.Module, types: tuple[type, ...]) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, reason)`` for every layer of exactly one of ``types`` (subclasses such as
    MultiheadAttention's out-projection are used by their parent without calling them). ``reason``
    is empty for a layer that may be rewritten, else why not."""
    tied = tied_parameters(model)
    inside_mha = {f"{n}.{c}" if n else c for n, m in model.named_modules()
                  if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_children()}
    out = []
    for name, m in model.named_modules():
        if type(m) not in types or not name:
            continue
        reason = ""
        if name in inside_mha:
            reason = "inside nn.MultiheadAttention (its weights are read directly)"
        elif id(m.weight) in tied:
            reason = "tied weight (shared with another layer)"
        out.append((name, m, reason))
    return out


@dataclasses.dataclass
class LayerInputs:
    """What a layer saw on the example/calibration data: some of its inputs, and per sample how
    many positions (pixels, tokens) its output has."""

    x: list[torch.Tensor] = dataclasses.field(default_factory=list)
    rows: int = 0
    positions: int = 0


def capture_inputs(model: nn.Module, names: list[str], batches: list[Inputs],
                   max_rows: int = MAX_ROWS) -> dict[str, LayerInputs]:
    """Run ``batches`` through ``model`` (eval mode, no grad) and keep the first ``max_rows`` rows
    of each named layer's input."""
    seen: dict[str, LayerInputs] = {n: LayerInputs() for n in names}

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            rec, x = seen[name], args[0]
            rec.positions = int(out[0].numel() // out.shape[-1]) if isinstance(mod, nn.Linear) \
                else int(out.shape[-1] * out.shape[-2])
            if rec.rows < max_rows:
                take = x[: max_rows - rec.rows].detach()
                rec.x.append(take)
                rec.rows += take.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            for b in batches:
                call(model, b)
    finally:
        for h in handles:
            h.remove()
    return seen


def batches_for(example_inputs: Any, calibration: Any, n: int) -> list[Inputs]:
    """Calibration batches, else the example inputs as one batch, else nothing."""
    if calibration is not None:
        return calibration_batches(calibration, n)
    if example_inputs is not None:
        return calibration_batches(example_inputs, 1, batch_size_hint=1 << 30, what="example_inputs")
    return []


def relative_error(new: torch.Tensor, ref: torch.Tensor) -> float:
    return float((new - ref).norm() / ref.norm().clamp_min(1e-12))


def speed_ratio(old: nn.Module, new: nn.Module, x: torch.Tensor, rounds: int = 7,
                min_time_s: float = 0.01) -> float:
    """Median over interleaved rounds of time(old) / time(new) on ``x`` (> 1: ``new`` is faster).
    Old and new alternate so a change in machine load hits both."""
    ratios = []
    with torch.inference_mode():
        old(x), new(x)  # warm up
        for _ in range(rounds):
            t_old, t_new = _time(old, x, min_time_s), _time(new, x, min_time_s)
            ratios.append(t_old / t_new)
    return statistics.median(ratios)


def _time(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, min_time_s: float) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time_s:
            return dt / n


def speed_input(rec: LayerInputs, batch: int) -> torch.Tensor | None:
    """The first captured input row repeated ``batch`` times (None when the layer never ran)."""
    if not rec.x:
        return None
    first = rec.x[0][:1]
    return first.expand(batch, *first.shape[1:]).contiguous()


# -- edits read back from files -----------------------------------------------------------------
MAX_LAYERS = 4096
DIM = Int(1, 1 << 31)


def layers_edit_schema(layer: Schema) -> Schema:
    """The schema of an edit whose one field is ``layers`` (``{module path: record}``, each record
    checked by ``layer``): what both redesign edits record."""
    return Obj({"layers": Map(layer, max_len=MAX_LAYERS)})


def replay_layers(model: nn.Module, edit: dict[str, Any], kind: str, schema: Schema,
                  rebuild: Callable[[nn.Module, str, dict[str, Any], str], nn.Module]) -> nn.Module:
    """Replay a recorded ``layers`` edit: check it against ``schema``, then swap each named layer
    for ``rebuild(model, name, record, where)`` (which raises FormatError on a mismatch)."""
    where = f"edit {kind!r}"
    fields = schema({k: v for k, v in edit.items() if k != "kind"}, where)
    for name, rec in fields["layers"].items():
        set_submodule(model, name, rebuild(model, name, rec, f"{where}.layers[{name!r}]"))
    return model


def module_at(model: nn.Module, name: str, want: type, where: str) -> nn.Module:
    """The submodule an edit names, which must be of type ``want`` (FormatError otherwise)."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise FormatError(f"{where}: the model has no layer {name!r}") from None
    if type(mod) is not want:
        raise FormatError(f"{where}: layer {name!r} is a {type(mod).__name__}, the edit needs "
                          f"{want.__name__}")
    return mod


def shaped_module_at(model: nn.Module, name: str, want: type, shape: list[int], where: str) -> nn.Module:
    """:func:`module_at`, and its weight must have the recorded ``shape`` (FormatError otherwise)."""
    mod = module_at(model, name, want, where)
    if list(mod.weight.shape) != shape:
        raise FormatError(f"{where}.shape: {shape} but the layer's weight is {list(mod.weight.shape)}")
    return mod
