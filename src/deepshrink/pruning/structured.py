"""Structured (neuron / channel) pruning: physically remove channels and return a smaller model.

    model = prune_channels(model, ChannelConfig(ratio=0.5, importance="l1"), example_inputs)

Three separate steps: the dependency graph (:mod:`deepshrink.pruning.graph`) finds the groups of
coupled channels, an importance criterion (:mod:`deepshrink.pruning.importance`) scores every
channel of every group, and surgery (:data:`SURGERY`, one function per layer type) slices the
weights of every coupled layer. The model is edited in place and returned.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepshrink.config import Config, check
from deepshrink.errors import ModelError
from deepshrink.models import record_edit, register_edit
from deepshrink.models.schema import Float, Int, List, Map, Obj, Str
from deepshrink.pruning.graph import ChannelGroup, build_groups
from deepshrink.pruning.importance import as_batches, list_importance, needs_data, score_groups


@dataclasses.dataclass
class ChannelConfig(Config):
    """What to cut.

    ratio: fraction of the channels of every prunable group to remove, in [0, 1).
    importance: a criterion registered in :mod:`deepshrink.pruning.importance`: ``l1``, ``l2``
        (weight norms, no data), ``activation`` (mean |activation|), ``apoz`` (average percentage of
        zeros), ``taylor`` (first-order Taylor, needs labelled calibration batches).
    overrides: layer name or regex (full match) -> ratio, for the groups whose producing layers
        match; when several layers of one group match, the smallest ratio wins.
    round_to: keep a multiple of this many channels (e.g. 8 for SIMD-friendly widths).
    min_channels: never keep fewer channels than this in a group.
    ignore: layer names or regexes whose channels are never pruned (reported as skipped).
    calibration_batches: how many batches the data-based criteria read.
    heads_ratio / ffn_ratio: for transformers models, the fraction of attention heads / FFN
        neurons removed per layer (default: ``ratio``).
    """

    ratio: float = 0.5
    importance: str = "l1"
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    round_to: int = 1
    min_channels: int = 1
    ignore: tuple[str, ...] = ()
    calibration_batches: int = 8
    heads_ratio: float | None = None
    ffn_ratio: float | None = None

    def validate(self) -> None:
        n = type(self).__name__
        for field in ("ratio", "heads_ratio", "ffn_ratio"):
            v = getattr(self, field)
            if v is None and field != "ratio":
                continue
            check(isinstance(v, (int, float)) and 0.0 <= v < 1.0, n, field,
                  f"must be in [0, 1) (1.0 would remove every channel), got {v!r}")
        for key, v in self.overrides.items():
            check(isinstance(v, (int, float)) and 0.0 <= v < 1.0, n, f"overrides[{key!r}]",
                  f"must be in [0, 1), got {v!r}")
        for pattern in (*self.overrides, *self.ignore):
            try:
                re.compile(pattern)
            except re.error as exc:
                check(False, n, "overrides/ignore", f"bad regex {pattern!r}: {exc}")
        check(isinstance(self.round_to, int) and self.round_to >= 1, n, "round_to",
              f"must be an integer >= 1, got {self.round_to!r}")
        check(isinstance(self.min_channels, int) and self.min_channels >= 1, n, "min_channels",
              f"must be an integer >= 1, got {self.min_channels!r}")
        check(isinstance(self.calibration_batches, int) and self.calibration_batches >= 1, n,
              "calibration_batches", f"must be an integer >= 1, got {self.calibration_batches!r}")
        check(self.importance in list_importance(), n, "importance",
              f"unknown criterion {self.importance!r}; known: {', '.join(list_importance())}")


def name_matches(name: str, patterns: Any) -> bool:
    """True when ``name`` equals or fully matches (as a regex) one of ``patterns``."""
    return any(name == p or re.fullmatch(p, name) for p in patterns)


# -- surgery: how to cut each layer type ----------------------------------------------------------
# ``fn(module, role, keep)`` keeps the indices ``keep`` (sorted LongTensor) along the dimension that
# ``role`` names: "out" (output channels), "in" (input channels), "along" (per-channel parameters).
Surgery = Callable[[nn.Module, str, torch.Tensor], None]
SURGERY: dict[type, Surgery] = {}


def register_surgery(*types: type) -> Callable[[Surgery], Surgery]:
    """Decorator: teach channel pruning to cut a layer type (subclasses inherit it)."""

    def wrap(fn: Surgery) -> Surgery:
        for t in types:
            SURGERY[t] = fn
        return fn

    return wrap


def _surgery_for(module: nn.Module) -> Surgery:
    for cls in type(module).__mro__:
        if cls in SURGERY:
            return SURGERY[cls]
    raise ModelError(f"no channel surgery for layer type {type(module).__name__}",
                     hint="add one with deepshrink.pruning.structured.register_surgery")


def _slice(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    t = getattr(module, name, None)
    if t is None:
        return
    new = t.detach().index_select(dim, keep).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        module._buffers[name] = new


def _check_role(module: nn.Module, role: str, allowed: tuple[str, ...]) -> None:
    if role not in allowed:
        raise ModelError(f"{type(module).__name__} cannot be cut along {role!r} (allowed: {allowed})")


@register_surgery(nn.Linear)
def _cut_linear(m: nn.Linear, role: str, keep: torch.Tensor) -> None:
    _check_role(m, role, ("out", "in"))
    if role == "out":
        _slice(m, "weight", 0, keep)
        _slice(m, "bias", 0, keep)
        m.out_features = len(keep)
    else:
        _slice(m, "weight", 1, keep)
        m.in_features = len(keep)


@register_surgery(nn.Conv1d, nn.Conv2d)
def _cut_conv(m: nn.Conv1d | nn.Conv2d, role: str, keep: torch.Tensor) -> None:
    _check_role(m, role, ("out", "in", "along"))
    if role in ("out", "along"):
        _slice(m, "weight", 0, keep)
        _slice(m, "bias", 0, keep)
        m.out_channels = len(keep)
        if role == "along":  # depthwise: one filter per input channel
            m.in_channels = m.groups = len(keep)
    else:
        if m.groups != 1:
            raise ModelError(f"grouped conv (groups={m.groups}) input channels cannot be cut")
        _slice(m, "weight", 1, keep)
        m.in_channels = len(keep)


@register_surgery(nn.BatchNorm1d, nn.BatchNorm2d)
def _cut_batchnorm(m: nn.modules.batchnorm._BatchNorm, role: str, keep: torch.Tensor) -> None:
    _check_role(m, role, ("along",))
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice(m, name, 0, keep)
    m.num_features = len(keep)


@register_surgery(nn.LayerNorm)
def _cut_layernorm(m: nn.LayerNorm, role: str, keep: torch.Tensor) -> None:
    # Only valid where the caller knows the normalised axis itself shrinks (not used by the graph,
    # which blocks LayerNorm over channels because removing a channel changes the statistics).
    _check_role(m, role, ("along",))
    _slice(m, "weight", 0, keep)
    _slice(m, "bias", 0, keep)
    m.normalized_shape = (len(keep),)


@register_surgery(nn.Embedding)
def _cut_embedding(m: nn.Embedding, role: str, keep: torch.Tensor) -> None:
    _check_role(m, role, ("out",))
    _slice(m, "weight", 1, keep)
    m.embedding_dim = len(keep)


def dim_size(module: nn.Module, role: str) -> int:
    """Length of the dimension ``role`` cuts."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    return int(module.weight.shape[1 if role == "in" else 0])


