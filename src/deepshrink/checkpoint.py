"""Checkpoints: safetensors files whose metadata records the architecture, and :func:`load`,
which rebuilds any model deepshrink wrote without unpickling or running anything the file names.

The metadata key ``deepshrink`` holds ``{"format", "version", "spec", "extra", "digest"}``.
``digest`` is a SHA-256 over the tensor table and all tensor bytes: :func:`load` verifies it, so a
flipped data byte is an error instead of a silently different model (files written before the
digest existed load with a warning). The spec is rebuilt by
:func:`deepshrink.models.spec.build_checked`, which only allows registered models, ``transformers``
classes, and code the caller trusts (``load(path, trust=["mypkg.models"])``).

Other formats (.dsz) register a loader with :func:`register_loader` where they are defined;
:func:`load` picks one by sniffing the file's first bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from deepshrink.errors import FormatError, ModelError, OutputError
from deepshrink.fileio import atomic_path
from deepshrink.models import ModelSpec, build_checked, spec_of
from deepshrink.models.hf import is_pretrained_dir, load_pretrained_dir

META_KEY = "deepshrink"
FORMAT_VERSION = 2  # 2: with a digest (required); 1: written before the digest existed
MAX_HEADER = 100 << 20  # safetensors' own limit
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

Sniffer = Callable[[bytes, Path], bool]
Loader = Callable[..., nn.Module]  # loader(path, model=None, trust=()) -> nn.Module
_LOADERS: list[tuple[str, Sniffer, Loader]] = []


def register_loader(name: str, sniff: Sniffer, loader: Loader) -> None:
    """Add a file format to :func:`load`. ``sniff(first_16_bytes, path)`` says if it applies;
    ``loader(path, model=None, trust=())`` rebuilds the model (see :func:`load`)."""
    _LOADERS[:] = [entry for entry in _LOADERS if entry[0] != name]
    _LOADERS.append((name, sniff, loader))


def save(model: nn.Module, path: str | Path, *, extra: dict[str, Any] | None = None,
         spec: ModelSpec | None = None, weights_only: bool = False,
         protect: tuple[str | Path, ...] = ()) -> Path:
    """Write ``model``'s weights to a safetensors file (atomically) with its architecture spec
    and a digest of its tensors. Tied weights are stored once. ``extra`` is free JSON metadata.

    Models built by deepshrink and ``transformers`` models are recorded so that :func:`load`
    rebuilds them; any other model needs ``weights_only=True`` (then load it with
    ``load(path, model=...)``). ``protect`` lists inputs the file must never replace.
    """
    path = Path(path)
    spec = spec or spec_of(model)
    if spec is None and not weights_only:
        raise ModelError(f"{type(model).__name__} has no architecture spec, so {path.name} could not "
                         "be loaded without your code",
                         hint="build it with deepshrink.create_model (or register_model), or pass "
                              "weights_only=True and load it with load(path, model=...)")
    meta: dict[str, Any] = {"format": "deepshrink-checkpoint", "version": FORMAT_VERSION,
                            "spec": spec.to_dict() if spec is not None else None,
                            "extra": extra or {}}
    with atomic_path(path, protect=protect) as tmp:
        try:
            save_model(model, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        except SafetensorError as exc:  # e.g. a full disk, reported by the Rust writer
            raise OutputError(f"{path}: cannot write: {exc}") from exc
        _add_digest(tmp, meta)
    return path


def _add_digest(path: Path, meta: dict[str, Any]) -> None:
    """Rewrite the header of a just-written file with the digest of its tensors and metadata."""
    blob = path.read_bytes()
    header, data_off = _parse_header(blob[:8], lambda n: blob[8:8 + n], len(blob), path)
    meta["digest"] = _digest(header, meta, [blob[data_off:]])
    header["__metadata__"] = {**header.get("__metadata__", {}), META_KEY: json.dumps(meta, sort_keys=True)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[data_off:])


def _digest(header: dict[str, Any], meta: dict[str, Any], chunks: Iterable[bytes]) -> str:
    """SHA-256 over the tensor table, the deepshrink metadata (spec, extra; not the digest) and
    the tensor bytes: a changed spec is as much a corruption as a changed weight."""
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    own = {k: v for k, v in meta.items() if k != "digest"}
    h = hashlib.sha256(json.dumps([table, own], sort_keys=True).encode())
    for chunk in chunks:
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def _parse_header(head: bytes, read: Callable[[int], bytes], size: int, path: Path
                  ) -> tuple[dict[str, Any], int]:
    """The safetensors header (validated tensor table) and the offset where data starts."""
    if len(head) < 8:
        raise FormatError(f"{path}: truncated at offset {len(head)} (no safetensors header length)")
    (n,) = struct.unpack("<Q", head)
    if n + 8 > size or n > MAX_HEADER:
        raise FormatError(f"{path}: header length {n} at offset 0 runs past the file end ({size} bytes)")
    try:
        header = json.loads(read(n).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: safetensors header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    _check_table(header, size - 8 - n, path)
    return header, 8 + n


def _no_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def _check_table(header: dict[str, Any], data_len: int, path: Path) -> None:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: header __metadata__ must map names to strings")
    end = 0
    for name, e in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r:.80}"
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str) or e["dtype"] not in ST_DTYPES:
            raise FormatError(f"{where}: dtype must be one of {sorted(ST_DTYPES)}")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_nat(d) for d in shape)):
            raise FormatError(f"{where}: shape must be a list of at most 8 non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_nat(o) for o in offs)
                and offs[0] <= offs[1] <= data_len):
            raise FormatError(f"{where}: data_offsets must lie within the {data_len}-byte data area")
        itemsize = torch.empty(0, dtype=ST_DTYPES[e["dtype"]]).element_size()
        if math.prod(shape) * itemsize != offs[1] - offs[0]:
            raise FormatError(f"{where}: shape {shape} does not match its {offs[1] - offs[0]} bytes")
        end = max(end, offs[1])
    if end != data_len:
        raise FormatError(f"{path}: tensors cover {end} of the {data_len} data bytes")


def _nat(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 48


def _read_file_header(path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    with path.open("rb") as f:
        return _parse_header(f.read(8), f.read, size, path)


def _meta(header: dict[str, Any], path: Path) -> dict[str, Any]:
    raw = header.get("__metadata__", {}).get(META_KEY)
    if raw is None:
        return {"format": "safetensors", "spec": None, "extra": {}}
    try:
        meta = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: metadata key {META_KEY!r} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: metadata key {META_KEY!r} is not a JSON object")
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The deepshrink metadata of a safetensors checkpoint (validated, never unpickled)."""
    path = Path(path)
    return _meta(_read_file_header(path)[0], path)


