"""Model registry: build models by name (``lenet5``) or by ``module.path:callable``.

Every model built here carries its :class:`ModelSpec` as ``model.deepshrink_spec``, which the
checkpoint writer stores so that :func:`deepshrink.load` can rebuild the architecture without
pickle. Structural edits (pruning) are appended to the spec's ``edits`` and replayed on load.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from deepshrink.errors import ModelError

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}

SPEC_ATTR = "deepshrink_spec"


@dataclasses.dataclass
class ModelSpec:
    """How to rebuild a model: a registry name or ``module:callable``, its keyword arguments,
    and the list of structural edits applied since (each a JSON-able dict with a ``kind``)."""

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    edits: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": self.kwargs, "edits": self.edits}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict) or "name" not in data:
            raise ModelError(f"model spec must be a mapping with a 'name', got {data!r:.200}")
        return cls(str(data["name"]), dict(data.get("kwargs", {})), list(data.get("edits", [])))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def register_model(name: str | None = None) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make a factory available to :func:`create_model` under ``name``."""

    def wrap(fn: ModelFactory) -> ModelFactory:
        key = name or fn.__name__
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ModelError(f"model name {key!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(name: str) -> ModelFactory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelError(f"cannot import module {module_name!r} for model {name!r}: {exc}") from exc
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
            if fn is None:
                raise ModelError(f"module {module_name!r} has no attribute {attr!r}")
        if not callable(fn):
            raise ModelError(f"{name!r} is not callable")
        return fn  # type: ignore[return-value]
    raise ModelError(
        f"unknown model {name!r}",
        hint=f"registered: {', '.join(list_models())}; or give 'module.path:callable'",
    )


# Edit replayers: a structural edit kind -> function(model, edit) -> model. Registered by the
# technique that records the edit (e.g. channel pruning), so loading stays technique-agnostic.
EditReplayer = Callable[[nn.Module, dict[str, Any]], nn.Module]
_EDITS: dict[str, EditReplayer] = {}


def register_edit(kind: str) -> Callable[[EditReplayer], EditReplayer]:
    def wrap(fn: EditReplayer) -> EditReplayer:
        _EDITS[kind] = fn
        return fn

    return wrap


def _ensure_edit_plugins() -> None:
    # Techniques register their replayers on import; imported lazily (they import this module).
    for mod in ("deepshrink.pruning", "deepshrink.quantization", "deepshrink.early_exit"):
        importlib.import_module(mod)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by registry name or ``module:callable`` and tag it with its spec."""
    fn = _resolve(name)
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        raise ModelError(f"model {name!r} rejected arguments {kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name!r} returned {type(model).__name__}, not an nn.Module")
    set_spec(model, ModelSpec(name, dict(kwargs)))
    return model


def require_safe_spec(spec: ModelSpec, source: str) -> None:
    """Refuse a spec read from a file that would import code the user has not imported.

    A ``module:callable`` name makes :func:`create_model` import that module and call into it;
    from an untrusted file that is arbitrary code execution. Registry names, and modules the
    program already imported itself, are allowed.
    """
    module = spec.name.partition(":")[0]
    if ":" in spec.name and module not in sys.modules:
        raise ModelError(f"{source}: architecture {spec.name!r} needs module {module!r}, "
                         "which is not imported", hint="import it yourself first if you trust this file")


def build_from_spec(spec: ModelSpec) -> nn.Module:
    """Rebuild the architecture a spec describes, replaying its structural edits in order."""
    model = create_model(spec.name, **spec.kwargs)
    if spec.edits:
        _ensure_edit_plugins()
    for i, edit in enumerate(spec.edits):
        kind = edit.get("kind")
        if kind not in _EDITS:
            raise ModelError(f"edit #{i} has unknown kind {kind!r}", hint=f"known: {sorted(_EDITS)}")
        model = _EDITS[kind](model, edit)
    set_spec(model, ModelSpec(spec.name, dict(spec.kwargs), list(spec.edits)))
    return model


def get_spec(model: nn.Module) -> ModelSpec | None:
    return getattr(model, SPEC_ATTR, None)


def set_spec(model: nn.Module, spec: ModelSpec) -> None:
    # object.__setattr__ keeps nn.Module from treating the dataclass as a submodule/param.
    object.__setattr__(model, SPEC_ATTR, spec)


def record_edit(model: nn.Module, edit: dict[str, Any]) -> None:
    """Append a structural edit to the model's spec (no-op for models built outside the
    registry, which can still be saved as weights but not rebuilt)."""
    spec = get_spec(model)
    if spec is not None:
        spec.edits.append(edit)
