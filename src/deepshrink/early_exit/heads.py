"""Exit heads (small classifiers on an intermediate feature) and the automatic choice of
attach points.

A head is described by a plain JSON dict (its *spec*: kind and shapes), so that a saved
multi-exit model can be rebuilt from its file without unpickling anything. Heads are kept
small on purpose: their cost is paid by every sample that reaches them, exiting or not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepshrink.errors import ModelError

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
          nn.AdaptiveMaxPool2d)
_ACTS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.Hardswish)
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class FirstToken(nn.Module):
    """``x[:, 0]``: the CLS token of a (batch, tokens, dim) sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def head_spec(kind: str, feature_shape: tuple[int, ...], num_classes: int, pool: int,
              hidden: int) -> dict[str, Any]:
    """The spec of a head of ``kind`` (``auto`` resolved) for a feature of ``feature_shape``
    (batch dimension included)."""
    rank = len(feature_shape)
    if kind == "auto":
        kind = {4: "pool_linear", 3: "cls_linear", 2: "linear"}.get(rank, "")
        if not kind:
            raise ModelError(f"no exit head for a feature of shape {feature_shape}",
                             hint="exit points must give 2-D, 3-D (tokens) or 4-D (image) features")
    need = {"pool_linear": 4, "conv_pool_linear": 4, "cls_linear": 3, "linear": 2}[kind]
    if rank != need:
        raise ModelError(f"head {kind!r} needs a {need}-D feature, got shape {feature_shape}")
    spec = {"kind": kind, "in_features": int(feature_shape[1] if rank != 3 else feature_shape[2]),
            "num_classes": int(num_classes), "hidden": int(hidden)}
    if rank == 4:
        spec["pool"] = int(pool)
    if kind == "conv_pool_linear" and hidden < 1:
        raise ModelError("head 'conv_pool_linear' needs hidden >= 1 (its conv channels)")
    return spec


def build_head(spec: dict[str, Any]) -> nn.Module:
    """The head module a (checked) spec describes."""
    kind, c, k, h = spec["kind"], spec["in_features"], spec["num_classes"], spec["hidden"]
    layers: list[nn.Module] = []
    if kind == "conv_pool_linear":
        layers += [nn.Conv2d(c, h, 3, 2, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU()]
        c, h = h, 0
    if kind in ("pool_linear", "conv_pool_linear"):
        p = spec["pool"]
        layers += [nn.AdaptiveAvgPool2d(p), nn.Flatten()]
        c = c * p * p
    elif kind == "cls_linear":
        layers.append(FirstToken())
    else:
        layers.append(nn.Flatten())
    if h:
        layers += [nn.Linear(c, h), nn.Tanh() if kind == "cls_linear" else nn.ReLU()]
        c = h
    layers.append(nn.Linear(c, k))
    return nn.Sequential(*layers)


def suggest_points(model: nn.Module) -> list[str]:
    """Attach points at block / stage boundaries, in execution order (the last block is left
    out: the final head follows it).

    * the largest list of same-type blocks (``nn.ModuleList`` / ``nn.Sequential``, e.g. a
      ResNet's residual blocks or a `transformers` encoder's layers): after each block;
    * otherwise a plain ``nn.Sequential`` of layers: after each pooling layer (stage ends), or,
      without pooling, after each activation that follows a weighted layer.
    """
    blocks = _block_list(model)
    if blocks is not None:
        name, children = blocks
        return [f"{name}.{c}" if name else c for c in children[:-1]]
    if isinstance(model, nn.Sequential):
        return _sequential_points(model)
    raise ModelError(f"cannot suggest exit points for {type(model).__name__}",
                     hint="name them: ExitConfig(points=('layer1', 'layer2'))")


def _block_list(model: nn.Module) -> tuple[str, list[str]] | None:
    best: tuple[str, list[str]] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.named_children())
        if len(kids) < 2 or len({type(c) for _, c in kids}) != 1:
            continue
        if not any(True for _ in kids[0][1].children()):  # leaf layers are not blocks
            continue
        if best is None or len(kids) > len(best[1]):
            best = (name, [k for k, _ in kids])
    return best


def _sequential_points(seq: nn.Sequential) -> list[str]:
    kids = list(seq.named_children())
    last_weighted = max((i for i, (_, m) in enumerate(kids) if isinstance(m, _WEIGHTED)), default=-1)
    pools = [n for i, (n, m) in enumerate(kids) if isinstance(m, _POOLS) and i < last_weighted]
    if pools:
        return pools
    acts = [n for i, (n, m) in enumerate(kids)
            if isinstance(m, _ACTS) and i < last_weighted and i > 0 and isinstance(kids[i - 1][1], _WEIGHTED)]
    if not acts:
        raise ModelError("the Sequential model has no stage boundary (pooling or activation) before "
                         "its last layer", hint="name the exit points")
    return acts
