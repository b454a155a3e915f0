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

  - ``"cp"``: the CP (canonical polyadic) decomposition W ~ sum_r A[:, r] B[:, r] Ky[:, r] Kx[:, r]
    (Lebedev et al. 2015): 1 x 1 (I -> r), depthwise k x 1, depthwise 1 x k, 1 x 1 (r -> O).
    Costs r (I + k_h + k_w + O); fitted by alternating least squares (no closed form). Exact at
    the "full" rank min(I, O) k_h k_w, where it is built directly from the unfolded weight.

  All reproduce the layer exactly at full rank. ``bench/redesign.py`` compares them on a
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

FORMS = ("linear", "conv_svd", "tucker2", "cp")
CP_ITERS = 300  # ALS sweeps (each costs a few small matrix products; stops early on a plateau)


# -- the factors --------------------------------------------------------------------------------
def full_rank(layer: nn.Module, form: str) -> list[int]:
    """The rank(s) at which ``form`` reproduces ``layer`` exactly."""
    w = layer.weight
    if form == "linear":
        return [min(w.shape)]
    o, i, kh, kw = w.shape
    if form == "conv_svd":
        return [min(o, i * kh * kw)]
    if form == "cp":
        return [min(i, o) * kh * kw]  # an exact CP from the unfolding along the larger channel mode
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
    if form == "cp":
        return rank[0] * (i + kh + kw + o)
    r_in, r_out = rank
    return i * r_in + r_in * r_out * kh * kw + r_out * o


