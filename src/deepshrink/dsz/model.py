"""Models in and out of .dsz files: :func:`pack`, :func:`read_dsz`, :func:`load_dsz`, :func:`unpack`.

:func:`pack` stores every tensor of the state dict (shared ones as codebook + coded indices) and
the architecture spec, so :func:`load_dsz` (also reached through ``deepshrink.load``) rebuilds a
working module. Loading re-attaches the sharing state, so a loaded model can be fine-tuned or
packed again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.checkpoint import register_loader, save
from deepshrink.coding.codebook import SharedTensor, get_sharing, set_sharing
from deepshrink.dsz.codec import Encoded, PackConfig, decode_tensor, encode_tensor, record_numel
from deepshrink.dsz.format import MAGIC, VERSION, Container, read_container, write_container
from deepshrink.errors import FormatError, ModelError
from deepshrink.fileio import atomic_path
from deepshrink.models import build_checked, spec_of

MAX_ELEMENTS = 1 << 31
# A hostile file could declare a huge tensor that a zero-bit code "fills"; the reader refuses to
# materialise more than this many elements per byte of file. Real files hold about 12 weights
# per byte (LeNet after pruning + 5-bit sharing + Huffman, bench/results/*.dsz); decoding costs
# ~50 bytes of memory per element, so 64 keeps a hostile file under ~3 KB of memory per byte.
ELEMENTS_PER_BYTE = 64


@dataclasses.dataclass
class PackReport:
    """What :func:`pack` wrote: file bytes and per-tensor/per-stream coding statistics."""

    path: str
    bytes: int
    tensors: list[dict[str, Any]]

    def entropy_summary(self) -> dict[str, float]:
        """Totals over all Huffman/fixed symbol streams: coded payload bits, their empirical
        entropy bound, and stream overhead (headers, code tables, lane offsets, padding)."""
        payload = sum(s["payload_bits"] for t in self.tensors for s in t["streams"].values())
        overhead = sum(s["overhead_bits"] for t in self.tensors for s in t["streams"].values())
        entropy = sum(s["entropy_bits"] for t in self.tensors for s in t["streams"].values())
        return {"payload_bits": payload, "overhead_bits": overhead, "entropy_bits": entropy,
                "payload_over_entropy": payload / entropy if entropy else 1.0,
                "total_over_entropy_plus_tables": (payload + overhead) / (entropy + overhead)
                if entropy + overhead else 1.0}

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "tensors": self.tensors,
                "entropy": self.entropy_summary()}


def pack(model: nn.Module, path: str | Path, config: PackConfig | None = None, *,
         extra: dict[str, Any] | None = None, protect: tuple[str | Path, ...] = ()) -> PackReport:
    """Write ``model`` to a .dsz file (atomically). Shared tensors are stored as codebook +
    entropy-coded cluster indices, other tensors raw (sparse when that is smaller)."""
    cfg = config or PackConfig()
    sharing = get_sharing(model)
    state = model.state_dict()
    records: list[dict[str, Any]] = []
    sections: list[tuple[bytes, str]] = []
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    total = 0
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:  # tied weights: stored once
            records.append({"name": name, "alias": seen[key]})
            continue
        seen[key] = name
        enc: Encoded = encode_tensor(name, t, sharing.get(name), cfg, len(sections))
        records.append(enc.record)
        sections.extend(enc.sections)
        total += t.numel()
        rows.append({"name": name, "shape": list(t.shape), "index": enc.record["index"]["kind"],
                     "values": enc.record["values"]["kind"], "bytes": enc.nbytes,
                     "streams": {k: v.to_dict() for k, v in enc.streams.items()}})
    spec = spec_of(model)
    manifest = {"format": "deepshrink-dsz", "version": VERSION,
                "spec": spec.to_dict() if spec is not None else None,
                "extra": extra or {}, "tensors": records}
    approx = sum(len(d) for d, _ in sections) + 64
    if total > ELEMENTS_PER_BYTE * approx:
        raise ModelError(f"{total} elements in about {approx} bytes exceeds the .dsz limit of "
                         f"{ELEMENTS_PER_BYTE} elements per byte", hint="store fewer, denser tensors")
    size = write_container(path, manifest, sections, protect=protect)
    return PackReport(str(path), size, rows)


@dataclasses.dataclass
class DszContents:
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    sharing: dict[str, SharedTensor]
    size: int
    data_offset: int


def read_dsz(source: str | Path | bytes, *, max_elements: int = MAX_ELEMENTS) -> DszContents:
    """Decode every tensor of a .dsz file (path or bytes), validating all of it first.

    Raises :class:`FormatError` (and nothing else) for any corrupt, truncated or hostile input.
    """
    c = read_container(source)
    records = c.manifest.get("tensors")
    if not isinstance(records, list):
        raise FormatError(f"{c.where}: manifest 'tensors' must be a list")
    budget = min(max_elements, ELEMENTS_PER_BYTE * c.size)
    total, names = 0, set()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            raise FormatError(f"{c.where}: tensors[{i}] must be an object with a string 'name'")
        if rec["name"] in names:
            raise FormatError(f"{c.where}: tensors[{i}] repeats the name {rec['name']!r:.80}")
        names.add(rec["name"])
        total += record_numel(rec, f"{c.where}: tensors[{i}] ({rec['name']:.80})")
        if total > budget:
            raise FormatError(f"{c.where}: tensors declare {total}+ elements, more than this "
                              f"{c.size}-byte file may hold ({budget})")
    tensors: dict[str, torch.Tensor] = {}
    sharing: dict[str, SharedTensor] = {}
    for i, rec in enumerate(records):
        where = f"tensors[{i}] ({rec['name']:.80})"
        if "alias" in rec:
            target = rec["alias"]
            if not isinstance(target, str) or target not in tensors:
                raise FormatError(f"{c.where}: {where} aliases {target!r:.80}, not an earlier tensor")
            tensors[rec["name"]] = tensors[target]
            continue
        t, st = _decode(rec, c, where)
        tensors[rec["name"]] = t
        if st is not None:
            sharing[rec["name"]] = st
    return DszContents(c.manifest, tensors, sharing, c.size, c.data_offset)


def _decode(rec: dict[str, Any], c: Container, where: str) -> tuple[torch.Tensor, SharedTensor | None]:
    try:
        return decode_tensor(rec, c, where)
    except FormatError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError) as exc:
        # A validation gap must still surface as our error, never as a crash of the caller.
        raise FormatError(f"{c.where}: {where}: malformed tensor record: {exc}") from exc


def load_dsz(path: str | Path, model: nn.Module | None = None, *, trust: tuple[str, ...] = ()
             ) -> nn.Module:
    """Rebuild the model stored in a .dsz file (or load its weights into ``model``).

    The spec is checked by :func:`deepshrink.models.build_checked`: only registered models,
    ``transformers`` classes and ``module:callable`` names under a ``trust`` prefix are built.
    """
    contents = read_dsz(path)
    if model is None:
        spec_d = contents.manifest.get("spec")
        if not spec_d:
            raise ModelError(f"{path} has no architecture spec", hint="pass model=... to load into it")
        stored = {k: (t.dtype, tuple(t.shape)) for k, t in contents.tensors.items()}
        model = build_checked(spec_d, stored, str(path), trust=trust)
    try:
        model.load_state_dict(contents.tensors, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not match the architecture: {str(exc)[:300]}") from exc
    if contents.sharing:
        set_sharing(model, contents.sharing)
    model.eval()
    return model


def unpack(path: str | Path, output: str | Path) -> Path:
    """Decode a .dsz file into an fp32 safetensors checkpoint (rebuildable if it has a spec)."""
    from safetensors.torch import save_file

    contents = read_dsz(path)
    if contents.manifest.get("spec"):
        return save(load_dsz(path), output, extra={"unpacked_from": Path(path).name}, protect=(path,))
    with atomic_path(output, protect=(path,)) as tmp:
        save_file({k: v.contiguous() for k, v in contents.tensors.items()}, str(tmp))
    return Path(output)


def dsz_info(path: str | Path) -> dict[str, Any]:
    """Manifest summary and the sections table of a .dsz file (checksums verified and every
    tensor decoded, so a corrupt payload is an error here too)."""
    contents = read_dsz(path)
    m = contents.manifest
    if not all(isinstance(m.get(k), (dict, type(None))) for k in ("spec", "extra")):
        raise FormatError(f"{path}: manifest 'spec' and 'extra' must be objects or null")
    tensors = []
    for rec in m["tensors"]:
        secs = _section_ids(rec)
        tensors.append({"name": rec.get("name"), "shape": rec.get("shape"), "dtype": rec.get("dtype"),
                        "index": (rec.get("index") or {}).get("kind", "alias" if "alias" in rec else "?"),
                        "values": (rec.get("values") or {}).get("kind", "-"),
                        "bytes": sum(m["sections"][s]["length"] for s in secs
                                     if isinstance(s, int) and 0 <= s < len(m["sections"]))})
    return {"path": str(path), "bytes": contents.size, "version": m.get("version"),
            "spec": m.get("spec"), "extra": m.get("extra"), "verified": True,
            "manifest_bytes": contents.data_offset - 28,
            "sections": [{"section": i, **s} for i, s in enumerate(m["sections"])], "tensors": tensors}


def _section_ids(rec: dict[str, Any]) -> list[Any]:
    out = []
    for part in ("index", "values"):
        d = rec.get(part) or {}
        out += [d[k] for k in ("stream", "counts", "cols", "data", "codebook", "symbols") if k in d]
    return out


def _sniff(head: bytes, path: Path) -> bool:
    return head[: len(MAGIC)] == MAGIC


register_loader("dsz", _sniff, load_dsz)
