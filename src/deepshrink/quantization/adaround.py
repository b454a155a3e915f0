"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"):
choose, per weight, rounding up or down so that the layer's *output* on calibration inputs moves
least, instead of rounding each weight to nearest.

A soft rounding ``h(V) = clip(sigmoid(V) (ζ - γ) + γ, 0, 1)`` (ζ = 1.1, γ = -0.1) starts at the
nearest-rounding residue; Adam minimizes the relative output error of ``s (floor(W / s) + h)``
plus a regularizer ``1 - |2h - 1|^β`` (β annealed 20 -> 2) that pushes every ``h`` to 0 or 1; the
result is rounded hard (``h >= 0.5``). Scales and zero points stay as calibrated, so the grid,
the file format and the ONNX export are unchanged; a layer keeps nearest rounding when that
is better.

* :func:`adaround_sequential` (what ``PTQConfig(adaround=True)`` runs): the paper's setting —
  layer by layer in the order the model runs them, each on its input *in the already quantized
  model* (so it also compensates the errors of the layers before it), against the float
  layer's output on float inputs, with the absorbed activation on both sides; conv inputs as
  im2col rows sampled over all calibration batches, a minibatch of rows per step. On the real
  MobileNetV2 (bench/quantization.py) it is what lifts the embedding cosine above 0.99.
* :func:`adaround_layer`: one layer on given inputs (no model needed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepshrink.modeling import call, eval_mode, run_hooked

ZETA, GAMMA = 1.1, -0.1


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: dict[str, nn.Module],
                 batches: list[Any]) -> dict[str, torch.Tensor]:
    """The float inputs of each layer over ``batches`` (concatenated along the batch axis)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: got[n].append(a[0].detach().clone()))
             for n, m in layers.items()]
    run_hooked(model, batches, hooks)
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



# -- sequential AdaRound (the paper's setting) ---------------------------------------------------
class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, batch: Any) -> torch.Tensor:
    """``module``'s input when ``model`` runs on ``batch`` (the pass stops right there)."""
    got: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        got.append(args[0].detach())
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        with eval_mode(model):
            call(model, batch)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