def macs(layer: nn.Module, form: str | None, rank: list[int], positions: int,
         in_positions: int | None = None) -> int:
    """Multiply-accumulates per sample: ``positions`` output pixels/tokens; a Tucker-2 input
    1 x 1 runs at the input resolution (``in_positions``)."""
    if form is None:
        return layer.weight.numel() * positions
    if form == "cp":
        o, i, kh, kw = layer.weight.shape
        inp = in_positions or positions
        mid = math.sqrt(inp * positions)  # the k x 1 conv's output: output rows x input columns
        return round(rank[0] * (i * inp + kh * mid + (kw + o) * positions))
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
    if form in ("conv_svd", "cp"):  # cp has no spectrum: its rank is read off the O unfolding's
        return [torch.linalg.svdvals(w.reshape(w.shape[0], -1))]
    return [torch.linalg.svdvals(w.transpose(0, 1).reshape(w.shape[1], -1)),
            torch.linalg.svdvals(w.reshape(w.shape[0], -1))]


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of sum(s^2)."""
    e = (s.double() ** 2).cumsum(0)
    return int(torch.searchsorted(e, energy * e[-1] * (1 - 1e-12)).item()) + 1


def kept_energy(layer: nn.Module, form: str, rank: list[int]) -> float:
    if form == "cp":  # the energy the fitted factors really keep: 1 - |W - W_cp|^2 / |W|^2
        w = layer.weight.detach().double()
        err = (w - dense_weight(layer.weight, form, rank).double()).pow(2).sum()
        return float(1 - err / w.pow(2).sum().clamp_min(1e-30))
    parts = []
    for s, r in zip(spectrum(layer, form), rank, strict=True):
        e = s.double() ** 2
        parts.append(float(e[:r].sum() / e.sum().clamp_min(1e-30)))
    return min(parts)


def cp_als(w: torch.Tensor, rank: int, iters: int = CP_ITERS, tol: float = 1e-7) -> list[torch.Tensor]:
    """Rank-``rank`` CP factors [A, B, Ky, Kx] of a 4-way tensor (O, I, k_h, k_w) by alternating
    least squares: each factor in turn is the least-squares solution with the others fixed
    (normal equations with the Hadamard product of the others' Gram matrices). Initialised from
    each unfolding's leading singular vectors (seeded random columns beyond its rank), so it is
    deterministic. Stops when the relative error improves by less than ``tol``."""
    gen = torch.Generator().manual_seed(0)
    factors = []
    for mode, n in enumerate(w.shape):
        u = torch.linalg.svd(w.movedim(mode, 0).reshape(n, -1), full_matrices=False)[0]
        extra = torch.randn(n, max(0, rank - u.shape[1]), generator=gen, dtype=w.dtype)
        factors.append(torch.cat([u, extra], 1)[:, :rank])
    unfolded = [w.movedim(mode, 0).reshape(w.shape[mode], -1) for mode in range(4)]
    norm, prev = w.norm().clamp_min(1e-30), math.inf
    for it in range(iters):
        for mode in range(4):
            others = [factors[m] for m in range(4) if m != mode]
            gram = torch.ones(rank, rank, dtype=w.dtype)
            for f in others:
                gram = gram * (f.T @ f)
            # Khatri-Rao product of the other factors, rows in the unfolding's column order
            a, b, c = others
            kr = (a[:, None, None, :] * b[None, :, None, :] * c[None, None, :, :]).reshape(-1, rank)
            rhs = unfolded[mode] @ kr  # (n_mode, rank)
            factors[mode] = torch.linalg.lstsq(gram, rhs.T, rcond=None).solution.T
        if it % 10 == 9 or it == iters - 1:
            err = float((unfolded[3] - factors[3] @ kr.T).norm() / norm)
            if prev - err < tol:
                break
            prev = err
    # balance the columns' scales across the four factors (as the SVD split does)
    scale = torch.stack([f.norm(dim=0) for f in factors]).clamp_min(1e-30)
    lam = scale.prod(0)
    return [f / s * lam.pow(0.25) for f, s in zip(factors, scale, strict=True)]


def _cp_exact(w: torch.Tensor) -> list[torch.Tensor]:
    """An exact CP of rank min(I, O) k_h k_w: one term per (channel, y, x) of the smaller
    channel mode, the other channel mode's factor holding the weight's column."""
    o, i, kh, kw = w.shape
    ky = torch.eye(kh, dtype=w.dtype).repeat_interleave(kw, 0).repeat(min(i, o), 1).T  # (kh, R)
    kx = torch.eye(kw, dtype=w.dtype).repeat(kh, 1).repeat(min(i, o), 1).T  # (kw, R)
    if i <= o:
        a = w.reshape(o, -1)  # column (c, y, x) -> W[:, c, y, x]
        b = torch.eye(i, dtype=w.dtype).repeat_interleave(kh * kw, 0).T
    else:
        a = torch.eye(o, dtype=w.dtype).repeat_interleave(kh * kw, 0).T
        b = w.transpose(0, 1).reshape(i, -1)
    return [a, b, ky, kx]


def factor_weights(weight: torch.Tensor, form: str, rank: list[int]) -> list[torch.Tensor]:
    """The weights of the new layers for a layer of weight ``weight``, first applied first."""
    w, dt = weight.detach().double(), weight.dtype
    if form == "cp":
        r = rank[0]
        exact = r >= min(w.shape[0], w.shape[1]) * w.shape[2] * w.shape[3]
        a, b, ky, kx = _cp_exact(w) if exact else cp_als(w, r)
        r = a.shape[1]
        return [b.T[:, :, None, None].to(dt), ky.T.reshape(r, 1, -1, 1).to(dt),
                kx.T.reshape(r, 1, 1, -1).to(dt), a[:, :, None, None].to(dt)]
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
    elif form == "cp":
        w = torch.einsum("ri,ry,rx,or->oiyx", f[0][:, :, 0, 0], f[1][:, 0, :, 0], f[2][:, 0, 0, :],
                         f[3][:, :, 0, 0])
    else:
        w = torch.einsum("rskl,or,si->oikl", f[1], f[2][:, :, 0, 0], f[0][:, :, 0, 0])
    return w.to(weight.dtype)


# -- the new modules ----------------------------------------------------------------------------
def _split_axes(c: nn.Conv2d) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stride, padding and dilation of a conv split into its vertical and horizontal parts.
    Every padding mode pads each axis independently, so padding rows in the k x 1 conv and
    columns in the 1 x k conv reproduces the 2-D padding (corners included)."""
    pad = c.padding
    if isinstance(pad, str):  # "same" / "valid" mean the same thing per axis
        vp, hp = pad, pad
    else:
        vp, hp = (pad[0], 0), (0, pad[1])
    vert = {"stride": (c.stride[0], 1), "padding": vp, "dilation": (c.dilation[0], 1),
            "padding_mode": c.padding_mode}
    horiz = {"stride": (1, c.stride[1]), "padding": hp, "dilation": (1, c.dilation[1]),
             "padding_mode": c.padding_mode}
    return vert, horiz


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
    if form == "cp":
        r = rank[0]
        vert, horiz = _split_axes(c)
        return nn.Sequential(
            nn.Conv2d(c.in_channels, r, 1, bias=False, **kw),
            nn.Conv2d(r, r, (c.kernel_size[0], 1), groups=r, bias=False, **vert, **kw),
            nn.Conv2d(r, r, (1, c.kernel_size[1]), groups=r, bias=False, **horiz, **kw),
            nn.Conv2d(r, c.out_channels, 1, bias=bias, **kw))
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
