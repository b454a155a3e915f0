"""Low-rank factorization: a weight matrix of rank r costs r(M + N) instead of MN.

* ``nn.Linear`` (M outputs, N inputs) -> ``Sequential(Linear(N, r, bias=False), Linear(r, M))``
  from the truncated SVD W ~ U_r S_r V_r^T, split as (S_r^1/2 V_r^T, U_r S_r^1/2) so both factors
  have the same scale (better for fine-tuning and for quantizing them later). This is the seed's
  "narrow layer between two wide ones".
* ``nn.Conv2d`` (O, I, k, k), two forms (``LowRankConfig.conv``):

  - ``"svd"``: a k x k conv with r filters followed by a 1 x 1 conv (r -> O): the SVD of W
    reshaped to O x (I k k). Costs r (I k^2 + O).
  - ``"tucker2"``: 1 x 1 (I -> r_in), k x k core (r_in -> r_out), 1 x 1 (r_out -> O), the HOSVD of
    W along its two channel modes. Costs I r_in + r_in r_out k^2 + r_out O.

  Both reproduce the layer exactly at full rank. ``bench/redesign.py`` compares them on a
  trained CNN at equal parameter counts (output error and latency); see its ``conv_forms`` part.

Every new module is a standard ``nn.Linear`` / ``nn.Conv2d`` inside an ``nn.Sequential``, so
pruning, quantization, ONNX export and MAC counting see ordinary layers. The edit is recorded in
the model's spec (kind ``lowrank``: layer name -> form and ranks) and replayed by
:func:`deepshrink.load`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

FORMS = ("linear", "conv_svd", "tucker2")


# -- the factors --------------------------------------------------------------------------------
def full_rank(layer: nn.Module, form: str) -> list[int]:
    """The rank(s) at which ``form`` reproduces ``layer`` exactly."""
    w = layer.weight
    if form == "linear":
        return [min(w.shape)]
    o, i, kh, kw = w.shape
    if form == "conv_svd":
        return [min(o, i * kh * kw)]
    return [i, o]  # tucker2: (r_in, r_out)


def clamp_rank(layer: nn.Module, form: str, rank: list[int]) -> list[int]:
    return [max(1, min(r, f)) for r, f in zip(rank, full_rank(layer, form), strict=True)]


def weight_params(layer: nn.Module, form: str, rank: list[int]) -> int:
    """Weights of the factorized form (the bias, kept once, is not counted)."""
    w = layer.weight
    if form == "linear":
        return rank[0] * (w.shape[0] + w.shape[1])
    o, i, kh, kw = w.shape
    if form == "conv_svd":
        return rank[0] * (i * kh * kw + o)
    r_in, r_out = rank
    return i * r_in + r_in * r_out * kh * kw + r_out * o


def macs(layer: nn.Module, form: str | None, rank: list[int], positions: int,
         in_positions: int | None = None) -> int:
    """Multiply-accumulates per sample: ``positions`` output pixels/tokens; a Tucker-2 input
    1 x 1 runs at the input resolution (``in_positions``)."""
    if form is None:
        return layer.weight.numel() * positions
    if form != "tucker2":
        return weight_params(layer, form, rank) * positions
    o, i, kh, kw = layer.weight.shape
    r_in, r_out = rank
    return i * r_in * (in_positions or positions) + (r_in * r_out * kh * kw + r_out * o) * positions


def spectrum(layer: nn.Module, form: str) -> list[torch.Tensor]:
    """Singular values of the matrix (or of each unfolding, for Tucker-2) the form truncates."""
    w = layer.weight.detach().float()
    if form == "linear":
        return [torch.linalg.svdvals(w)]
    if form == "conv_svd":
        return [torch.linalg.svdvals(w.reshape(w.shape[0], -1))]
    return [torch.linalg.svdvals(w.transpose(0, 1).reshape(w.shape[1], -1)),
            torch.linalg.svdvals(w.reshape(w.shape[0], -1))]


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of sum(s^2)."""
    e = (s.double() ** 2).cumsum(0)
    return int(torch.searchsorted(e, energy * e[-1] * (1 - 1e-12)).item()) + 1


def kept_energy(layer: nn.Module, form: str, rank: list[int]) -> float:
    parts = []
    for s, r in zip(spectrum(layer, form), rank, strict=True):
        e = s.double() ** 2
        parts.append(float(e[:r].sum() / e.sum().clamp_min(1e-30)))
    return min(parts)


