"""Checkpoints: safetensors files whose metadata records the architecture, and :func:`load`,
which rebuilds any model deepshrink wrote without unpickling anything.

Other formats (.dsz, .onnx) register a loader with :func:`register_loader`; :func:`load` picks
one by sniffing the file's first bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from deepshrink.errors import FormatError, ModelError
from deepshrink.fileio import atomic_path
from deepshrink.models import ModelSpec, build_from_spec, get_spec
from deepshrink.models.registry import require_safe_spec

META_KEY = "deepshrink"
FORMAT_VERSION = 1

Sniffer = Callable[[bytes, Path], bool]
Loader = Callable[[Path], nn.Module]
_LOADERS: list[tuple[str, Sniffer, Loader]] = []


def register_loader(name: str, sniff: Sniffer, loader: Loader) -> None:
    """Add a file format to :func:`load`. ``sniff(first_16_bytes, path)`` says if it applies."""
    _LOADERS[:] = [entry for entry in _LOADERS if entry[0] != name]
    _LOADERS.append((name, sniff, loader))


def save(model: nn.Module, path: str | Path, *, extra: dict[str, Any] | None = None,
         spec: ModelSpec | None = None) -> Path:
    """Write ``model``'s weights to a safetensors file (atomically) with its architecture spec.

    Tied weights are stored once. ``extra`` is free JSON metadata (e.g. training results).
    """
    path = Path(path)
    spec = spec or get_spec(model)
    meta: dict[str, Any] = {
        "format": "deepshrink-checkpoint",
        "version": FORMAT_VERSION,
        "spec": spec.to_dict() if spec is not None else None,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The deepshrink metadata of a safetensors checkpoint (validated, never unpickled)."""
    path = Path(path)
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as exc:  # safetensors raises its own (non-OSError) error types
        raise FormatError(f"{path}: not a valid safetensors file: {exc}") from exc
    if raw is None:
        return {"format": "safetensors", "spec": None, "extra": {}}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: metadata key {META_KEY!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: metadata key {META_KEY!r} is not a JSON object")
    return meta


def _check_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise FormatError(f"{path}: truncated at offset {len(head)} (no safetensors header length)")
    (n,) = struct.unpack("<Q", head)
    if n + 8 > size:
        raise FormatError(f"{path}: header length {n} at offset 0 runs past the file end ({size} bytes)")


def load_safetensors(path: Path, model: nn.Module | None = None) -> nn.Module:
    meta = read_metadata(path)
    if model is None:
        if not meta.get("spec"):
            raise ModelError(
                f"{path} has no architecture spec", hint="pass model=... to load weights into it"
            )
        spec = ModelSpec.from_dict(meta["spec"])
        require_safe_spec(spec, str(path))
        model = build_from_spec(spec)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise FormatError(f"{path}: cannot read tensors: {exc}") from exc
    if missing or unexpected:
        raise ModelError(
            f"{path}: weights do not match the architecture "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.eval()
    return model


def _is_safetensors(head: bytes, path: Path) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


register_loader("safetensors", _is_safetensors, load_safetensors)


def _ensure_format_plugins() -> None:
    # The .dsz loader registers itself on import; imported lazily (it imports this module).
    import deepshrink.sharing  # noqa: F401


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model from any file deepshrink wrote (safetensors checkpoint, .dsz, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(16)
    if model is not None and _is_safetensors(head, path):
        return load_safetensors(path, model)
    _ensure_format_plugins()
    for _name, sniff, loader in _LOADERS:
        if sniff(head, path):
            return loader(path)
    raise FormatError(f"{path}: unknown model file format (first bytes {head[:8]!r})")
