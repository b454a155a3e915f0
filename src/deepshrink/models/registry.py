"""Model registry: build models by name (``lenet5``) or, from code, by ``module.path:callable``.

Every model built here carries its :class:`ModelSpec` as ``model.deepshrink_spec``, which the
checkpoint writer stores so that :func:`deepshrink.load` can rebuild the architecture without
pickle. Structural edits (pruning, quantization, ...) are appended to the spec's ``edits`` and
replayed on load (see :mod:`deepshrink.models.spec`, which also decides what a *file* may name).

A registry entry may declare a ``schema`` for its keyword arguments (see
:mod:`deepshrink.models.schema`); without one, the arguments a file may pass are the factory's
own parameters, each a JSON scalar or a short list of them.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from collections.abc import Callable
from typing import Any

from torch import nn

from deepshrink.errors import ModelError
from deepshrink.models.schema import Bool, Float, Int, List, Obj, OneOf, Schema, Str

ModelFactory = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered factory and the schema its keyword arguments must satisfy."""

    factory: ModelFactory
    kwargs_schema: Schema


_REGISTRY: dict[str, Entry] = {}

SPEC_ATTR = "deepshrink_spec"
# What a file may pass to a factory that declares no schema: plain JSON scalars and short lists.
_SCALAR = OneOf(Bool(), Int(-(1 << 31), 1 << 31), Float(), Str(max_len=256))
PLAIN_ARG = OneOf(_SCALAR, List(OneOf(Bool(), Int(-(1 << 31), 1 << 31), Float()), max_len=64))


@dataclasses.dataclass
class ModelSpec:
    """How to rebuild a model: a registry name (or, for trusted code, ``module:callable``), its
    keyword arguments, and the list of structural edits applied since (each a JSON-able dict
    with a ``kind``)."""

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    edits: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": self.kwargs, "edits": self.edits}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def signature_schema(fn: Callable[..., Any]) -> Schema:
    """The default kwargs schema of a factory: its named parameters, each a :data:`PLAIN_ARG`."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: accept no arguments
        return Obj({})
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = {p.name: PLAIN_ARG for p in named if p.default is p.empty}
    optional = {p.name: PLAIN_ARG for p in named if p.default is not p.empty}
    return Obj(required, optional)


def register_model(name: str | None = None, *, schema: Schema | None = None
                   ) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make a factory available to :func:`create_model` (and to files) under ``name``.

    ``schema`` checks the keyword arguments a file may pass; default: :func:`signature_schema`.
    """

    def wrap(fn: ModelFactory) -> ModelFactory:
        key = name or fn.__name__
        if key in _REGISTRY and _REGISTRY[key].factory is not fn:
            raise ModelError(f"model name {key!r} is already registered")
        _REGISTRY[key] = Entry(fn, schema or signature_schema(fn))
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def registry_entry(name: str) -> Entry | None:
    return _REGISTRY.get(name)


def import_callable(name: str) -> ModelFactory:
    """Resolve ``module.path:callable`` (public attribute names only). Callers decide trust."""
    module_name, _, attr = name.partition(":")
    parts = attr.split(".")
    if not module_name or not all(p.isidentifier() and not p.startswith("_") for p in parts):
        raise ModelError(f"{name!r} is not of the form 'module.path:callable'")
    try:
        fn: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import module {module_name!r} for model {name!r}: {exc}") from exc
    for part in parts:
        fn = getattr(fn, part, None)
        if fn is None:
            raise ModelError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ModelError(f"{name!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _resolve(name: str) -> ModelFactory:
    if name in _REGISTRY:
        return _REGISTRY[name].factory
    if ":" in name:
        return import_callable(name)
    raise ModelError(
        f"unknown model {name!r}",
        hint=f"registered: {', '.join(list_models())}; or give 'module.path:callable'",
    )


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by registry name or ``module:callable`` and tag it with its spec.

    This is the in-code API: the caller chooses what to import. Files go through
    :func:`deepshrink.models.spec.build_checked`, which only allows what the caller trusts.
    """
    fn = _resolve(name)
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        raise ModelError(f"model {name!r} rejected arguments {kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name!r} returned {type(model).__name__}, not an nn.Module")
    set_spec(model, ModelSpec(name, dict(kwargs)))
    return model


def get_spec(model: nn.Module) -> ModelSpec | None:
    return getattr(model, SPEC_ATTR, None)


def set_spec(model: nn.Module, spec: ModelSpec) -> None:
    # object.__setattr__ keeps nn.Module from treating the dataclass as a submodule/param.
    object.__setattr__(model, SPEC_ATTR, spec)
