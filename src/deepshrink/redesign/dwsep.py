"""Depthwise-separable pairs: the maths of replacing a k x k Conv2d (O, I, k, k) by a depthwise
k x k conv (I -> I m, groups = I, ``m`` the depth multiplier) and a pointwise 1 x 1 conv
(I m -> O), optionally with BatchNorm (+ ReLU) between, as MobileNet does.

Cost per output pixel: I m k^2 + I m O instead of I O k^2, i.e. a ratio of m (1/O + 1/k^2).

Initialisation, in two steps:

1. weights: for every input channel i, W[:, i] (O x k^2) is approximated by its best rank-m
   factorisation (its SVD): the depthwise filters are the m right singular vectors, the pointwise
   weights the left ones. With m = min(O, k^2) the pair reproduces the layer exactly.
2. data (no BN/ReLU between): alternating least squares on the layer's own inputs X and outputs
   Y = conv(X) from calibration data. Fixing the depthwise filters D, the pointwise weights P
   (and bias) are an ordinary linear regression from the depthwise outputs to Y. Fixing P, the
   output is linear in D: with patches p (the unfolded input), y_o = sum_{i,a,t} P[o,(i,a)]
   D[(i,a),t] p[i,t], whose normal equations are (P^T P)[(i,a),(j,b)] * C[(i,t),(j,s)] with C the
   patch covariance — small (I m k^2 unknowns). A few rounds fit the layer's outputs, not its
   weights, which is what the network sees.
   With BN/ReLU between the pair is not linear: then a few Adam steps of layer-wise
   distillation (MSE to Y) replace step 2, followed by the exact least-squares pointwise step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BETWEEN = ("none", "bn", "bn_relu")
# Unknowns of the depthwise least-squares step above which it is skipped (memory ~ n^2 doubles).
MAX_DW_UNKNOWNS = 4096


def eligible(conv: nn.Conv2d) -> str:
    """Why ``conv`` cannot be made separable ('' when it can)."""
    if conv.groups != 1:
        return f"already grouped (groups={conv.groups})"
    if conv.kernel_size[0] * conv.kernel_size[1] == 1:
        return "1x1 conv (already pointwise)"
    return ""


def build(conv: nn.Conv2d, multiplier: int, between: str) -> nn.Sequential:
    """The pair's structure (weights uninitialised; same device and dtype as ``conv``)."""
    kw: dict[str, Any] = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    i, mid = conv.in_channels, conv.in_channels * multiplier
    layers: list[nn.Module] = [nn.Conv2d(i, mid, conv.kernel_size, conv.stride, conv.padding,
                                         conv.dilation, groups=i, bias=False,
                                         padding_mode=conv.padding_mode, **kw)]
    if between != "none":
        layers.append(nn.BatchNorm2d(mid, **kw))
    if between == "bn_relu":
        layers.append(nn.ReLU())
    layers.append(nn.Conv2d(mid, conv.out_channels, 1, bias=conv.bias is not None, **kw))
    return nn.Sequential(*layers)


def pair_macs(conv: nn.Conv2d, multiplier: int, positions: int) -> tuple[int, int]:
    """(original, separable) MACs for ``positions`` output pixels (BN between not counted)."""
    o, i, kh, kw = conv.weight.shape
    return o * i * kh * kw * positions, i * multiplier * (kh * kw + o) * positions


def pair_params(conv: nn.Conv2d, multiplier: int, between: str) -> int:
    o, i, kh, kw = conv.weight.shape
    bias = 0 if conv.bias is None else o
    bn = 2 * i * multiplier if between != "none" else 0
    return i * multiplier * (kh * kw + o) + bias + bn


def svd_init(conv: nn.Conv2d, pair: nn.Sequential, multiplier: int) -> None:
    """Step 1: per input channel, the best rank-m split of W[:, i] (O x k^2)."""
    o, i, kh, kw = conv.weight.shape
    m = multiplier
    w = conv.weight.detach().double().permute(1, 0, 2, 3).reshape(i, o, kh * kw)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (i, o, q), (i, q), (i, q, k^2)
    q = s.shape[1]
    dw = torch.zeros(i, m, kh * kw, dtype=torch.float64)
    pw = torch.zeros(o, i, m, dtype=torch.float64)
    r = min(m, q)
    root = s[:, :r].sqrt()
    dw[:, :r] = root[:, :, None] * vh[:, :r]
    pw[:, :, :r] = (u[:, :, :r] * root[:, None, :]).permute(1, 0, 2)
    with torch.no_grad():
        pair[0].weight.copy_(dw.reshape(i * m, 1, kh, kw))
        pair[-1].weight.copy_(pw.reshape(o, i * m, 1, 1))
        if conv.bias is not None:
            pair[-1].bias.copy_(conv.bias)
        for mod in pair:
            if isinstance(mod, nn.BatchNorm2d):  # identity in eval mode (up to eps)
                mod.reset_parameters()
                mod.running_var.fill_(1.0 - mod.eps)


