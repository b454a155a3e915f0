"""Structured pruning of `transformers` models: attention heads, FFN width, ResNet block channels.

Transformers models do not trace with plain ``torch.fx`` (input checks, output dataclasses), so
their channel groups are found from the module structure instead:

* **attention heads** — a module with ``q_proj/k_proj/v_proj/o_proj`` (ViT in transformers 5) or a
  BERT-style ``self.{query,key,value}`` + ``output.dense`` pair. A head is a group channel spanning
  ``head_dim`` rows of q, k and v and ``head_dim`` input columns of the output projection;
* **FFN width** — ``fc1``/``fc2`` (ViT) or ``intermediate.dense``/``output.dense`` (BERT);
* **ResNet block channels** — inside each ``layer`` Sequential of conv+BatchNorm layers
  (ResNetBasicLayer / ResNetBottleNeckLayer), the channels between consecutive convs. The residual
  stream (``hidden_sizes``) and the stem are left whole, and reported as such.

The hidden size (residual stream, LayerNorms, embeddings) is never pruned: LayerNorm statistics
depend on every channel, so removing one is not the same as zeroing it.

After the cut, module fields (``num_attention_heads``, ``all_head_size``) and, where every layer
kept the same number, ``config.num_attention_heads`` / ``config.head_dim`` /
``config.intermediate_size`` are updated. BERT's own code derives the head size from
``hidden_size / num_attention_heads``, so a pruned BERT is rebuilt by :func:`deepshrink.load`
from the recorded edit (original config + kept indices), not from the updated config alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from deepshrink.errors import ModelError
from deepshrink.pruning.graph import ChannelGroup, Member


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is an optional extra
        return False
    return isinstance(model, PreTrainedModel)


def _member(module: str, role: str, n: int, width: int = 1) -> Member:
    pos = np.arange(n, dtype=np.int64)
    return Member(module, role, pos, pos // width)


def _linear(m: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(m, name, None)
    return child if isinstance(child, nn.Linear) else None


def attention_groups(model: nn.Module) -> tuple[list[ChannelGroup], dict[str, tuple[str, str]]]:
    """Head groups, and for each the module holding the head fields and its head-size field."""
    groups: list[ChannelGroup] = []
    fields: dict[str, tuple[str, str]] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if all(_linear(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            holder, qkv = m, [f"{prefix}{p}" for p in ("q_proj", "k_proj", "v_proj")]
            o_name, size_field, holder_name = f"{prefix}o_proj", "head_dim", name
        elif (isinstance(getattr(m, "self", None), nn.Module)
              and all(_linear(m.self, p) for p in ("query", "key", "value"))
              and _linear(getattr(m, "output", None), "dense")):
            holder, qkv = m.self, [f"{prefix}self.{p}" for p in ("query", "key", "value")]
            o_name, size_field, holder_name = f"{prefix}output.dense", "attention_head_size", f"{prefix}self"
        else:
            continue
        heads = getattr(holder, "num_attention_heads", None)
        q = model.get_submodule(qkv[0])
        if not isinstance(heads, int) or heads < 1 or q.out_features % heads:
            continue
        if getattr(holder, "num_key_value_heads", heads) != heads:
            continue  # grouped-query attention: k/v heads are shared, not handled here
        d = q.out_features // heads
        members = [_member(n, "out", heads * d, d) for n in qkv] + [_member(o_name, "in", heads * d, d)]
        groups.append(ChannelGroup(name, heads, members, kind="head"))
        fields[name] = (holder_name, size_field)
    return groups, fields


def ffn_groups(model: nn.Module) -> list[ChannelGroup]:
    groups = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if _linear(m, "fc1") and _linear(m, "fc2"):
            up, down = f"{prefix}fc1", f"{prefix}fc2"
        elif (_linear(getattr(m, "intermediate", None), "dense")
              and _linear(getattr(m, "output", None), "dense")):
            up, down = f"{prefix}intermediate.dense", f"{prefix}output.dense"
        else:
            continue
        n = model.get_submodule(up).out_features
        if model.get_submodule(down).in_features != n:
            continue
        groups.append(ChannelGroup(up, n, [_member(up, "out", n), _member(down, "in", n)], kind="ffn"))
    return groups


def conv_block_groups(model: nn.Module) -> list[ChannelGroup]:
    """Channels between consecutive conv+BN layers of a residual block's ``layer`` Sequential."""
    groups = []
    for name, m in model.named_modules():
        seq = getattr(m, "layer", None)
        if not isinstance(seq, nn.Sequential) or not isinstance(getattr(m, "shortcut", None), nn.Module):
            continue
        convs = list(seq)
        if not all(isinstance(getattr(c, "convolution", None), nn.Conv2d)
                   and isinstance(getattr(c, "normalization", None), nn.BatchNorm2d)
                   and c.convolution.groups == 1 for c in convs):
            continue
        for i in range(len(convs) - 1):
            a, b = f"{name}.layer.{i}", f"{name}.layer.{i + 1}"
            n = convs[i].convolution.out_channels
            groups.append(ChannelGroup(f"{a}.convolution", n, [
                _member(f"{a}.convolution", "out", n), _member(f"{a}.normalization", "along", n),
                _member(f"{b}.convolution", "in", n)]))
    return groups


