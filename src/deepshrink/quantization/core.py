"""Uniform quantizer maths: integer grids, scales and zero points, quantize / dequantize.

A tensor is quantized in *rows*: every row shares one (scale, zero point). Per-tensor means one
row, per-channel one row per output channel, per-group one row per ``group_size`` consecutive
inputs of an output channel. :func:`to_rows` / :func:`from_rows` do that reshaping, so every
function below works on a 2-D ``(rows, n)`` view.

Grids (``q`` is the stored integer, ``x ≈ (q - zero_point) * scale``):

* symmetric, b bits: ``q ∈ [-(2^(b-1) - 1), 2^(b-1) - 1]`` (narrow range, zero point 0), or
  ``[-2^(b-1), 2^(b-1) - 1]`` with ``narrow=False``; ``scale = max|x| / (2^(b-1) - 1)``.
  At 2 bits the narrow grid is {-1, 0, 1}: **ternary**.
* affine, b bits: ``q ∈ [0, 2^b - 1]``, ``scale = (hi - lo) / (2^b - 1)`` with the range widened
  to contain 0 so that 0 is exact, ``zero_point = round(-lo / scale)``.
* 1 bit: **binary**, ``q ∈ {-1, +1}`` (sign), ``x ≈ q * scale`` with ``scale = mean|x|`` per row
  (the L2-optimal scale for a sign code).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from deepshrink.config import Config, check

GRANULARITIES = ("tensor", "channel", "group")
_EPS = 1e-12


@dataclasses.dataclass
class QuantSpec(Config):
    """How one tensor is quantized. ``axis`` is the channel axis for per-channel / per-group."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 64
    narrow: bool = True
    axis: int = 0

    def validate(self) -> None:
        validate_bits(type(self).__name__, "bits", self.bits)
        n = type(self).__name__
        check(self.granularity in GRANULARITIES, n, "granularity",
              f"must be one of {GRANULARITIES}, got {self.granularity!r}")
        check(self.group_size >= 1, n, "group_size", f"must be >= 1, got {self.group_size}")

    @property
    def binary(self) -> bool:
        return self.bits == 1


def validate_bits(cls_name: str, field: str, bits: object) -> None:
    check(isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 8, cls_name, field,
          f"must be an integer from 1 to 8, got {bits!r}")


def qrange(bits: int, symmetric: bool, narrow: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid."""
    if bits == 1:
        return -1, 1
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if narrow else -qmax - 1), qmax
    return 0, 2**bits - 1


def to_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A 2-D view where each row shares one scale. Groups are padded with zeros at the end
    of a channel when ``group_size`` does not divide it (zeros never widen a range: 0 is
    always inside it)."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    xc = x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
    if spec.granularity == "channel":
        return xc
    g = spec.group_size
    pad = (-xc.shape[1]) % g
    if pad:
        xc = torch.nn.functional.pad(xc, (0, pad))
    return xc.reshape(-1, g)


def from_rows(rows: torch.Tensor, shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> torch.Tensor:
    """Inverse of :func:`to_rows`."""
    if spec.granularity == "tensor":
        return rows.reshape(shape)
    moved = (shape[spec.axis], *[s for i, s in enumerate(shape) if i != spec.axis])
    per_channel = math.prod(moved[1:])
    rows = rows.reshape(moved[0], -1)[:, :per_channel]
    return rows.reshape(moved).movedim(0, spec.axis)


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row from a clipping range [lo, hi] (binary: see :func:`binary_scale`)."""
    qmin, qmax = qrange(spec.bits, spec.symmetric, spec.narrow)
    lo = torch.minimum(lo, torch.zeros_like(lo)).float()
    hi = torch.maximum(hi, torch.zeros_like(hi)).float()
    if spec.binary:
        # Only a range is known here (an activation, say): use the midpoint magnitude.
        return (torch.maximum(-lo, hi) / 2).clamp_min(_EPS), torch.zeros_like(lo)
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        return scale.clamp_min(_EPS), torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def binary_scale(rows: torch.Tensor) -> torch.Tensor:
    """mean|x| per row: minimises ||x - scale * sign(x)||²."""
    return rows.abs().mean(1).clamp_min(_EPS)


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool,
             narrow: bool = True) -> torch.Tensor:
    """Integer codes (as a float tensor) of ``x``: round to nearest, then clamp to the grid.
    ``scale`` / ``zero`` broadcast against ``x`` (shape (rows, 1) for a row view)."""
    qmin, qmax = qrange(bits, symmetric, narrow)
    if bits == 1:
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return torch.clamp(torch.round(x / scale + zero), qmin, qmax)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  symmetric: bool, narrow: bool = True) -> torch.Tensor:
    """quantize then dequantize (no gradient trick; see :mod:`modules` for the STE)."""
    return dequantize_affine(quantize_affine(x, scale, zero, bits, symmetric, narrow), scale, zero)


def fake_quantize_rows(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
                       ) -> torch.Tensor:
    """Fake-quantize a row view with per-row clipping ranges."""
    scale, zero = qparams(lo, hi, spec)
    return fake_quantize(rows, scale[:, None], zero[:, None], spec.bits, spec.symmetric, spec.narrow)


@dataclasses.dataclass
class QTensor:
    """A quantized tensor: integer codes ``q`` (int16, any grid up to 8 bits) with per-row
    ``scale`` / ``zero`` and the spec and shape needed to dequantize it."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        rows = dequantize_affine(self.q.float(), self.scale[:, None], self.zero[:, None])
        return from_rows(rows, self.shape, self.spec)


def quantize_tensor(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None = None,
                    hi: torch.Tensor | None = None) -> QTensor:
    """Quantize ``x`` with per-row ranges ``lo``/``hi`` (default: min/max of each row)."""
    rows = to_rows(x.detach().float(), spec)
    if spec.binary:
        scale = binary_scale(rows)
        zero = torch.zeros_like(scale)
    else:
        lo = rows.min(1).values if lo is None else lo
        hi = rows.max(1).values if hi is None else hi
        scale, zero = qparams(lo, hi, spec)
    q = quantize_affine(rows, scale[:, None], zero[:, None], spec.bits, spec.symmetric, spec.narrow)
    return QTensor(q.to(torch.int16), scale, zero, spec, tuple(x.shape))