def apply_slices(model: nn.Module, slices: dict[str, dict[str, list[int]]]) -> nn.Module:
    """Cut every layer named in ``slices`` ({layer: {role: kept indices}}) in place."""
    modules = dict(model.named_modules())
    for name, roles in slices.items():
        if name not in modules:
            raise ModelError(f"channel pruning edit names layer {name!r}, which the model lacks")
        mod = modules[name]
        for role, keep in roles.items():
            n = dim_size(mod, role)
            if keep and (min(keep) < 0 or max(keep) >= n):
                raise ModelError(f"layer {name}: kept {role} index out of range 0..{n - 1}")
            _surgery_for(mod)(mod, role, torch.as_tensor(keep, dtype=torch.long))
    return model


def set_fields(model: nn.Module, attrs: dict[str, dict[str, Any]], config: dict[str, Any]) -> None:
    """Set module attributes ({layer: {attr: value}}) and ``model.config`` fields after a cut."""
    for name, values in attrs.items():
        mod = model.get_submodule(name)
        for key, value in values.items():
            setattr(mod, key, value)
    cfg = getattr(model, "config", None)
    for key, value in config.items():
        if cfg is None:
            raise ModelError(f"edit sets config.{key} but {type(model).__name__} has no config")
        setattr(cfg, key, value)