def factor_weights(weight: torch.Tensor, form: str, rank: list[int]) -> list[torch.Tensor]:
    """The weights of the new layers for a layer of weight ``weight``, first applied first."""
    w, dt = weight.detach().double(), weight.dtype
    if form in ("linear", "conv_svd"):
        u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        r = rank[0]
        root = s[:r].sqrt()
        first = (root[:, None] * vh[:r]).reshape(r, *w.shape[1:])
        second = u[:, :r] * root[None, :]
        if form == "conv_svd":
            second = second[:, :, None, None]
        return [first.to(dt), second.to(dt)]
    r_in, r_out = rank
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(w.shape[1], -1), full_matrices=False)[0][:, :r_in]
    u_out = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)[0][:, :r_out]
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
    return [u_in.T[:, :, None, None].to(dt), core.to(dt), u_out[:, :, None, None].to(dt)]


def dense_weight(weight: torch.Tensor, form: str, rank: list[int]) -> torch.Tensor:
    """``weight`` as the factorized form at ``rank`` computes it (for sensitivity scans, which
    swap it in without changing the model's structure)."""
    f = [t.double() for t in factor_weights(weight, form, rank)]
    if form == "linear":
        w = f[1] @ f[0]
    elif form == "conv_svd":
        w = (f[1][:, :, 0, 0] @ f[0].reshape(f[0].shape[0], -1)).reshape(weight.shape)
    else:
        w = torch.einsum("rskl,or,si->oikl", f[1], f[2][:, :, 0, 0], f[0][:, :, 0, 0])
    return w.to(weight.dtype)


# -- the new modules ----------------------------------------------------------------------------
def build(layer: nn.Module, form: str, rank: list[int]) -> nn.Sequential:
    """The factorized structure for ``layer`` (weights uninitialised; same device and dtype)."""
    kw: dict[str, Any] = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    bias = layer.bias is not None
    if form == "linear":
        n_out, n_in = layer.weight.shape
        return nn.Sequential(nn.Linear(n_in, rank[0], bias=False, **kw),
                             nn.Linear(rank[0], n_out, bias=bias, **kw))
    c = layer
    conv = {"stride": c.stride, "padding": c.padding, "dilation": c.dilation,
            "padding_mode": c.padding_mode}
    if form == "conv_svd":
        return nn.Sequential(
            nn.Conv2d(c.in_channels, rank[0], c.kernel_size, bias=False, **conv, **kw),
            nn.Conv2d(rank[0], c.out_channels, 1, bias=bias, **kw))
    r_in, r_out = rank
    return nn.Sequential(
        nn.Conv2d(c.in_channels, r_in, 1, bias=False, **kw),
        nn.Conv2d(r_in, r_out, c.kernel_size, bias=False, **conv, **kw),
        nn.Conv2d(r_out, c.out_channels, 1, bias=bias, **kw))


def factorized(layer: nn.Module, form: str, rank: list[int]) -> nn.Sequential:
    """``layer`` rewritten in ``form`` at ``rank``, initialised from the truncated decomposition."""
    seq = build(layer, form, rank)
    with torch.no_grad():
        for m, w in zip(seq, factor_weights(layer.weight, form, rank), strict=True):
            m.weight.copy_(w)
        if layer.bias is not None:
            seq[-1].bias.copy_(layer.bias)
    seq.train(layer.training)
    for p in seq.parameters():
        p.requires_grad_(layer.weight.requires_grad)
    return seq


def break_even(layer: nn.Module, form: str) -> float:
    """The largest rank (real-valued, for one-number forms) at which the factors still have
    fewer weights than the layer: MN / (M + N)."""
    return layer.weight.numel() / max(1, weight_params(layer, form, [1] * len(full_rank(layer, form))))


def grid(full: list[int], steps: int = 24) -> list[list[int]]:
    """Candidate ranks for a budget search: geometric fractions of the full rank, descending."""
    fracs = [math.pow(2.0, -i / 3) for i in range(steps)]  # 1, 0.79, 0.63, ... 2^-7.7
    out: list[list[int]] = []
    for f in fracs:
        r = [max(1, math.ceil(n * f)) for n in full]
        if not out or r != out[-1]:
            out.append(r)
    return out