def _ridge_solve(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> torch.Tensor:
    lam = rel * float(a.diagonal().mean().clamp_min(1e-30))
    return torch.linalg.solve(a + lam * torch.eye(a.shape[0], dtype=a.dtype), b)


@torch.no_grad()
def fit_pointwise(pair: nn.Sequential, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
    """LS for the pointwise weights (and bias) given the depthwise filters."""
    pw = pair[-1]
    bias = pw.bias is not None
    n = pw.in_channels + int(bias)
    zz = torch.zeros(n, n, dtype=torch.float64)
    zy = torch.zeros(n, pw.out_channels, dtype=torch.float64)
    for x, y in zip(xs, ys, strict=True):
        z = pair[:-1](x).double().permute(0, 2, 3, 1).reshape(-1, pw.in_channels)
        if bias:
            z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1)
        t = y.double().permute(0, 2, 3, 1).reshape(-1, pw.out_channels)
        zz += z.T @ z
        zy += z.T @ t
    sol = _ridge_solve(zz, zy)
    pw.weight.copy_(sol[: pw.in_channels].T.reshape(pw.weight.shape))
    if bias:
        pw.bias.copy_(sol[-1])


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(pixels, I, k^2) input patches as the depthwise conv sees them."""
    ph, pw_ = conv.padding  # type: ignore[misc]
    if conv.padding_mode != "zeros" and (ph or pw_):
        x = F.pad(x, (pw_, pw_, ph, ph), mode=conv.padding_mode)
        ph = pw_ = 0
    cols = F.unfold(x.double(), conv.kernel_size, conv.dilation, (ph, pw_), conv.stride)
    n, _, L = cols.shape
    k2 = conv.kernel_size[0] * conv.kernel_size[1]
    return cols.reshape(n, conv.in_channels, k2, L).permute(0, 3, 1, 2).reshape(n * L, conv.in_channels, k2)


@torch.no_grad()
def fit_depthwise(conv: nn.Conv2d, pair: nn.Sequential, multiplier: int, xs: list[torch.Tensor],
                  ys: list[torch.Tensor]) -> bool:
    """LS for the depthwise filters given the pointwise weights (see the module docstring).
    Returns False (filters unchanged) when the system would be too large or padding is a string."""
    i, m, k2 = conv.in_channels, multiplier, conv.kernel_size[0] * conv.kernel_size[1]
    if i * m * k2 > MAX_DW_UNKNOWNS or isinstance(conv.padding, str):
        return False
    p = pair[-1].weight.detach().double().reshape(conv.out_channels, i * m)
    g = p.T @ p  # (I m, I m)
    cov = torch.zeros(i * k2, i * k2, dtype=torch.float64)
    rhs = torch.zeros(i, m, k2, dtype=torch.float64)
    for x, y in zip(xs, ys, strict=True):
        pt = _patches(conv, x)  # (pixels, I, k2)
        t = y.double().permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
        if pair[-1].bias is not None:
            t = t - pair[-1].bias.double()
        tp = (t @ p).reshape(-1, i, m)  # (pixels, I, m)
        flat = pt.reshape(pt.shape[0], -1)
        cov += flat.T @ flat
        rhs += torch.einsum("pit,pia->iat", pt, tp)
    # Expand to the (i, a, t) unknowns: A[(i,a,t),(j,b,s)] = G[(i,a),(j,b)] C[(i,t),(j,s)].
    idx_i = torch.arange(i).repeat_interleave(m * k2)
    idx_a = torch.arange(m).repeat_interleave(k2).repeat(i)
    idx_t = torch.arange(k2).repeat(i * m)
    gi, ci = idx_i * m + idx_a, idx_i * k2 + idx_t
    a = g[gi][:, gi] * cov[ci][:, ci]
    d = _ridge_solve(a, rhs.reshape(-1, 1)).reshape(i * m, 1, *conv.kernel_size)
    pair[0].weight.copy_(d)
    return True


def distill_fit(pair: nn.Sequential, xs: list[torch.Tensor], ys: list[torch.Tensor], steps: int,
                lr: float = 5e-3) -> None:
    """A few Adam steps on the layer-wise MSE (for pairs with BN/ReLU between)."""
    if steps <= 0:
        return
    was = pair.training
    pair.train()
    opt = torch.optim.Adam(pair.parameters(), lr=lr)
    scale = [float(y.pow(2).mean().clamp_min(1e-12)) for y in ys]
    for step in range(steps):
        j = step % len(xs)
        loss = F.mse_loss(pair(xs[j]), ys[j]) / scale[j]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    pair.train(was)


def separable(conv: nn.Conv2d, multiplier: int = 1, between: str = "none", *,
              inputs: list[torch.Tensor] | None = None, iters: int = 2, distill_steps: int = 200
              ) -> nn.Sequential:
    """``conv`` as a depthwise-separable pair, fitted to its outputs on ``inputs`` when given."""
    pair = build(conv, multiplier, between)
    svd_init(conv, pair, multiplier)
    if inputs:
        with torch.no_grad():
            ys = [conv(x) for x in inputs]
        pair.eval()
        if between == "none":
            fit_pointwise(pair, inputs, ys)
            for _ in range(iters):
                if not fit_depthwise(conv, pair, multiplier, inputs, ys):
                    break
                fit_pointwise(pair, inputs, ys)
        else:
            distill_fit(pair, inputs, ys, distill_steps)
            pair.eval()  # the pointwise conv is linear in the (BN, ReLU) features: solve it exactly
            fit_pointwise(pair, inputs, ys)
    pair.train(conv.training)
    for prm in pair.parameters():
        prm.requires_grad_(conv.weight.requires_grad)
    return pair
