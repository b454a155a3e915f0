"""Parameter counts, per-layer sparsity and MACs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from deepshrink.modeling import Inputs, as_inputs, call, eval_mode

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


@dataclasses.dataclass
class LayerStats:
    name: str
    type: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    macs: int = 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["sparsity"] = self.sparsity
        return d


def _register_cpu_attention() -> None:
    # torch's counter knows the CUDA fused-attention kernels but not the CPU one that
    # scaled_dot_product_attention dispatches to here; without this, attention counts as 0.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_attention()


def _weight_of(module: nn.Module) -> torch.Tensor | None:
    """The dense weight of a layer, also for compressed layers that expose ``dense_weight()``."""
    if hasattr(module, "dense_weight"):
        return module.dense_weight()  # type: ignore[operator]
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) over all parameters, tied parameters counted once. Layers that hold
    their weights in compressed form report the dense-equivalent through ``dense_weight()``."""
    total = nonzero = 0
    seen: set[int] = set()
    for module in model.modules():
        if hasattr(module, "dense_weight"):
            w = module.dense_weight()  # type: ignore[operator]
            total += w.numel()
            nonzero += int(torch.count_nonzero(w))
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def layer_stats(model: nn.Module, macs: dict[str, int] | None = None) -> list[LayerStats]:
    """One row per layer that owns a weight (Linear, Conv, norms, embeddings, compressed)."""
    rows = []
    for name, module in model.named_modules():
        w = _weight_of(module)
        if w is None or (list(module.children()) and not hasattr(module, "dense_weight")):
            continue
        rows.append(LayerStats(name or "(root)", type(module).__name__, tuple(w.shape),
                               w.numel(), int(torch.count_nonzero(w.detach())),
                               (macs or {}).get(name, 0)))
    return rows


def count_macs(model: nn.Module, example: Inputs) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates of one forward pass on ``example`` (whatever its batch size; a tensor,
    a tuple of positional tensors or a dict of keyword tensors).

    Matrix products (Linear, Conv, attention's batched matmuls and fused attention) are counted at
    the operator level with torch's FlopCounterMode (FLOPs / 2), so functional matmuls inside
    attention are included. Normalisation layers add one MAC per output element (the folded
    scale-and-shift). Modules whose kernels the counter cannot see (sparse matmuls) report their
    own work through a ``count_macs(output) -> int`` method. Returns (total, per-module-name MACs).
    """
    example = as_inputs(example, "example")
    per_module: dict[str, int] = {}
    hooked_macs: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if callable(getattr(m, "count_macs", None)):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: hooked_macs.__setitem__(
                    name, hooked_macs.get(name, 0) + int(mod.count_macs(out)))))
        elif isinstance(m, _NORMS):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: hooked_macs.__setitem__(
                    name, hooked_macs.get(name, 0) + out.numel())))
    counter = FlopCounterMode(display=False)
    try:
        with eval_mode(model), torch.no_grad(), counter:
            call(model, example)
    finally:
        for h in hooks:
            h.remove()
    flops_by_module = counter.get_flop_counts()
    names = {type(model).__name__: ""}
    # FlopCounterMode names modules by their path under the root class name ("Sequential.1").
    root = type(model).__name__
    for key, ops in flops_by_module.items():
        if key == "Global":
            continue
        path = key[len(root) + 1:] if key.startswith(root + ".") else names.get(key, key)
        per_module[path] = sum(int(v) for v in ops.values()) // 2
    total = int(sum(flops_by_module.get("Global", {}).values())) // 2
    for name, n in hooked_macs.items():
        per_module[name] = per_module.get(name, 0) + n
        total += n
    return total, per_module
