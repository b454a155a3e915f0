"""`transformers` models built from configs (random weights, nothing downloaded).

Registered as ``hf``: ``create_model("hf", arch="BertForSequenceClassification",
config={"model_type": "bert", "hidden_size": 384, ...})``. The config dict travels in the
checkpoint's spec, so a pruned or quantized transformer rebuilds from its file.

``arch`` must name a ``PreTrainedModel`` subclass in transformers' own namespace, and the config
is built by that class's config class: a file can choose among transformers' architectures, not
call anything else. :func:`hf_spec` records any such model (e.g. from ``from_pretrained``), so
``deepshrink.save`` can store it rebuildably.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.errors import FormatError, ModelError
from deepshrink.models.registry import ModelSpec, register_model, set_spec
from deepshrink.models.schema import Int, Json, Obj, Str

# Config keys that make transformers fetch or run code from elsewhere.
_REFUSED_KEYS = ("auto_map", "trust_remote_code")
HF_SCHEMA = Obj({"arch": Str(pattern=re.compile(r"[A-Z][A-Za-z0-9]{0,127}")),
                 "config": Json(max_depth=6, max_int=1 << 24)},
                optional={"seed": Int(0, (1 << 32) - 1)})


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ModelError("transformers is not installed", hint="pip install 'deepshrink[hf]'") from exc
    return transformers


def _model_class(tf: Any, arch: str) -> type:
    cls = getattr(tf, arch, None) if arch.isidentifier() and not arch.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel)):
        raise ModelError(f"transformers has no model class {arch!r}",
                         hint="arch must be a PreTrainedModel subclass, e.g. 'BertModel'")
    return cls


def _config(tf: Any, cls: type, config: dict[str, Any]) -> Any:
    cfg = dict(config)
    refused = [k for k in _REFUSED_KEYS if k in cfg]
    if refused:
        raise ModelError(f"hf config key(s) {refused} are not allowed (they load remote code)")
    model_type = cfg.pop("model_type", None)
    config_cls = getattr(cls, "config_class", None)
    own_type = getattr(config_cls, "model_type", "") or ""
    if own_type:
        if model_type is not None and model_type != own_type:
            raise ModelError(f"hf config model_type {model_type!r} does not match {cls.__name__} "
                             f"({own_type!r})")
        return config_cls.from_dict(cfg)  # type: ignore[union-attr]
    if model_type is None:
        raise ModelError("hf config needs a 'model_type' key (e.g. 'bert', 'vit', 'resnet')")
    try:
        return tf.AutoConfig.for_model(model_type, **cfg)
    except ValueError as exc:
        raise ModelError(f"hf config rejected: {exc}") from exc


@register_model("hf", schema=HF_SCHEMA)
def hf_model(arch: str, config: dict[str, Any], seed: int = 0) -> nn.Module:
    """Build ``transformers.<arch>`` from a config dict with seeded random initialisation."""
    tf = _transformers()
    cls = _model_class(tf, arch)
    hf_config = _config(tf, cls, config)
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
    for key in ("transformers_version", "_name_or_path", *_REFUSED_KEYS):
        d.pop(key, None)
    return d


def hf_spec(model: nn.Module) -> ModelSpec | None:
    """The ``hf`` spec of a transformers model (None for other models). Only classes that
    transformers itself exports can be recorded, since only those can be rebuilt from a file."""
    tf = sys.modules.get("transformers")  # a PreTrainedModel exists only if transformers is imported
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        return None
    cls = type(model)
    if getattr(tf, cls.__name__, None) is not cls:
        raise ModelError(f"{cls.__name__} is not a class of the transformers package, so a file "
                         "cannot name it", hint="register a factory with deepshrink.models.register_model")
    return ModelSpec("hf", {"arch": cls.__name__, "config": hf_config_dict(model)})


# -- save_pretrained folders: in and out ------------------------------------------------------
MAX_CONFIG_BYTES = 1 << 20


def is_pretrained_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_pretrained_dir(path: Path) -> nn.Module:
    """A `transformers` ``save_pretrained`` folder, read without running anything it names.

    The class comes from the config's ``architectures`` and must be one transformers itself
    exports; weights are read from ``model.safetensors`` only (never a pickled ``.bin``); no
    remote code, no download. The model is tagged with its ``hf`` spec, so ``deepshrink.save``
    stores it rebuildably.
    """
    tf = _transformers()
    cfg_path = path / "config.json"
    if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
        raise FormatError(f"{cfg_path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{cfg_path}: not valid JSON ({exc})") from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str)):
        raise FormatError(f"{cfg_path}: no 'architectures' list naming the model class")
    if any(k in config for k in _REFUSED_KEYS):
        raise FormatError(f"{cfg_path}: names remote code ({[k for k in _REFUSED_KEYS if k in config]})",
                          hint="deepshrink loads only transformers' own classes")
    if not any(path.glob("model*.safetensors")):
        raise FormatError(f"{path}: no model.safetensors (pickled .bin weights are not read)",
                          hint="re-save with save_pretrained(..., safe_serialization=True)")
    try:
        cls = _model_class(tf, archs[0])
    except ModelError as exc:
        raise FormatError(f"{cfg_path}: {exc.args[0]}") from None
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                    trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise FormatError(f"{path}: transformers could not load it: {str(exc)[:300]}") from None
    model.eval()
    set_spec(model, hf_spec(model))
    return model


def save_pretrained_dir(model: nn.Module, path: Path) -> Path:
    """Write a transformers model (also pruned: its config carries the new sizes) as a
    ``save_pretrained`` folder with safetensors weights."""
    if hf_spec(model) is None:
        raise ModelError(f"{type(model).__name__} is not a transformers model: it has no "
                         "save_pretrained form", hint="save it as .safetensors, .onnx or .dsz")
    _check_config_expresses(model)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def _check_config_expresses(model: nn.Module) -> None:
    """ModelError unless ``type(model)(model.config)`` has every tensor shape ``model`` has: a
    structurally pruned model may have sizes its config cannot state (e.g. a pooler narrower than
    the hidden size), and transformers would then silently re-initialise those weights on load."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    odd = [f"{k} {tuple(v.shape)} (config gives {want.get(k)})" for k, v in model.state_dict().items()
           if want.get(k) != tuple(v.shape)]
    if odd:
        raise ModelError(f"{type(model).__name__}'s config cannot express {len(odd)} of its tensor "
                         f"shapes, so a save_pretrained folder would not reload it: {odd[:3]}",
                         hint="keep it as .safetensors (deepshrink.load rebuilds it), .onnx or .dsz")
