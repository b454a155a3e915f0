"""Model registry, reference models and `transformers` models built from configs."""

from deepshrink.models import hf as hf  # registers "hf"
from deepshrink.models import mobilenet as mobilenet  # registers "mobilenet_v2"
from deepshrink.models import reference as reference  # registers the reference models
from deepshrink.models.registry import (
    ModelSpec,
    build_from_spec,
    create_model,
    get_spec,
    list_models,
    record_edit,
    register_edit,
    register_model,
    set_spec,
)

__all__ = [
    "ModelSpec",
    "build_from_spec",
    "create_model",
    "get_spec",
    "list_models",
    "record_edit",
    "register_edit",
    "register_model",
    "set_spec",
]