def _verify_digest(path: Path, header: dict[str, Any], data_off: int, meta: dict[str, Any]) -> None:
    if META_KEY not in header.get("__metadata__", {}):
        return  # a plain safetensors file: nothing of ours to verify
    want = meta.get("digest")
    if meta.get("version") not in (1, FORMAT_VERSION):
        raise FormatError(f"{path}: checkpoint version {meta.get('version')!r:.20} is not supported "
                          f"(this reader knows 1 and {FORMAT_VERSION})")
    if want is None:
        # Only a version-1 file (written before digests existed) may lack one; any other field
        # damaged on the way (format, version, the key itself) must not switch verification off.
        if meta.get("version") != 1 or meta.get("format") != "deepshrink-checkpoint":
            raise FormatError(f"{path}: the metadata has no digest (required since version 2)")
        warnings.warn(f"{path}: written without a tensor digest (an older deepshrink); "
                      "corrupted tensor bytes cannot be detected", stacklevel=3)
        return
    with path.open("rb") as f:
        f.seek(data_off)
        got = _digest(header, meta, iter(lambda: f.read(1 << 20), b""))
    if got != want:
        raise FormatError(f"{path}: tensor digest mismatch (the tensor data or table was changed "
                          "after writing)", hint="the file is corrupt; re-create it")


def load_safetensors(path: Path, model: nn.Module | None = None, *, trust: Iterable[str] = ()
                     ) -> nn.Module:
    header, data_off = _read_file_header(path)
    meta = _meta(header, path)
    _verify_digest(path, header, data_off, meta)
    if model is None:
        if not meta.get("spec"):
            raise ModelError(f"{path} has no architecture spec",
                             hint="pass model=... to load weights into it")
        stored = {k: (ST_DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in header.items()
                  if k != "__metadata__"}
        model = build_checked(meta["spec"], stored, str(path), trust=trust)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise FormatError(f"{path}: cannot read tensors: {str(exc)[:300]}") from exc
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


def _is_torch_save(head: bytes, path: Path) -> bool:
    return head[:4] == b"PK\x03\x04"  # torch.save's zip container


def load_state_dict_file(path: Path, model: nn.Module | None = None, *, trust: Iterable[str] = ()
                         ) -> nn.Module:
    """Weights saved with ``torch.save(model.state_dict(), path)`` into ``model``. Read with
    torch's restricted ``weights_only`` loader (tensors and plain containers, no code)."""
    if model is None:
        raise ModelError(f"{path} is a state_dict file: it holds weights, not an architecture",
                         hint="pass model=... (on the command line: --arch NAME or module:callable, "
                              "with --arch-arg NAME=VALUE for its arguments)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError for refused or bad files
        raise FormatError(f"{path}: not a readable weights-only torch file: {str(exc)[:200]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # the common {"state_dict": ..., "epoch": ...} training checkpoint
    if not (isinstance(sd, dict) and sd and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in sd.items())):
        raise FormatError(f"{path}: expected a dict of name -> tensor (a state_dict)")
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected or shapes:
        raise ModelError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shapes file vs model {shapes[:3]})")
    model.load_state_dict(sd)
    return model.eval()


register_loader("torch-state-dict", _is_torch_save, load_state_dict_file)


def load(path: str | Path, model: nn.Module | None = None, *, trust: Iterable[str] = ()) -> nn.Module:
    """Rebuild a model from any file deepshrink wrote (safetensors checkpoint, .dsz, .onnx), a
    `transformers` ``save_pretrained`` folder, or a ``torch.save`` state_dict (with ``model``).

    With ``model``, only its weights are read from the file. ``trust`` lists module-name
    prefixes whose ``module:callable`` architectures the file may name (default: none, only
    registered models and ``transformers`` classes)."""
    path = Path(path)
    if is_pretrained_dir(path):
        return load_pretrained_dir(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file" if not path.is_dir() else
                          f"{path}: a folder without config.json (not a save_pretrained folder)")
    trust = tuple(trust) if not isinstance(trust, str) else (trust,)
    with path.open("rb") as f:
        head = f.read(16)
    for _name, sniff, loader in _LOADERS:
        if sniff(head, path):
            return loader(path, model=model, trust=trust)
    raise FormatError(f"{path}: unknown model file format (first bytes {head[:8]!r})")
