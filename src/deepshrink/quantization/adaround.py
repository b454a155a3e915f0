"""AdaRound-lite (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"): choose, per weight, rounding up or down so that the layer's *output* on
calibration inputs moves least, instead of rounding each weight to nearest.

Per layer, independently, on the float model's inputs to that layer: a soft rounding
``h(V) = clip(sigmoid(V) (ζ - γ) + γ, 0, 1)`` (ζ = 1.1, γ = -0.1) starts at the nearest-rounding
residue; Adam minimizes the relative output error of ``s (floor(W / s) + h)`` plus a
regularizer ``1 - |2h - 1|^β`` (β annealed 20 -> 2) that pushes every ``h`` to 0 or 1; the
result is rounded hard (``h >= 0.5``). Scales and zero points stay as calibrated, so the grid,
the file format and the ONNX export are unchanged. "Lite": a few hundred steps per layer on a
handful of calibration batches, layers independent (not sequential on quantized inputs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepshrink.modeling import call, eval_mode

ZETA, GAMMA = 1.1, -0.1


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: dict[str, nn.Module],
                 batches: list[Any]) -> dict[str, torch.Tensor]:
    """The float inputs of each layer over ``batches`` (concatenated along the batch axis)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: got[n].append(a[0].detach().clone()))
             for n, m in layers.items()]
    try:
        with eval_mode(model):
            for x in batches:
                call(model, x)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items() if v}


def _h(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def adaround_layer(qlayer: Any, weight: torch.Tensor, x: torch.Tensor, steps: int = 300,
                   lr: float = 0.1, reg: float = 1.0) -> float:
    """Re-choose the rounding of ``qlayer``'s codes (a :class:`QuantizedLayer` with per-channel
    symmetric weights) for float ``weight`` on inputs ``x``; returns the relative output error
    after (hard rounding). Keeps the old codes when they were better."""
    from deepshrink.quantization.core import qrange
    from deepshrink.quantization.modules import apply_layer

    shape = (-1,) + (1,) * (weight.dim() - 1)
    scale = qlayer.scale.reshape(shape).float()
    zero = qlayer.zero_rows().reshape(shape).float()
    qmin, qmax = qrange(qlayer.spec.bits, qlayer.spec.symmetric, qlayer.spec.narrow)
    w = weight.detach().float()
    base = torch.floor(w / scale)
    rest = (w / scale - base).clamp(0.01, 0.99)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    conv = None if qlayer.kind == "linear" else qlayer.conv
    with torch.no_grad():
        target = apply_layer(qlayer.kind, x, w, None, conv)
        norm = target.pow(2).mean().clamp_min(1e-20)

    def err(wq: torch.Tensor) -> torch.Tensor:
        return (apply_layer(qlayer.kind, x, wq, None, conv) - target).pow(2).mean() / norm

    def dequant(h: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(base + h, qmin - zero, qmax - zero)) * scale

    with torch.no_grad():  # the regularizer is weighed against the error of nearest rounding
        reg = reg * float(err(qlayer.dense_weight().reshape(w.shape).float()))
    opt = torch.optim.Adam([v], lr=lr)
    warm = steps // 5
    for i in range(steps):
        opt.zero_grad()
        h = _h(v)
        loss = err(dequant(h))
        if i >= warm:
            beta = 20 - (20 - 2) * (i - warm) / max(1, steps - warm)
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        new = torch.clamp(base + (v >= 0).float(), qmin - zero, qmax - zero)
        old_err = float(err(qlayer.dense_weight().reshape(w.shape).float()))
        new_err = float(err(new * scale))
        if new_err < old_err:
            q_codes = (new + zero).reshape(qlayer.int_rows().shape)
            qlayer.set_codes(q_codes, qlayer.scale, qlayer.zero_rows().reshape(-1))
            qlayer.reset_cache()
            return new_err
    return old_err


__all__ = ["adaround_layer", "layer_inputs"]