# The recorded edit, as checked on load: only these module attributes / config fields may be set.
_COUNT = Int(0, 1 << 31)
CHANNEL_PRUNE_SCHEMA = Obj(
    {"slices": Map(Map(List(_COUNT, max_len=1 << 24), key=Str(choices=("in", "out", "along"))))},
    optional={"attrs": Map(Obj({}, optional={"num_attention_heads": _COUNT, "all_head_size": _COUNT})),
              "config": Obj({}, optional={"num_attention_heads": _COUNT, "head_dim": _COUNT,
                                          "intermediate_size": _COUNT}),
              "importance": Str(), "ratio": Float(0.0, 1.0)})


@register_edit("channel_prune", schema=CHANNEL_PRUNE_SCHEMA)
def replay_channel_prune(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    """Rebuild the smaller architecture on load from the recorded kept indices."""
    apply_slices(model, edit.get("slices", {}))
    set_fields(model, edit.get("attrs", {}), edit.get("config", {}))
    return model


# -- choosing channels ----------------------------------------------------------------------------
def group_ratio(group: ChannelGroup, config: ChannelConfig) -> float:
    """The ratio for a group: the smallest override matching one of its layers, else the default
    for its kind (``heads_ratio`` / ``ffn_ratio`` for transformers groups)."""
    matched = [r for pat, r in config.overrides.items()
               for layer in [*group.producers, group.name] if name_matches(layer, [pat])]
    if matched:
        return min(matched)
    if group.kind == "head" and config.heads_ratio is not None:
        return config.heads_ratio
    if group.kind == "ffn" and config.ffn_ratio is not None:
        return config.ffn_ratio
    return config.ratio


def n_keep(size: int, ratio: float, config: ChannelConfig, round_to: int | None = None) -> int:
    """Channels kept: ceil(size * (1 - ratio)) rounded up to ``round_to``, at least
    ``min_channels``, at most ``size``."""
    step = config.round_to if round_to is None else round_to
    k = -(-round(size * (1.0 - ratio) * 1e6) // 1_000_000)  # ceil, robust to float fuzz
    k = -(-k // step) * step
    return min(size, max(k, config.min_channels))


def choose(groups: list[ChannelGroup], scores: list[torch.Tensor | None], config: ChannelConfig
           ) -> list[torch.Tensor | None]:
    """Per group, the sorted indices of the channels to keep (None: group untouched)."""
    keep: list[torch.Tensor | None] = []
    for g, s in zip(groups, scores, strict=True):
        # round_to is about channel widths; a head group counts heads, whose width is fixed.
        step = 1 if g.kind == "head" else None
        k = n_keep(g.size, group_ratio(g, config), config, step) if g.blocked is None else g.size
        if s is None or k >= g.size:
            keep.append(None)
            continue
        top = torch.sort(s, descending=True, stable=True).indices[:k]
        keep.append(torch.sort(top).values)
    return keep


def plan_slices(model: nn.Module, groups: list[ChannelGroup], keep: list[torch.Tensor | None]
                ) -> dict[str, dict[str, list[int]]]:
    """Turn kept channels per group into kept indices per (layer, role)."""
    modules = dict(model.named_modules())
    drop: dict[tuple[str, str], set[int]] = {}
    for g, k in zip(groups, keep, strict=True):
        if k is None:
            continue
        kept = torch.zeros(g.size, dtype=torch.bool)
        kept[k] = True
        for m in g.members:
            gone = m.positions[~kept[torch.as_tensor(m.channels)].numpy()]
            drop.setdefault((m.module, m.role), set()).update(int(i) for i in gone)
    slices: dict[str, dict[str, list[int]]] = {}
    for (name, role), gone in drop.items():
        n = dim_size(modules[name], role)
        slices.setdefault(name, {})[role] = [i for i in range(n) if i not in gone]
    return slices


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        model.train(was_training)


def _shape_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if hasattr(out, "logits"):
        return tuple(out.logits.shape)
    if isinstance(out, (tuple, list)):
        return [_shape_of(o) for o in out]
    return None


def prune_channels(model: nn.Module, config: ChannelConfig, example_inputs: Any, *,
                   calibration: Any = None) -> nn.Module:
    """Remove channels from ``model`` **in place** and return it, smaller.

    ``example_inputs`` (a tensor or a tuple of positional inputs, batch >= 1) is used to trace
    shapes. ``calibration`` feeds the data criteria (a DataLoader or list of ``(x, y)``; without
    it ``activation``/``apoz`` read ``example_inputs``; ``taylor`` needs labels). Transformers models
    (ResNet, ViT, BERT) are handled by :mod:`deepshrink.pruning.hf`. What was pruned and what was
    skipped (with reasons) is left in ``model.deepshrink_channel_report``; the edit is recorded in
    the model's spec so :func:`deepshrink.load` rebuilds the smaller architecture.
    """
    if not isinstance(config, ChannelConfig):
        raise ModelError(f"prune_channels needs a ChannelConfig, got {type(config).__name__}")
    from deepshrink.pruning import hf

    if hf.is_transformers_model(model):
        return hf.prune_hf(model, config, example_inputs, calibration=calibration)
    before = _shape_of(_forward(model, example_inputs))
    groups = build_groups(model, example_inputs, lambda name: name_matches(name, config.ignore))
    live = [g for g in groups if g.blocked is None and g.size > 1]
    batches = calibration_batches(config, example_inputs, calibration)
    scores = score_groups(model, live, config.importance, batches)
    keep = choose(live, list(scores), config)
    slices = plan_slices(model, live, keep)
    apply_slices(model, slices)
    after = _shape_of(_forward(model, example_inputs))
    if after != before:
        raise ModelError(f"channel pruning changed the output shape {before} -> {after}")
    finish(model, config, groups, live, keep, slices)
    return model


def calibration_batches(config: ChannelConfig, example_inputs: Any, calibration: Any) -> list:
    """The batches a data criterion reads (``example_inputs`` when no calibration data is given,
    except for Taylor, which needs labels)."""
    if not needs_data(config.importance):
        return []
    batches = as_batches(calibration, config.calibration_batches)
    if not batches and config.importance != "taylor":
        batches = [(example_inputs, None)]
    return batches


def finish(model: nn.Module, config: ChannelConfig, groups: list[ChannelGroup],
           live: list[ChannelGroup], keep: list[torch.Tensor | None],
           slices: dict[str, dict[str, list[int]]], attrs: dict[str, dict[str, Any]] | None = None,
           cfg_fields: dict[str, Any] | None = None) -> None:
    """Record the edit in the spec and leave a report on the model."""
    edit: dict[str, Any] = {"kind": "channel_prune", "config": cfg_fields or {},
                            "attrs": attrs or {}, "slices": slices,
                            "importance": config.importance, "ratio": config.ratio}
    record_edit(model, edit)
    kept = {id(g): k for g, k in zip(live, keep, strict=True)}
    report = {
        "pruned": [{"group": g.name, "kind": g.kind, "layers": g.layers(), "size": g.size,
                    "kept": len(kept[id(g)]) if kept.get(id(g)) is not None else g.size}
                   for g in live],
        "skipped": [{"group": g.name, "kind": g.kind, "layers": g.layers(),
                     "reason": g.blocked or "a single channel"}
                    for g in groups if g.blocked is not None or g.size <= 1],
        "edit": edit,  # also here for models built outside the registry (no spec to record into)
    }
    object.__setattr__(model, "deepshrink_channel_report", report)




def last_edit(model: nn.Module) -> dict[str, Any]:
    """The most recent channel-pruning edit recorded on ``model`` (kept indices per layer)."""
    from deepshrink.models import get_spec

    spec = get_spec(model)
    edits = [e for e in (spec.edits if spec else []) if e.get("kind") == "channel_prune"]
    if not edits:
        report = getattr(model, "deepshrink_channel_report", None)
        if report and "edit" in report:
            return report["edit"]
        raise ModelError(f"{type(model).__name__} carries no channel-pruning edit")
    return edits[-1]


__all__ = ["SURGERY", "ChannelConfig", "apply_slices", "last_edit", "prune_channels", "register_surgery"]