def prune_hf(model: nn.Module, config: Any, example_inputs: Any, *, calibration: Any = None) -> nn.Module:
    """Prune heads, FFN width and ResNet block channels of a transformers model in place."""
    from deepshrink.pruning import structured as st
    from deepshrink.pruning.importance import score_groups

    before = st._shape_of(st._forward(model, example_inputs))
    heads, fields = attention_groups(model)
    groups = heads + ffn_groups(model) + conv_block_groups(model)
    if not groups:
        raise ModelError(f"no attention heads, FFN or ResNet block channels found in {type(model).__name__}",
                         hint="supported: ViT (q_proj/k_proj/v_proj/o_proj), BERT, ResNet")
    for g in groups:
        if any(st.name_matches(layer, config.ignore) for layer in [g.name, *g.layers()]):
            g.blocked = f"{g.name} is in the ignore list"
    live = [g for g in groups if g.blocked is None and g.size > 1]
    batches = st.calibration_batches(config, example_inputs, calibration)
    keep = st.choose(live, list(score_groups(model, live, config.importance, batches)), config)
    slices = st.plan_slices(model, live, keep)
    st.apply_slices(model, slices)

    attrs: dict[str, dict[str, Any]] = {}
    kept_heads: list[int] = []
    for g in heads:
        holder_name, size_field = fields[g.name]
        k = next((len(kk) for gg, kk in zip(live, keep, strict=True) if gg is g and kk is not None), g.size)
        holder = model.get_submodule(holder_name)
        d = int(getattr(holder, size_field))
        values: dict[str, Any] = {"num_attention_heads": k}
        if hasattr(holder, "all_head_size"):
            values["all_head_size"] = k * d
        attrs[holder_name] = values
        kept_heads.append(k)
    cfg_fields: dict[str, Any] = {}
    old_heads = getattr(model.config, "num_attention_heads", None)
    if kept_heads and len(set(kept_heads)) == 1 and kept_heads[0] != old_heads:
        cfg_fields["num_attention_heads"] = kept_heads[0]
        cfg_fields["head_dim"] = int(getattr(model.get_submodule(fields[heads[0].name][0]),
                                             fields[heads[0].name][1]))
    widths = {model.get_submodule(g.name).out_features for g in groups if g.kind == "ffn"}
    if len(widths) == 1 and widths != {getattr(model.config, "intermediate_size", None)}:
        cfg_fields["intermediate_size"] = widths.pop()
    st.set_fields(model, attrs, cfg_fields)
    after = st._shape_of(st._forward(model, example_inputs))
    if after != before:
        raise ModelError(f"pruning {type(model).__name__} changed the output shape {before} -> {after}")
    st.finish(model, config, groups, live, keep, slices, attrs, cfg_fields)
    skipped = model.deepshrink_channel_report["skipped"]  # type: ignore[attr-defined]
    skipped.append({"group": "hidden size / residual stream", "kind": "channel", "layers": [],
                    "reason": "LayerNorm / residual width is kept whole (removing a channel changes "
                              "the normalisation statistics)"})
    return model
