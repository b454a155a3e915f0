"""Unstructured (weight) pruning: remove individual weights of small magnitude.

Three parts kept apart: *which layers* (:func:`select_layers`), *scoring* (:func:`magnitude_scores`,
one score per weight), and *mask choice* (:func:`masks_for_ratio` / :func:`masks_for_threshold`).
:func:`prune_unstructured` chains them and hands the masks to :mod:`deepshrink.pruning.masks`.

Methods:

* ``magnitude`` — remove exactly ``round(ratio * n)`` weights of smallest ``|w|``, either per layer
  (``scope="layer"``) or over the pooled weights of all selected layers (``scope="global"``).
  Ratios count already-zero weights, so repeating with a larger ratio prunes further.
* ``threshold`` — remove every weight with ``|w| < threshold``.
* ``quality`` — Han et al. 2015: per layer, ``T = quality * std(w)``, remove ``|w| < T``.

``overrides`` maps a module name or regular expression (full match) to that layer's own amount
(its ratio, threshold or quality, by method; ``0`` leaves the layer alone). With global scope the
overridden layers leave the global pool and are pruned at their own ratio.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from deepshrink.config import Config, check, check_patterns, name_matches, override_for, warn_unmatched
from deepshrink.errors import ConfigError, ModelError
from deepshrink.pruning.masks import Masks, apply_masks, get_masks

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d,
}
METHODS = ("magnitude", "threshold", "quality")


@dataclasses.dataclass
class UnstructuredConfig(Config):
    """What to prune and how much. See the module docstring for the methods."""

    ratio: float = 0.5  # fraction of weights to remove (method "magnitude")
    method: str = "magnitude"  # magnitude | threshold | quality
    scope: str = "layer"  # layer | global (method "magnitude")
    threshold: float | None = None  # method "threshold": remove |w| < threshold
    quality: float | None = None  # method "quality": remove |w| < quality * std(w) per layer
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)  # name/regex -> amount
    layer_types: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    ignore: tuple[str, ...] = ()  # module names/regexes never pruned
    skip_last: bool = False  # leave the last selected layer (usually the classifier) dense
    # Global scope: no layer loses more than this fraction. Layers differ in weight scale, and an
    # uncapped global threshold can empty a whole layer (the model then predicts a constant).
    max_layer_ratio: float = 0.99

    def validate(self) -> None:
        n = type(self).__name__
        check(self.method in METHODS, n, "method", f"must be one of {METHODS}, got {self.method!r}")
        check(self.scope in ("layer", "global"), n, "scope",
              f"must be 'layer' or 'global', got {self.scope!r}")
        check(isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio < 1.0, n, "ratio",
              f"must be in [0, 1) (the fraction of weights removed), got {self.ratio!r}")
        if self.method == "threshold":
            check(self.threshold is not None and self.threshold >= 0, n, "threshold",
                  f"method 'threshold' needs threshold >= 0, got {self.threshold!r}")
        if self.method == "quality":
            check(self.quality is not None and self.quality >= 0, n, "quality",
                  f"method 'quality' needs quality >= 0, got {self.quality!r}")
        check(0.0 < self.max_layer_ratio <= 1.0, n, "max_layer_ratio",
              f"must be in (0, 1], got {self.max_layer_ratio!r}")
        check(self.scope != "global" or self.ratio <= self.max_layer_ratio, n, "ratio",
              f"{self.ratio} exceeds max_layer_ratio={self.max_layer_ratio}: global pruning cannot reach it")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        check(not bad, n, "layer_types", f"unknown layer type(s) {bad}; known: {sorted(LAYER_TYPES)}")
        check_patterns(n, "overrides", self.overrides)
        check_patterns(n, "ignore", self.ignore)
        for key, amount in self.overrides.items():
            if self.method == "magnitude":
                check(0.0 <= amount < 1.0, n, f"overrides[{key!r}]", f"must be in [0, 1), got {amount!r}")
            else:
                check(amount >= 0, n, f"overrides[{key!r}]", f"must be >= 0, got {amount!r}")

    def amount_for(self, name: str) -> float | None:
        """The override for module ``name`` (exact name first, then the first matching regex)."""
        if name in self.overrides:
            return self.overrides[name]
        return override_for(name, self.overrides, None)

    def default_amount(self) -> float:
        return {"magnitude": self.ratio, "threshold": self.threshold or 0.0,
                "quality": self.quality or 0.0}[self.method]

    def scaled(self, frac: float, spacing: str = "geometric") -> UnstructuredConfig:
        """The same config at a fraction of the way to its target (for iterative schedules).

        ``geometric``: the kept fraction of each ratio moves geometrically (every step removes the
        same share of what is left). ``cubic``: ratio * (1 - (1 - frac)^3), Zhu & Gupta's curve (big
        steps first, small ones near the target). Thresholds and qualities move linearly."""
        if spacing not in ("geometric", "cubic"):
            raise ConfigError(f"spacing must be 'geometric' or 'cubic', got {spacing!r}")

        def r(x: float) -> float:
            if spacing == "cubic":
                return x * (1.0 - (1.0 - frac) ** 3)
            return 1.0 - (1.0 - x) ** frac

        if self.method == "magnitude":
            return dataclasses.replace(self, ratio=r(self.ratio),
                                       overrides={k: r(v) for k, v in self.overrides.items()})
        f = frac
        return dataclasses.replace(
            self, threshold=None if self.threshold is None else self.threshold * f,
            quality=None if self.quality is None else self.quality * f,
            overrides={k: v * f for k, v in self.overrides.items()})


def select_layers(model: nn.Module, cfg: UnstructuredConfig) -> dict[str, nn.Module]:
    """Module name -> layer for every layer the config prunes, in model order."""
    types = tuple(LAYER_TYPES[t] for t in cfg.layer_types)
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, types) and isinstance(getattr(m, "weight", None), torch.Tensor)}
    if cfg.skip_last and layers:
        layers.pop(list(layers)[-1])
    return {n: m for n, m in layers.items() if not name_matches(n, cfg.ignore)}


def weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def magnitude_scores(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Parameter name -> ``|w|`` for each layer's weight (the score: small = unimportant)."""
    return {weight_name(n): m.weight.detach().abs() for n, m in layers.items()}


