"""Weight sharing (Han et al. 2016): per-tensor 1-D k-means over the non-zero weights.

Each shared tensor becomes a codebook of ``k = 2^bits`` centroids plus one integer index per
weight (``-1`` marks a pruned weight, which stays exactly zero). The model keeps ordinary
modules whose weights equal ``codebook[index]``; the codebooks and indices ride along as a plain
attribute (:data:`SHARING_ATTR`), so ``state_dict`` and the architecture are unchanged.

1-D k-means is done on the *sorted* weights: clusters are then contiguous runs, so one Lloyd
iteration is a ``searchsorted`` of the k-1 midpoints plus prefix sums — O(k log n) after one
sort, seconds for hundreds of millions of weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from deepshrink.coding.codebook import SharedTensor, Sharing, get_sharing, set_sharing
from deepshrink.config import Config, check, check_patterns, name_matches, override_for, warn_unmatched
from deepshrink.errors import ModelError

INITS = ("linear", "density", "random")


@dataclasses.dataclass
class KMeansConfig(Config):
    """Which tensors to share and with how many clusters.

    ``bits`` applies to Linear weights (and any other matched weight), ``conv_bits`` to
    convolution weights (Han: 8 for conv, 5 for fc), ``bias_bits`` to biases (0 keeps biases
    float). The layer vocabulary is the one every config uses: ``ignore`` lists module names
    (regular expressions, full match) whose parameters stay unshared; ``overrides`` maps a
    module-name regex (``"2"``, ``"features\\..*"``) to the bits of that module's weight (0 leaves
    it unshared; its bias still follows ``bias_bits``). Tensors with fewer than ``min_size``
    elements stay float.
    """

    bits: int = 5
    conv_bits: int | None = 8
    bias_bits: int = 5
    init: str = "linear"  # linear | density | random
    overrides: dict[str, int] = dataclasses.field(default_factory=dict)  # module regex -> weight bits
    ignore: tuple[str, ...] = ()  # module regexes (full match) left unshared
    max_iter: int = 1000  # an iteration costs O(k log n): convergence is cheap
    tol: float = 1e-7  # stop when no centroid moves more than tol * (max - min)
    min_size: int = 16
    seed: int = 0  # random init only

    def validate(self) -> None:
        n = type(self).__name__
        check(1 <= self.bits <= 16, n, "bits", f"must be in [1, 16], got {self.bits}")
        check(self.conv_bits is None or 1 <= self.conv_bits <= 16, n, "conv_bits",
              f"must be None or in [1, 16], got {self.conv_bits}")
        check(0 <= self.bias_bits <= 16, n, "bias_bits", f"must be in [0, 16], got {self.bias_bits}")
        check(self.init in INITS, n, "init", f"must be one of {INITS}, got {self.init!r}")
        check(self.max_iter >= 1, n, "max_iter", f"must be >= 1, got {self.max_iter}")
        check(self.min_size >= 1, n, "min_size", f"must be >= 1, got {self.min_size}")
        for key, b in self.overrides.items():
            check(isinstance(b, int) and 0 <= b <= 16, n, f"overrides[{key!r}]",
                  f"must be an int in [0, 16], got {b!r}")
        check_patterns(n, "overrides", self.overrides)
        check_patterns(n, "ignore", self.ignore)

    def bits_for(self, module_name: str, param: str, module: nn.Module) -> int:
        """Bits for parameter ``param`` (``weight``, ``bias``) of module ``module_name`` (0 = not shared)."""
        if name_matches(module_name, self.ignore):
            return 0
        if param == "bias":
            return self.bias_bits
        if isinstance(module, nn.modules.conv._ConvNd) and self.conv_bits is not None:
            default = self.conv_bits
        else:
            default = self.bits
        return override_for(module_name, self.overrides, default)


# --------------------------------------------------------------------------- 1-D k-means


def init_centroids(x_sorted: np.ndarray, k: int, init: str, seed: int = 0) -> np.ndarray:
    """Initial centroids: ``linear`` spaces them evenly over [min, max]; ``density`` at evenly
    spaced quantiles of the weights' CDF; ``random`` picks ``k`` distinct weights (Forgy)."""
    lo, hi = float(x_sorted[0]), float(x_sorted[-1])
    if init == "linear":
        return np.linspace(lo, hi, k)
    if init == "density":
        q = (np.arange(k) + 0.5) / k
        return np.quantile(x_sorted, q)
    if init == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(x_sorted, size=k, replace=False))
    raise ValueError(f"unknown init {init!r}")


