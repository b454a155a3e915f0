"""Model registry, reference models, `transformers` models built from configs, and the one
validated path that rebuilds a model from a file's spec (:mod:`deepshrink.models.spec`)."""

from deepshrink.models import hf as hf  # registers "hf"
from deepshrink.models import mobilenet as mobilenet  # registers "mobilenet_v2"
from deepshrink.models import reference as reference  # registers the reference models
from deepshrink.models.registry import (
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    register_model,
    set_spec,
)
from deepshrink.models.spec import (
    build_checked,
    build_from_spec,
    edit_kinds,
    keep_spec,
    record_edit,
    register_edit,
    spec_of,
    trusting,
)

__all__ = [
    "ModelSpec",
    "build_checked",
    "build_from_spec",
    "create_model",
    "edit_kinds",
    "get_spec",
    "keep_spec",
    "list_models",
    "record_edit",
    "register_edit",
    "register_model",
    "set_spec",
    "spec_of",
    "trusting",
]
