"""Configs of the early-exit family: where the exits go, how they are trained, how the exit
policy is calibrated. All are :class:`deepshrink.config.Config` dataclasses (validated, JSON
round-trippable)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from deepshrink.config import Config, check, check_patterns, name_matches
from deepshrink.train import TrainConfig

HEAD_KINDS = ("auto", "pool_linear", "conv_pool_linear", "linear", "cls_linear")
CRITERIA = ("confidence", "entropy")
_HEAD_KEYS = ("head", "pool", "hidden")


@dataclasses.dataclass
class ExitConfig(Config):
    """Where to attach exit heads and what they look like.

    ``points``: module names whose output feeds an exit head, in execution order; empty means
    suggested automatically (:func:`deepshrink.early_exit.suggest_points`). ``ignore``: regexes
    (full match) of suggested points to drop. ``head``: ``auto`` picks by the feature's rank
    (4-D maps: ``pool_linear``; 3-D token sequences: ``cls_linear`` on the first token; 2-D:
    ``linear``). ``pool``: the pooled grid side of image heads; ``hidden``: width of the head's
    hidden layer (0 = none; the channels of ``conv_pool_linear``). ``overrides``: regex of a
    point -> ``{"head", "pool", "hidden"}`` for that exit. ``output``: which field of the model's
    output holds the final logits (default: ``deepshrink.modeling.output_tensor``'s choice).
    """

    points: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    head: str = "auto"
    pool: int = 2
    hidden: int = 0
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    output: str | None = None

    def validate(self) -> None:
        n = type(self).__name__
        check(self.head in HEAD_KINDS, n, "head", f"must be one of {list(HEAD_KINDS)}, got {self.head!r}")
        check(1 <= self.pool <= 16, n, "pool", f"must be in [1, 16], got {self.pool}")
        check(0 <= self.hidden <= 65536, n, "hidden", f"must be in [0, 65536], got {self.hidden}")
        check(len(set(self.points)) == len(self.points), n, "points", "names a module twice")
        check_patterns(n, "ignore", self.ignore)
        check_patterns(n, "overrides", self.overrides)
        for pattern, value in self.overrides.items():
            check(isinstance(value, dict) and set(value) <= set(_HEAD_KEYS), n, f"overrides[{pattern!r}]",
                  f"must be an object with keys among {list(_HEAD_KEYS)}, got {value!r}")
            ExitConfig(head=value.get("head", "auto"), pool=value.get("pool", 2),
                       hidden=value.get("hidden", 0))  # same range checks

    def head_options(self, point: str) -> dict[str, Any]:
        """``{"head", "pool", "hidden"}`` for one exit: the defaults, then every matching override."""
        opts = {"head": self.head, "pool": self.pool, "hidden": self.hidden}
        for pattern, value in self.overrides.items():
            if name_matches(point, (pattern,)):
                opts.update(value)
        return opts


@dataclasses.dataclass
class ExitTrainConfig(Config):
    """Training of the exits through :func:`deepshrink.train.train`.

    ``mode="joint"`` (BranchyNet): the whole network is trained on the weighted sum of every
    exit's cross-entropy, final head included. ``mode="heads"``: the backbone is frozen (weights
    and BatchNorm statistics), so the final output stays exactly the original's, and each head
    learns from the labels and, by distillation, from the final head's soft targets
    (``alpha`` = weight of the soft term, ``temperature`` T). ``weights``: one per exit and one
    for the final head (``joint``) or one per exit (``heads``); empty = all 1.
    """

    mode: str = "joint"
    weights: tuple[float, ...] = ()
    temperature: float = 4.0
    alpha: float = 0.5
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> None:
        n = type(self).__name__
        check(self.mode in ("joint", "heads"), n, "mode", f"must be joint or heads, got {self.mode!r}")
        check(all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in self.weights),
              n, "weights", f"must be finite numbers >= 0, got {list(self.weights)}")
        check(self.temperature > 0, n, "temperature", f"must be > 0, got {self.temperature}")
        check(0.0 <= self.alpha <= 1.0, n, "alpha", f"must be in [0, 1], got {self.alpha}")


@dataclasses.dataclass
class CalibrationConfig(Config):
    """How the exit thresholds are chosen, on the validation split only.

    ``budget``: accuracy points the multi-exit model may lose against the reference (the full
    model) on validation; the cheapest policy within it is chosen. ``criterion``: ``confidence``
    (max softmax) or ``entropy`` (1 - H/log C, so that both read "higher = surer").
    ``grid``: candidate thresholds per exit (quantiles of that exit's validation scores).
    ``calibration_batches``: at most this many validation batches of ``batch_size`` are read.
    ``risk``: the chosen policy's accuracy drop must stay within the budget at confidence
    ``1 - risk`` (one-sided normal bound on the paired per-sample difference against the
    reference); 0.5 = the plain validation estimate. ``holdout``: share of the validation
    samples (seeded) kept out of the threshold search and used only to check the curve's points
    against the budget (0 = search and check on the same samples, which is optimistic).
    """

    budget: float = 0.5
    criterion: str = "confidence"
    risk: float = 0.1
    holdout: float = 0.0
    grid: int = 40
    calibration_batches: int = 1000
    batch_size: int = 256

    def validate(self) -> None:
        n = type(self).__name__
        check(math.isfinite(self.budget) and 0 <= self.budget <= 100, n, "budget",
              f"must be accuracy points in [0, 100], got {self.budget}")
        check(self.criterion in CRITERIA, n, "criterion", f"must be one of {list(CRITERIA)}, got "
              f"{self.criterion!r}")
        check(2 <= self.grid <= 1000, n, "grid", f"must be in [2, 1000], got {self.grid}")
        check(self.calibration_batches >= 1, n, "calibration_batches", "must be >= 1")
        check(self.batch_size >= 1, n, "batch_size", "must be >= 1")
        check(0.0 < self.risk <= 0.5, n, "risk", f"must be in (0, 0.5], got {self.risk}")
        check(isinstance(self.holdout, (int, float)) and 0.0 <= self.holdout < 1.0, n, "holdout",
              f"must be in [0, 1), got {self.holdout!r}")