def kmeans_1d(x: np.ndarray, k: int, *, init: str = "linear", max_iter: int = 1000,
              tol: float = 1e-7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars. Returns (sorted centroids (float64), index of each value).

    Fewer distinct values than ``k`` gives one centroid per distinct value. A cluster that
    empties keeps its last centroid (it simply attracts no weights).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if len(x) == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    xs = np.sort(x)
    distinct = np.unique(xs)
    if len(distinct) <= k:
        return distinct, np.searchsorted(distinct, x)
    c = np.sort(init_centroids(xs, k, init, seed))
    prefix = np.r_[0.0, np.cumsum(xs)]
    scale = max(float(xs[-1] - xs[0]), 1e-30)
    for _ in range(max_iter):
        bounds = np.r_[0, np.searchsorted(xs, (c[1:] + c[:-1]) / 2), len(xs)]
        sizes = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        new = np.where(sizes > 0, sums / np.maximum(sizes, 1), c)
        moved = float(np.max(np.abs(new - c)))
        c = np.sort(new)
        if moved <= tol * scale:
            break
    return c, assign(x, c)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centroids`` for every value of ``x``."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(mids, x).astype(np.int64)


# --------------------------------------------------------------------------- model-level state


@torch.no_grad()
def write_shared_weights(model: nn.Module) -> None:
    """Set every shared parameter to ``codebook[index]`` (zeros stay zeros)."""
    params = dict(model.named_parameters())
    for name, st in get_sharing(model).items():
        params[name].copy_(st.weight().to(params[name].dtype))


@torch.no_grad()
def round_codebooks(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round every codebook to ``dtype`` (kept as float32) and rewrite the weights, so the model
    equals what a file with ``dtype`` codebooks stores. Returns the model."""
    for st in get_sharing(model).values():
        st.codebook = st.codebook.to(dtype).float()
    write_shared_weights(model)
    return model


@torch.no_grad()
def share(model: nn.Module, config: KMeansConfig | None = None) -> nn.Module:
    """Replace weights by shared centroids, in place; returns the model.

    Clusters are fitted to the non-zero weights only, so pruned weights (zeros) stay zero and get
    index ``-1``. Sharing an already shared model re-clusters it from its current weights.
    """
    cfg = config or KMeansConfig()
    modules = dict(model.named_modules())
    sharing: Sharing = {}
    warn_unmatched(type(cfg).__name__, modules, [*cfg.ignore, *cfg.overrides])
    for name, p in model.named_parameters():
        mod_name, _, param = name.rpartition(".")
        bits = cfg.bits_for(mod_name, param, modules.get(mod_name, model))
        if bits == 0 or p.numel() < cfg.min_size or not p.is_floating_point():
            continue
        w = p.detach().cpu().double().numpy().ravel()
        nz = w != 0
        index = np.full(w.shape, -1, np.int64)
        if nz.any():
            c, idx = kmeans_1d(w[nz], 1 << bits, init=cfg.init, max_iter=cfg.max_iter,
                               tol=cfg.tol, seed=cfg.seed)
            index[nz] = idx
        else:
            c = np.zeros(1)
        sharing[name] = SharedTensor(torch.tensor(c, dtype=torch.float32),
                                     torch.from_numpy(index.reshape(p.shape)))
    if not sharing:
        raise ModelError("share(): no parameter qualified for weight sharing",
                         hint="check KMeansConfig.bits/overrides/ignore and min_size")
    set_sharing(model, sharing)
    write_shared_weights(model)
    return model


def sharing_summary(model: nn.Module) -> list[dict[str, object]]:
    """One row per shared tensor: name, shape, clusters, non-zeros."""
    return [{"tensor": n, "shape": list(st.index.shape), "clusters": len(st.codebook),
             "bits": st.bits, "nonzero": int((st.index >= 0).sum())}
            for n, st in get_sharing(model).items()]
