"""Range estimation (clipping): what [lo, hi] a quantizer should cover.

* weights: :func:`weight_range` per row of a weight (see :func:`core.to_rows`) by min-max,
  percentile or MSE-optimal clipping;
* activations: observers fed batch by batch during calibration — :class:`MinMaxObserver`,
  :class:`MovingAverageObserver` (exponential moving average of batch min/max, as in QAT),
  :class:`PercentileObserver` and :class:`MSEObserver` (both keep a bounded random sample).
"""

from __future__ import annotations

import abc

import torch

from deepshrink.errors import ConfigError
from deepshrink.quantization.core import QuantSpec, fake_quantize_rows

RANGE_METHODS = ("minmax", "percentile", "mse")
ACT_RANGE_METHODS = ("minmax", "moving_average", "percentile", "mse")

# MSE search grid: clip the min-max range by these factors. Low bit widths want heavy clipping
# (a ternary grid keeps roughly |x| > 0.5 mean|x|), so the grid reaches down to 5 %.
_MSE_GRID = torch.cat([torch.linspace(0.05, 0.5, 10), torch.linspace(0.52, 1.0, 25)])


def mse_clip(rows: torch.Tensor, spec: QuantSpec, grid: torch.Tensor = _MSE_GRID
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row [lo, hi] that minimises ||x - fake_quant(x)||² over shrink factors of min-max."""
    lo0, hi0 = rows.min(1).values, rows.max(1).values
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for a in grid.tolist():
        lo, hi = lo0 * a, hi0 * a
        err = (fake_quantize_rows(rows, lo, hi, spec) - rows).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def percentile_range(rows: torch.Tensor, pct: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row [lo, hi] at the (100 - pct) and pct percentiles."""
    q = torch.tensor([1 - pct / 100, pct / 100], dtype=rows.dtype)
    qs = torch.quantile(rows, q, dim=1)
    return qs[0], qs[1]


def weight_range(rows: torch.Tensor, spec: QuantSpec, method: str = "mse", pct: float = 99.9
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range of a weight in row view."""
    rows = rows.detach().float()
    if method == "minmax":
        return rows.min(1).values, rows.max(1).values
    if method == "percentile":
        return percentile_range(rows, pct)
    if method == "mse":
        return mse_clip(rows, spec)
    raise ConfigError(f"weight range method must be one of {RANGE_METHODS}, got {method!r}")


class Observer(abc.ABC):
    """Collects statistics of a tensor over calibration batches; :meth:`range` gives [lo, hi]."""

    @abc.abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Fold one calibration batch into the statistics."""

    @abc.abstractmethod
    def range(self) -> tuple[float, float]:
        """The [lo, hi] range to quantize with."""


class MinMaxObserver(Observer):
    def __init__(self) -> None:
        self.lo, self.hi = float("inf"), float("-inf")

    def update(self, x: torch.Tensor) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise ConfigError("observer saw no data: calibration produced no batches")
        return self.lo, self.hi


class MovingAverageObserver(MinMaxObserver):
    """EMA of per-batch min/max: robust to one outlier batch, and tracks drifting activations
    during QAT."""

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.seen = False

    def update(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        if not self.seen:
            self.lo, self.hi, self.seen = lo, hi, True
        else:
            m = self.momentum
            self.lo, self.hi = (1 - m) * self.lo + m * lo, (1 - m) * self.hi + m * hi


class _SampleObserver(MinMaxObserver):
    """Keeps a bounded uniform random sample of the values seen (for percentile / MSE)."""

    def __init__(self, max_samples: int = 1 << 18, seed: int = 0) -> None:
        super().__init__()
        self.max_samples = max_samples
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        flat = x.detach().float().reshape(-1)
        keep = max(1, self.max_samples // 16)  # up to ~16 batches contribute equally
        if flat.numel() > keep:
            flat = flat[torch.randint(flat.numel(), (keep,), generator=self.gen)]
        self.samples.append(flat)
        total = sum(s.numel() for s in self.samples)
        if total > self.max_samples:
            allv = torch.cat(self.samples)
            self.samples = [allv[torch.randperm(allv.numel(), generator=self.gen)[: self.max_samples]]]

    def values(self) -> torch.Tensor:
        if not self.samples:
            raise ConfigError("observer saw no data: calibration produced no batches")
        return torch.cat(self.samples)


class PercentileObserver(_SampleObserver):
    def __init__(self, pct: float = 99.99, **kw: int) -> None:
        super().__init__(**kw)
        self.pct = pct

    def range(self) -> tuple[float, float]:
        lo, hi = percentile_range(self.values()[None], self.pct)
        return float(lo[0]), float(hi[0])


class MSEObserver(_SampleObserver):
    """MSE-optimal clipping of the sampled values for the given activation grid."""

    def __init__(self, spec: QuantSpec, **kw: int) -> None:
        super().__init__(**kw)
        self.spec = spec

    def range(self) -> tuple[float, float]:
        v = self.values()[None]
        # Include the true extremes so the search starts from the full min-max range.
        v = torch.cat([v, torch.tensor([[self.lo, self.hi]])], dim=1)
        lo, hi = mse_clip(v, self.spec)
        return float(lo[0]), float(hi[0])


def make_observer(method: str, spec: QuantSpec, pct: float = 99.99, momentum: float = 0.1) -> Observer:
    if method == "minmax":
        return MinMaxObserver()
    if method == "moving_average":
        return MovingAverageObserver(momentum)
    if method == "percentile":
        return PercentileObserver(pct)
    if method == "mse":
        return MSEObserver(spec)
    raise ConfigError(f"activation range method must be one of {ACT_RANGE_METHODS}, got {method!r}")