def _smallest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask removing exactly the ``k`` lowest scores (ties broken by position: stable)."""
    flat = scores.flatten()
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(flat, stable=True)
        keep[order[:k]] = False
    return keep.view_as(scores)


def masks_for_ratio(scores: dict[str, torch.Tensor], ratio: float, *, scope: str = "layer",
                    layer_ratios: dict[str, float] | None = None, max_layer_ratio: float = 1.0) -> Masks:
    """Masks removing ``round(ratio * n)`` lowest-scored weights per tensor (``scope="layer"``) or
    over all tensors pooled (``"global"``). ``layer_ratios`` gives tensors their own ratio (they are
    left out of the global pool). In global scope a tensor that would lose more than
    ``max_layer_ratio`` is capped there and the rest of the pool makes up the difference."""
    layer_ratios = layer_ratios or {}
    masks: Masks = {}
    for name, r in layer_ratios.items():
        s = scores[name]
        masks[name] = _smallest_k_mask(s, round(r * s.numel()))
    rest = {n: s for n, s in scores.items() if n not in layer_ratios}
    if scope == "layer":
        for name, s in rest.items():
            masks[name] = _smallest_k_mask(s, round(ratio * s.numel()))
    elif rest:
        k = round(ratio * sum(s.numel() for s in rest.values()))
        capped: dict[str, int] = {}
        while True:  # water-filling: at most one pass per tensor
            pool = {n: s for n, s in rest.items() if n not in capped}
            flat = torch.cat([s.flatten() for s in pool.values()])
            keep = _smallest_k_mask(flat, max(0, k - sum(capped.values())))
            i, over = 0, []
            for name, s in pool.items():
                masks[name] = keep[i:i + s.numel()].view_as(s)
                i += s.numel()
                if int((~masks[name]).sum()) > max_layer_ratio * s.numel():
                    over.append(name)
            if not over or len(over) == len(pool):
                break
            for name in over:
                capped[name] = math.floor(max_layer_ratio * rest[name].numel())
        for name, kn in capped.items():
            masks[name] = _smallest_k_mask(rest[name], kn)
    return masks


def masks_for_threshold(scores: dict[str, torch.Tensor], thresholds: dict[str, float]) -> Masks:
    """Masks removing every weight whose score is strictly below its tensor's threshold."""
    return {name: scores[name] >= thresholds[name] for name in scores}


def compute_masks(model: nn.Module, cfg: UnstructuredConfig) -> Masks:
    """The masks ``cfg`` asks for on ``model`` (weights untouched)."""
    layers = select_layers(model, cfg)
    warn_unmatched(type(cfg).__name__, (n for n, _ in model.named_modules()), [*cfg.ignore, *cfg.overrides])
    if not layers:
        raise ModelError(f"no layers of types {list(cfg.layer_types)} to prune in "
                         f"{type(model).__name__}", hint="check layer_types / ignore / skip_last")
    scores = magnitude_scores(layers)
    amounts = {weight_name(n): a for n in layers if (a := cfg.amount_for(n)) is not None}
    if cfg.method == "magnitude":
        return masks_for_ratio(scores, cfg.ratio, scope=cfg.scope, layer_ratios=amounts,
                               max_layer_ratio=cfg.max_layer_ratio)
    thresholds = {}
    for n, m in layers.items():
        a = amounts.get(weight_name(n), cfg.default_amount())
        w = m.weight.detach()
        thresholds[weight_name(n)] = a * float(w.std()) if cfg.method == "quality" else a
    return masks_for_threshold(scores, thresholds)


def prune_unstructured(model: nn.Module, cfg: UnstructuredConfig) -> nn.Module:
    """Prune ``model`` in place (zero weights, attach masks combined with earlier ones); returns it.

    Fine-tune afterwards with :class:`deepshrink.pruning.MaskCallback` to keep the zeros."""
    masks = compute_masks(model, cfg)
    old = get_masks(model)
    # Never revive: a weight masked earlier has |w| = 0, so ratios already count it as removed.
    return apply_masks(model, {n: (m & old[n]) if n in old else m for n, m in masks.items()})
