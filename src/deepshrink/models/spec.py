"""Rebuilding a model from the spec a file records: the one validated path every loader uses.

A spec is JSON: ``{"name": ..., "kwargs": {...}, "edits": [{"kind": ..., ...}, ...]}``. A file
is untrusted input, so :func:`build_checked` never imports or calls anything the file names
beyond what the program allows:

* ``name`` is an entry of the model registry (:func:`~deepshrink.models.register_model`; a
  user may register their own entries in code), e.g. ``"hf"``, which builds a ``transformers``
  ``PreTrainedModel`` class looked up in transformers' own namespace from a config dict
  through that class's config class;
* a ``module.path:callable`` name only when the caller trusts it:
  ``deepshrink.load(path, trust=["mypkg.models"])`` (module-name prefixes);
* ``kwargs`` must satisfy the entry's schema (by default: the factory's own parameters, as
  JSON scalars or short lists);
* each edit must be of a registered kind and satisfy that kind's schema before it is replayed.

Registering an edit kind (for technique families; register where the edit is recorded, so the
dependency points from the technique down to this module)::

    from deepshrink.models import register_edit
    from deepshrink.models.schema import Int, List, Map, Obj

    @register_edit("my_edit", schema=Obj({"layers": Map(Obj({"shape": List(Int(0), max_len=8)}))}))
    def _replay_my_edit(model: nn.Module, edit: dict) -> nn.Module:
        ...  # ``edit`` is the schema-checked dict; only touch the modules it names

Schemas reject unknown fields, so a replayer never sees a key it did not declare. The replayer
may raise anything on inconsistent input (a layer the model lacks, ...): :func:`build_checked`
turns it into a :class:`FormatError`. It must work on the ``meta`` device too (see below).

The validation pass of :func:`build_checked`, before any real tensor is allocated:

1. the spec's schema (name, kwargs, edits), as above;
2. integer arguments that count layers/blocks/experts are at most the number of stored tensors;
3. the architecture is built on the ``meta`` device (no memory), and every stored tensor must
   have a name, shape and dtype the architecture expects; the total element count of the
   architecture must fit in what the file holds;
4. only then the real model is built.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from deepshrink.errors import DeepShrinkError, FormatError, ModelError
from deepshrink.models.hf import hf_spec
from deepshrink.models.registry import (
    ModelSpec,
    create_model,
    get_spec,
    import_callable,
    registry_entry,
    set_spec,
    signature_schema,
)
from deepshrink.models.schema import List, Schema, Str

EditReplayer = Callable[[nn.Module, dict[str, Any]], nn.Module]
MAX_EDITS = 256
# Buffers a model may hold beyond what its file stores (non-persistent ones: masks, rotary tables).
EXTRA_ELEMENTS = 1 << 24
_NAME = Str(pattern=re.compile(r"[A-Za-z0-9_]+|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*"))
_COUNT_KEY = re.compile(r".*(layer|block|depth|expert).*", re.IGNORECASE)
_LABEL_KEY = re.compile(r".*(label|class).*", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class EditKind:
    kind: str
    schema: Schema
    replay: EditReplayer


_EDITS: dict[str, EditKind] = {}


def register_edit(kind: str, *, schema: Schema) -> Callable[[EditReplayer], EditReplayer]:
    """Decorator: replay edits of ``kind`` on load, after checking them against ``schema``
    (which describes every field except ``kind``)."""

    def wrap(fn: EditReplayer) -> EditReplayer:
        if kind in _EDITS and _EDITS[kind].replay is not fn:
            raise ModelError(f"edit kind {kind!r} is already registered")
        _EDITS[kind] = EditKind(kind, schema, fn)
        return fn

    return wrap


def edit_kinds() -> list[str]:
    return sorted(_EDITS)


# Modules trusted by every rebuild in this context (see :func:`trusting`), on top of ``trust=``.
_TRUSTED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("deepshrink_trusted", default=())


@contextlib.contextmanager
def trusting(modules: Iterable[str]) -> Iterator[None]:
    """Within the block, every rebuild from a file (``deepshrink.load``, also inside pipelines
    that reload the files they write) trusts ``modules`` as if passed ``trust=``. The command
    line's ``--import`` uses it: naming your code is the opt-in."""
    token = _TRUSTED.set((*_TRUSTED.get(), *modules))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _trusted(name: str, trust: Iterable[str]) -> bool:
    module = name.partition(":")[0]
    return any(module == t or module.startswith(t.rstrip(".") + ".") for t in (*trust, *_TRUSTED.get()))


