"""Data-free tools for depthwise-heavy CNNs (Nagel et al. 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction"):

* :func:`equalize` — cross-layer equalization. For a conv ``W1`` whose output (after an optional
  ReLU) feeds only the conv ``W2``, scaling output channel ``i`` of ``W1`` (and its bias) by
  ``1/s_i`` and input channel ``i`` of ``W2`` by ``s_i`` leaves the function unchanged, because
  ``relu(x / s) = relu(x) / s`` for ``s > 0``. With ``s_i = sqrt(r1_i / r2_i)`` (``r`` the
  per-channel weight ranges) both channels end with range ``sqrt(r1_i r2_i)``, so per-channel —
  and especially depthwise — weights with wildly different channel ranges quantize well.
  A ReLU6 is not scale-equivariant: as in the paper it becomes a ReLU (``relu6_to_relu``), which
  changes the float function slightly; :class:`EqualizeResult` reports which.
* :func:`input_means` / :func:`correct_bias` — bias correction: the expected output error that
  weight rounding causes, ``E[(W_q - W) x]`` per output channel, is subtracted from the bias
  (with the empirical per-channel input mean from calibration batches).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from deepshrink import modeling
from deepshrink.quantization.fold import FOLDABLE, GraphTrace, trace_graph


@dataclasses.dataclass
class EqualizeResult:
    pairs: list[tuple[str, str]]  # (producer, consumer) conv names that were equalized
    relu6_replaced: list[str]  # ReLU6 modules turned into ReLU (function changed slightly)


_PASS = (nn.ReLU, nn.Identity, nn.Dropout)


def _pairs(model: nn.Module, trace: GraphTrace, relu6: bool) -> list[tuple[str, str, list[str]]]:
    """(conv1, conv2, activations between) where conv1's output reaches only conv2, through
    ReLU / Identity (and ReLU6 when ``relu6``) modules, each running once."""
    modules = dict(model.named_modules())
    by_input: dict[Any, list] = {}
    for c in trace.calls:
        for k in c.inputs:
            by_input.setdefault(k, []).append(c)
    out: list[tuple[str, str, list[str]]] = []
    for call in trace.calls:
        if not isinstance(modules[call.name], (nn.Conv2d, nn.Conv1d)) or trace.call_count[call.name] != 1:
            continue
        cur, acts = call, []
        while cur.output is not None and trace.uses[cur.output] == 1 and len(by_input.get(cur.output, [])) == 1:
            nxt = by_input[cur.output][0]
            m = modules[nxt.name]
            if trace.call_count[nxt.name] != 1 or len(nxt.inputs) != 1:
                break
            if isinstance(m, (nn.Conv2d, nn.Conv1d)):
                if _compatible(modules[call.name], m):
                    out.append((call.name, nxt.name, acts))
                break
            if isinstance(m, _PASS) or (relu6 and isinstance(m, nn.ReLU6)):
                acts.append(nxt.name)
                cur = nxt
                continue
            break
    return out


def _compatible(c1: nn.Module, c2: nn.Module) -> bool:
    if c1.out_channels != c2.in_channels:
        return False
    return c2.groups == 1 or c2.groups == c2.in_channels  # dense or depthwise consumer


def _ranges(c1: nn.Module, c2: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    r1 = c1.weight.detach().abs().flatten(1).amax(1)
    w2 = c2.weight.detach().abs()
    r2 = w2.flatten(1).amax(1) if c2.groups > 1 else w2.transpose(0, 1).flatten(1).amax(1)
    return r1, r2


@torch.no_grad()
def _scale_pair(c1: nn.Module, c2: nn.Module) -> None:
    r1, r2 = _ranges(c1, c2)
    ok = (r1 > 1e-8) & (r2 > 1e-8)
    s = torch.where(ok, (r1 / r2.clamp_min(1e-8)).sqrt(), torch.ones_like(r1)).clamp(1e-4, 1e4)
    view1 = (-1,) + (1,) * (c1.weight.dim() - 1)
    c1.weight.div_(s.reshape(view1))
    if c1.bias is not None:
        c1.bias.div_(s)
    if c2.groups > 1:  # depthwise: input channel i is weight row i
        c2.weight.mul_(s.reshape(view1))
    else:
        c2.weight.mul_(s.reshape((1, -1) + (1,) * (c2.weight.dim() - 2)))


def equalize(model: nn.Module, *, example_inputs: Any, iterations: int = 4,
             relu6_to_relu: bool = True) -> EqualizeResult:
    """Cross-layer equalization, **in place** (run after :func:`fold.fold_batchnorm`)."""
    trace = trace_graph(model, example_inputs)
    pairs = _pairs(model, trace, relu6_to_relu)
    modules = dict(model.named_modules())
    replaced = sorted({a for _, _, acts in pairs for a in acts if isinstance(modules[a], nn.ReLU6)})
    for name in replaced:
        modeling.set_submodule(model, name, nn.ReLU(inplace=getattr(modules[name], "inplace", False)))
    for _ in range(iterations):  # chains (pw -> dw -> pw) converge over a few sweeps
        for a, b, _acts in pairs:
            _scale_pair(modules[a], modules[b])
    return EqualizeResult([(a, b) for a, b, _ in pairs], replaced)


@torch.no_grad()
def input_means(model: nn.Module, names: list[str], batches: list[Any]) -> dict[str, torch.Tensor]:
    """Per-input-channel mean of each named Conv / Linear's input over the batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    modules = dict(model.named_modules())

    def hook(name: str) -> Any:
        def fn(m: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            dims = [d for d in range(x.dim()) if d != (x.dim() - 1 if isinstance(m, nn.Linear) else 1)]
            sums[name] = sums.get(name, 0) + x.sum(dims)
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[-1 if isinstance(m, nn.Linear) else 1]
        return fn

    for n in names:
        hooks.append(modules[n].register_forward_pre_hook(hook(n)))
    try:
        with modeling.eval_mode(model):
            for x in batches:
                modeling.call(model, x)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


@torch.no_grad()
def bias_shift(float_weight: torch.Tensor, quant_weight: torch.Tensor, mean_in: torch.Tensor,
               groups: int = 1) -> torch.Tensor:
    """``E[(W_q - W) x]`` per output channel for inputs with per-channel mean ``mean_in``
    (zero padding at the borders is ignored)."""
    dw = (quant_weight - float_weight).double()
    s = dw.flatten(2).sum(2) if dw.dim() > 2 else dw  # (out, in / groups)
    out_ch, per = s.shape
    m = mean_in.double().reshape(groups, per)
    m = m.repeat_interleave(out_ch // groups, dim=0)  # (out, in / groups): each channel's group
    return (s * m).sum(1).float()


def correct_bias(layer: nn.Module, float_weight: torch.Tensor, mean_in: torch.Tensor) -> None:
    """Subtract the expected rounding error from ``layer``'s (a QuantizedLayer's) bias."""
    if layer.bias is None or layer.kind not in ("conv1d", "conv2d", "linear"):
        return
    groups = layer.conv.get("groups", 1) if layer.kind != "linear" else 1
    shift = bias_shift(float_weight, layer.dense_weight(), mean_in, groups)
    layer.bias.data.sub_(shift)


__all__ = ["FOLDABLE", "EqualizeResult", "bias_shift", "correct_bias", "equalize", "input_means"]
