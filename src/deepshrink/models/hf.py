"""`transformers` models built from configs (random weights, nothing downloaded).

Registered as ``hf``: ``create_model("hf", arch="BertForSequenceClassification",
config={"model_type": "bert", "hidden_size": 384, ...})``. The config dict travels in the
checkpoint's spec, so a pruned or quantized transformer rebuilds from its file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepshrink.errors import ModelError
from deepshrink.models.registry import register_model


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ModelError("transformers is not installed", hint="pip install 'deepshrink[hf]'") from exc
    return transformers


@register_model("hf")
def hf_model(arch: str, config: dict[str, Any], seed: int = 0) -> nn.Module:
    """Build ``transformers.<arch>`` from a config dict with seeded random initialisation."""
    tf = _transformers()
    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ModelError("hf config needs a 'model_type' key (e.g. 'bert', 'vit', 'resnet')")
    try:
        hf_config = tf.AutoConfig.for_model(model_type, **cfg)
    except ValueError as exc:
        raise ModelError(f"hf config rejected: {exc}") from exc
    cls = getattr(tf, arch, None)
    if cls is None:
        raise ModelError(f"transformers has no class {arch!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(hf_config)
    model.eval()
    return model


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    """The minimal config dict (diff from defaults plus model_type) that rebuilds ``model``."""
    cfg = model.config  # type: ignore[attr-defined]
    d = cfg.to_diff_dict()
    d["model_type"] = cfg.model_type
    d.pop("transformers_version", None)
    return d