@torch.no_grad()
def run_order(model: nn.Module, names: list[str], batch: Any) -> list[str]:
    """``names`` in the order ``model`` first calls those modules (unused ones last)."""
    seen: list[str] = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, n=n: None if n in seen else seen.append(n)) for n in names]
    try:
        with eval_mode(model):
            call(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen + [n for n in names if n not in seen]


def _patches(kind: str, conv: dict[str, Any], shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of a grouped matmul: (positions, groups, K) — im2col for a conv
    (K = in_channels / groups x kernel), the rows of x for a linear (one group)."""
    if kind == "linear":
        return x.reshape(-1, 1, x.shape[-1])
    if kind == "conv1d":
        x, k = x.unsqueeze(2), (1, shape[2])
        pad, stride, dil = (0, conv["padding"][0]), (1, conv["stride"][0]), (1, conv["dilation"][0])
    else:
        k, pad, stride, dil = tuple(shape[2:]), conv["padding"], conv["stride"], conv["dilation"]
    cols = torch.nn.functional.unfold(x, k, dilation=dil, padding=pad, stride=stride)  # (N, C*k, L)
    g, n, ck, positions = conv["groups"], cols.shape[0], cols.shape[1], cols.shape[-1]
    return cols.reshape(n, g, ck // g, positions).permute(0, 3, 1, 2).reshape(-1, g, ck // g)


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """(out, in/groups, *k) weight -> (groups, out/groups, K)."""
    return w.reshape(groups, w.shape[0] // groups, -1)


def _rows_out(p: torch.Tensor, wg: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.einsum("pgk,gok->pgo", p, wg).reshape(p.shape[0], -1)
    return y if bias is None else y + bias


def _layer_input(q: Any, x: torch.Tensor) -> torch.Tensor:
    """What a :class:`QuantizedLayer` computes with: its input after smoothing and quantization."""
    from deepshrink.quantization.modules import act_fake_quant, dynamic_fake_quant

    if q.in_mul is not None:
        x = x * q.in_mul
    if q.mode == "static":
        return act_fake_quant(x, q.in_scale, q.in_zero, q.act_bits)
    return dynamic_fake_quant(x) if q.mode == "dynamic" else x


@torch.no_grad()
def _sample_rows(qmodel: nn.Module, fmodel: nn.Module, name: str, batches: list[Any],
                 per_batch: int, values: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized-model input rows, float-model input rows) of layer ``name`` at the same
    randomly chosen positions: ``per_batch`` rows per calibration batch, at most ``values``
    numbers (rows x groups x K)."""
    q, f = qmodel.get_submodule(name), fmodel.get_submodule(name)
    shape = tuple(q.shape)
    xs_q, xs_f = [], []
    for b in batches:
        pq = _patches(q.kind, q.conv, shape, _layer_input(q, _capture(qmodel, q, b).float()))
        pf = _patches(q.kind, q.conv, shape, _capture(fmodel, f, b).float())
        # a depthwise row holds one sample per channel: fewer rows, same information
        n = min(per_batch, max(64, values // max(1, pq.shape[1] * pq.shape[2])))
        pick = torch.randperm(pq.shape[0], generator=gen)[:n]
        xs_q.append(pq[pick])
        xs_f.append(pf[pick])
    return torch.cat(xs_q), torch.cat(xs_f)


def adaround_sequential(qmodel: nn.Module, fmodel: nn.Module, names: list[str], batches: list[Any], *,
                        steps: int = 500, rows_per_batch: int = 2048, values_per_batch: int = 1 << 21,
                        batch_rows: int = 512, seed: int = 0) -> dict[str, tuple[float, float]]:
    """AdaRound as in the paper: layer by layer in execution order, each layer's rounding learned
    on its input *in the already quantized model* (so it also compensates the error of the
    layers before it), against the float model's output of that layer on float inputs; the
    layer's absorbed activation (ReLU / ReLU6) is applied to both sides (asymmetric
    reconstruction). ``fmodel`` is the float model ``qmodel`` was quantized from (same module
    names; BN already folded). Rows (im2col patches) are sampled at random positions of every
    calibration batch; each step uses ``batch_rows`` of them. Returns ``{name: (relative error
    with nearest rounding, after)}`` on the sampled rows; a layer keeps nearest rounding when
    that is better."""
    from deepshrink.quantization.modules import clamp_act, float_weight

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, tuple[float, float]] = {}
    for name in names:
        q = qmodel.get_submodule(name)
        if q.spec.granularity == "group" or q.spec.binary or q.kind == "embedding":
            continue
        f = fmodel.get_submodule(name)
        xq, xf = _sample_rows(qmodel, fmodel, name, batches, rows_per_batch, values_per_batch, gen)
        w = float_weight(f)
        bias = None if f.bias is None else f.bias.detach().float()
        groups = int(q.conv.get("groups", 1)) if q.kind != "linear" else 1
        act = q.act
        with torch.no_grad():
            target = _rows_out(xf, _grouped(w, groups), bias)
            target = clamp_act(target, act) if act else target
        w_q = w if q.in_mul is None else w / q.in_mul[None, :]  # smoothed space: W * s
        qb = None if q.bias is None else q.bias.detach().float()

        def layer_fn(xr: torch.Tensor, wt: torch.Tensor, groups: int = groups, qb: Any = qb,
                     act: Any = act) -> torch.Tensor:
            y = _rows_out(xr, _grouped(wt, groups), qb)
            return clamp_act(y, act) if act else y

        with torch.enable_grad():
            out[name] = _learn_rounding(q, w_q, xq, target, layer_fn, steps, batch_rows, gen)
    return out


def _learn_rounding(q: Any, w: torch.Tensor, x: torch.Tensor, target: torch.Tensor, fn: Any, steps: int,
                    batch_rows: int, gen: torch.Generator, lr: float = 0.05,
                    reg: float = 1.0) -> tuple[float, float]:
    """The AdaRound optimization of one layer on rows ``x`` (see :func:`adaround_layer`)."""
    from deepshrink.quantization.core import qrange

    shape = (-1,) + (1,) * (w.dim() - 1)
    scale = q.scale.reshape(shape).float()
    if scale.numel() == 1:
        scale = scale.reshape((1,) * w.dim())
    zero = q.zero_rows().reshape(scale.shape).float()
    qmin, qmax = qrange(q.spec.bits, q.spec.symmetric, q.spec.narrow)
    base = torch.floor(w / scale)
    rest = (w / scale - base).clamp(0.01, 0.99)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    norm = target.pow(2).mean().clamp_min(1e-20)

    def dequant(h: torch.Tensor) -> torch.Tensor:
        return torch.clamp(base + h, qmin - zero, qmax - zero) * scale

    def err(wq: torch.Tensor, idx: Any = slice(None)) -> torch.Tensor:
        return (fn(x[idx], wq) - target[idx]).pow(2).mean() / norm

    with torch.no_grad():
        nearest = q.dense_weight().reshape(w.shape).float()
        before = float(err(nearest))
    opt = torch.optim.Adam([v], lr=lr)
    warm = steps // 5
    for i in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch_rows, x.shape[0]),), generator=gen)
        opt.zero_grad()
        h = _h(v)
        loss = err(dequant(h), idx)
        if i >= warm:
            beta = 20 - (20 - 2) * (i - warm) / max(1, steps - warm)
            loss = loss + reg * before * (1 - (2 * h - 1).abs().pow(beta)).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        codes = torch.clamp(base + (v >= 0).float(), qmin - zero, qmax - zero)
        after = float(err(codes * scale))
        if after < before:
            q.set_codes((codes + zero).reshape(q.int_rows().shape), q.scale, q.zero_rows().reshape(-1))
            q.reset_cache()
            return before, after
    return before, before


__all__ = ["adaround_layer", "adaround_sequential", "layer_inputs", "run_order"]