def _kwargs_schema(name: str, trust: Iterable[str], where: str) -> Schema:
    entry = registry_entry(name)
    if entry is not None:
        return entry.kwargs_schema
    if ":" in name and _trusted(name, trust):
        try:
            return signature_schema(import_callable(name))
        except ModelError as exc:
            raise FormatError(f"{where}.name: {exc.args[0]}") from exc
    raise FormatError(
        f"{where}.name: {name!r} is not a registered model, and a file may not name code to run",
        hint="register it with deepshrink.models.register_model, or if you trust this file, pass "
             f"trust=[{name.partition(':')[0]!r}] to deepshrink.load (on the command line: --import "
             f"{name.partition(':')[0]})" if ":" in name else
        "see deepshrink.list_models()")


def check_edit(edit: Any, where: str) -> dict[str, Any]:
    """Schema-check one edit: a registered ``kind`` plus exactly the fields its schema allows."""
    if not isinstance(edit, dict):
        raise FormatError(f"{where}: must be an object with a 'kind', got {edit!r:.60}")
    kind = edit.get("kind")
    if not isinstance(kind, str) or kind not in _EDITS:
        raise FormatError(f"{where}.kind: unknown edit kind {kind!r:.60}",
                          hint=f"known kinds: {edit_kinds()}")
    fields = _EDITS[kind].schema({k: v for k, v in edit.items() if k != "kind"}, where)
    return {"kind": kind, **fields}


def parse_spec(data: Any, where: str = "spec", *, trust: Iterable[str] = ()) -> ModelSpec:
    """Schema-check a spec read from a file (see the module docstring); nothing is imported
    unless ``trust`` allows it."""
    if not isinstance(data, dict):
        raise FormatError(f"{where}: must be an object with a 'name', got {data!r:.60}")
    unknown = sorted(set(data) - {"name", "kwargs", "edits"}, key=str)
    if unknown:
        raise FormatError(f"{where}: unknown field(s) {unknown[:5]!r:.100}")
    name = _NAME(data.get("name"), f"{where}.name")
    kwargs = _kwargs_schema(name, trust, where)(data.get("kwargs", {}), f"{where}.kwargs")
    edits = List(lambda e, w: e, max_len=MAX_EDITS)(data.get("edits", []), f"{where}.edits")
    return ModelSpec(name, kwargs, [check_edit(e, f"{where}.edits[{i}]") for i, e in enumerate(edits)])


def build(spec: ModelSpec) -> nn.Module:
    """Build a checked spec: the factory, then its edits in order; the model carries the spec."""
    model = create_model(spec.name, **spec.kwargs)
    for edit in spec.edits:
        model = _EDITS[edit["kind"]].replay(model, edit)
    set_spec(model, ModelSpec(spec.name, dict(spec.kwargs), [dict(e) for e in spec.edits]))
    return model


def build_from_spec(spec: ModelSpec, *, trust: Iterable[str] = ()) -> nn.Module:
    """Check ``spec`` (as if read from a file) and build it."""
    return build(parse_spec(spec.to_dict(), trust=trust))


StoredTensors = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def build_checked(data: Any, stored: StoredTensors, where: str, *, trust: Iterable[str] = ()
                  ) -> nn.Module:
    """The validated rebuild for loaders: ``data`` is the file's spec, ``stored`` the dtype and
    shape of every tensor the file holds. Any failure is a :class:`FormatError` naming ``where``."""
    spec = parse_spec(data, f"{where}: spec", trust=trust)
    held = sum(math.prod(shape) for _, shape in stored.values())
    _check_counts(spec.kwargs, len(stored), held, f"{where}: spec.kwargs")
    skeleton = _guarded(lambda: _on_meta(spec), where, spec)
    check_stored(skeleton, stored, where)
    return _guarded(lambda: build(spec), where, spec)


def _on_meta(spec: ModelSpec) -> nn.Module:
    # fork_rng: the skeleton must not advance the global RNG (loading stays reproducible).
    with torch.random.fork_rng(), torch.device("meta"):
        return build(spec)


def _guarded(fn: Callable[[], nn.Module], where: str, spec: ModelSpec) -> nn.Module:
    try:
        return fn()
    except FormatError:
        raise
    except (DeepShrinkError, Exception) as exc:
        msg = exc.args[0] if isinstance(exc, DeepShrinkError) else f"{type(exc).__name__}: {exc}"
        raise FormatError(f"{where}: spec {spec.name!r} cannot be built: {str(msg)[:300]}") from exc


def _check_counts(value: Any, n_stored: int, held: int, where: str, key: str = "") -> None:
    """Counts that cost time or memory before any tensor exists (modules even on the meta
    device, label tables in a transformers config) are bounded by what the file stores: layers,
    blocks, experts by its tensors, labels and classes by its elements."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_counts(v, n_stored, held, f"{where}.{k}", str(k))
        return
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        value = sum(value)
    if not isinstance(value, int) or isinstance(value, bool):
        return
    if _COUNT_KEY.fullmatch(key) and value > max(n_stored, 1):
        raise FormatError(f"{where}: {value} layers/blocks but the file stores only {n_stored} tensors")
    if _LABEL_KEY.fullmatch(key) and value > max(held, 1):
        raise FormatError(f"{where}: {value} labels/classes but the file stores only {held} elements")


def check_stored(skeleton: nn.Module, stored: StoredTensors, where: str) -> None:
    """Every stored tensor has the name, shape and dtype the architecture expects; every tensor
    the architecture keeps is stored (tied ones once); the model fits in what the file holds."""
    state = skeleton.state_dict(keep_vars=True)
    for name, (dtype, shape) in stored.items():
        t = state.get(name)
        if t is None:
            raise FormatError(f"{where}: tensor {name!r:.80} is not part of the architecture")
        if tuple(t.shape) != tuple(shape):
            raise FormatError(f"{where}: tensor {name!r:.80} has shape {list(shape)}, the "
                              f"architecture expects {list(t.shape)}")
        if t.dtype != dtype:
            raise FormatError(f"{where}: tensor {name!r:.80} is stored as {dtype}, the "
                              f"architecture expects {t.dtype}")
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    missing = [names[0] for names in groups.values() if not any(n in stored for n in names)]
    if missing:
        raise FormatError(f"{where}: the file lacks tensors the architecture needs: {missing[:5]}")
    held = sum(math.prod(shape) for _, shape in stored.values())
    total = sum(p.numel() for p in skeleton.parameters()) + sum(b.numel() for b in skeleton.buffers())
    if total > held + EXTRA_ELEMENTS:
        raise FormatError(f"{where}: the architecture has {total} elements, far more than the "
                          f"{held} the file holds")


def keep_spec(model: nn.Module) -> None:
    """Attach the spec that rebuilds ``model`` as it is now (a ``from_pretrained`` transformers
    model has none yet). An edit that changes the model's config (channel pruning) calls this
    first, so the file rebuilds the original architecture and replays the edit on it."""
    spec = spec_of(model)
    if spec is not None:
        set_spec(model, spec)


def record_edit(model: nn.Module, edit: dict[str, Any]) -> None:
    """Append a structural edit to the model's spec (see :func:`keep_spec`). Models built
    outside the registry, and not transformers models, keep no spec: they can be saved as
    weights, not rebuilt."""
    keep_spec(model)
    spec = get_spec(model)
    if spec is not None:
        spec.edits.append(edit)


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The spec that rebuilds ``model``: its own, or for a ``transformers`` model, class + config."""
    return get_spec(model) or hf_spec(model)
