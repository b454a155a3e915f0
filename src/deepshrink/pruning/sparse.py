"""Making sparsity pay: fewer bytes on disk and, where measured faster, sparse matmuls.

**Compact storage.** :func:`save_sparse` writes a normal deepshrink safetensors checkpoint in which
each sufficiently sparse Linear/Conv weight is stored in Han et al.'s relative-index form: the
non-zero values (fp32) and, per value, the uint8 gap to the previous non-zero in row-major order;
a gap over 255 is bridged by filler entries (gap 255, value 0). That is 5 bytes per stored entry
against 4 per dense weight, so a layer is packed only when that is smaller (above ~20 % sparsity).
The file's spec records a ``packed_sparse`` edit; :func:`deepshrink.load` replays it, so the file
loads into a model whose packed layers (:class:`PackedLayer`) decode their weight once and compute
exactly what the dense masked model computes. :func:`to_dense_layers` turns them back into
ordinary layers (``pack`` / ``unpack`` are the .dsz container's words, :mod:`deepshrink.dsz`).

**Sparse inference.** :class:`SparseLinear` multiplies with a torch CSR weight. Whether that beats
the dense BLAS matmul depends on shape, batch size, sparsity and machine; :func:`measure_crossover`
times both, and :func:`to_sparse_inference` swaps only layers measured (or known) to be past the
crossover.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.checkpoint import save
from deepshrink.coding.sparse import relative_decode, relative_encode
from deepshrink.errors import FormatError, ModelError
from deepshrink.measure import compare_latency
from deepshrink.modeling import set_submodule
from deepshrink.models import get_spec, record_edit, register_edit
from deepshrink.models.schema import CONV_ARGS, Bool, Int, List, Map, Obj, Str

EDIT_KIND = "packed_sparse"
MAX_GAP = 255  # uint8 relative index
_OPS: dict[type[nn.Module], str] = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d",
                                    nn.Conv3d: "conv3d"}
_CONV_ARGS = ("stride", "padding", "dilation", "groups")


# --- relative-index encoding -------------------------------------------------------------------

def encode_relative(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp32, gaps uint8) of ``w``'s non-zeros in row-major order. ``gaps[i]`` is the
    distance from the previous stored entry (the first counts from position -1); a gap over 255
    is bridged by filler entries (gap 255, value 0), as Han et al. store them.

    The positions are coded by :func:`deepshrink.coding.relative_encode` (8 bits: symbol ``s <
    255`` skips ``s`` zeros then holds a value, 255 skips 255 zeros); a stored gap is ``s + 1``
    for a value and 255 for a filler, which lands every entry on the same position."""
    flat = w.detach().reshape(-1).float()
    pos = torch.nonzero(flat).reshape(-1)
    symbols = torch.from_numpy(relative_encode(pos.numpy(), MAX_GAP.bit_length()))
    filler = symbols == MAX_GAP
    gaps = torch.where(filler, symbols, symbols + 1).to(torch.uint8)
    values = torch.zeros(len(symbols), dtype=torch.float32)
    values[~filler] = flat[pos]
    return values, gaps


def decode_relative(values: torch.Tensor, gaps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The dense tensor back from :func:`encode_relative` (fillers land on zeros)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if len(gaps) and int(gaps.min()) < 1:
        raise ModelError("packed weight: a relative index of 0 (every stored entry advances)")
    g = gaps.long()
    filler = (g == MAX_GAP) & (values == 0)
    symbols = torch.where(filler, g, g - 1).numpy()
    try:
        pos = relative_decode(symbols, MAX_GAP.bit_length(), numel, where="packed weight")
    except FormatError as exc:
        raise ModelError(f"{exc} (shape {list(shape)})") from exc
    out = torch.zeros(numel, dtype=torch.float32)
    out[torch.from_numpy(pos)] = values[~filler].float()
    return out.view(*shape)


def packed_bytes(w: torch.Tensor) -> int:
    """Bytes of ``w`` in relative-index form (5 per stored entry, fillers included)."""
    return 5 * len(encode_relative(w)[0])


# --- the packed layer and its spec edit ---------------------------------------------------------

class _Derived(nn.Module, abc.ABC):
    """A module whose forward uses a tensor derived from its stored state (decoded or assembled
    once, not per call: per-call checks cost more than a small layer's matmul). The derived tensor
    is rebuilt after ``load_state_dict`` and device/dtype moves; after editing the stored tensors
    in place, call :meth:`refresh`."""

    _derived: torch.Tensor | None = None

    @abc.abstractmethod
    def _derive(self) -> torch.Tensor:
        """The tensor forward uses, built from the stored state."""

    def refresh(self) -> torch.Tensor:
        self._derived = self._derive()
        return self._derived

    def derived(self) -> torch.Tensor:
        return self._derived if self._derived is not None else self.refresh()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._derived = None

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        self._derived = None
        return super()._apply(fn, recurse)


class PackedLayer(_Derived):
    """A Linear or Conv layer whose weight is held in relative-index form (what is saved).

    The dense weight is decoded once (see :class:`_Derived`); the output equals the dense layer's
    exactly. ``dense_weight()`` decodes afresh, so :mod:`deepshrink.measure` counts what is stored.
    """

    def __init__(self, op: str, shape: Sequence[int], entries: int, bias: bool,
                 conv: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.op, self.shape, self.conv = op, tuple(int(s) for s in shape), dict(conv or {})
        self.register_buffer("weight_values", torch.zeros(entries, dtype=torch.float32))
        self.register_buffer("weight_gaps", torch.zeros(entries, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(self.shape[0])) if bias else None

    @classmethod
    def from_layer(cls, layer: nn.Module) -> PackedLayer:
        op = _OPS.get(type(layer))
        if op is None:
            raise ModelError(f"cannot pack a {type(layer).__name__}; only {sorted(_OPS.values())}")
        conv = {k: _plain(getattr(layer, k)) for k in _CONV_ARGS} if op != "linear" else {}
        if op != "linear" and layer.padding_mode != "zeros":
            raise ModelError(f"cannot pack a conv with padding_mode={layer.padding_mode!r}")
        values, gaps = encode_relative(layer.weight)
        m = cls(op, layer.weight.shape, len(values), layer.bias is not None, conv)
        with torch.no_grad():
            m.weight_values.copy_(values)
            m.weight_gaps.copy_(gaps)
            if layer.bias is not None:
                m.bias.copy_(layer.bias)
        return m

    def describe(self) -> dict[str, Any]:
        """The spec-edit entry that rebuilds this layer's (empty) storage on load."""
        return {"op": self.op, "shape": list(self.shape), "entries": len(self.weight_values),
                "bias": self.bias is not None, "conv": self.conv}

    def dense_weight(self) -> torch.Tensor:
        return decode_relative(self.weight_values, self.weight_gaps, self.shape)

    def _derive(self) -> torch.Tensor:
        return self.dense_weight()

    def to_dense_layer(self) -> nn.Module:
        w = self.dense_weight()
        if self.op == "linear":
            layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=self.bias is not None)
        else:
            cls = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[self.op]
            groups = int(self.conv.get("groups", 1))
            layer = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), bias=self.bias is not None,
                        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in self.conv.items()})
        with torch.no_grad():
            layer.weight.copy_(w)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.derived()
        if self.op == "linear":
            return F.linear(x, w, self.bias)
        conv = getattr(F, self.op)
        return conv(x, w, self.bias, **{k: (tuple(v) if isinstance(v, list) else v)
                                        for k, v in self.conv.items()})

    def extra_repr(self) -> str:
        return f"{self.op}, shape={list(self.shape)}, entries={len(self.weight_values)}"


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


PACKED_SCHEMA = Obj({"layers": Map(Obj(
    {"op": Str(choices=tuple(_OPS.values())), "shape": List(Int(0, 1 << 31), min_len=2, max_len=5),
     "entries": Int(0, 1 << 40), "bias": Bool()}, optional={"conv": CONV_ARGS}))})


@register_edit(EDIT_KIND, schema=PACKED_SCHEMA)
def _replay_packed(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    """On load: give each recorded layer packed storage of the recorded size."""
    for name, d in edit.get("layers", {}).items():
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise ModelError(f"{EDIT_KIND} edit names layer {name!r}, which the model lacks") from exc
        set_submodule(model, name, PackedLayer(d["op"], d["shape"], int(d["entries"]), bool(d["bias"]),
                                             d.get("conv")))
    return model


def to_packed_layers(model: nn.Module, *, min_saving: float = 0.0) -> nn.Module:
    """A copy of ``model`` with every Linear/Conv weight that is smaller in relative-index form
    (by more than ``min_saving`` of its dense bytes) replaced by a :class:`PackedLayer`, and the
    ``packed_sparse`` edit recorded in its spec."""
    if get_spec(model) is None:
        raise ModelError(f"{type(model).__name__} has no deepshrink spec, so its packed file could not "
                         "be rebuilt", hint="build the model with deepshrink.create_model")
    packed = copy.deepcopy(model)
    layers: dict[str, dict[str, Any]] = {}
    for name, m in list(packed.named_modules()):
        if type(m) in _OPS and name and getattr(m, "padding_mode", "zeros") == "zeros":
            dense = 4 * m.weight.numel()
            if packed_bytes(m.weight) < (1.0 - min_saving) * dense:
                p = PackedLayer.from_layer(m)
                set_submodule(packed, name, p)
                layers[name] = p.describe()
    record_edit(packed, {"kind": EDIT_KIND, "layers": layers})
    return packed


def to_dense_layers(model: nn.Module) -> nn.Module:
    """Replace packed layers by ordinary dense layers (in place) and drop the edit from the spec."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PackedLayer):
            set_submodule(model, name, m.to_dense_layer())
    spec = get_spec(model)
    if spec is not None:
        spec.edits[:] = [e for e in spec.edits if e.get("kind") != EDIT_KIND]
    return model


def save_sparse(model: nn.Module, path: str | Path, *, extra: dict[str, Any] | None = None,
                protect: tuple[str | Path, ...] = ()) -> Path:
    """Write ``model`` with its sparse weights packed (see the module docstring); the model itself
    is not changed. Load with :func:`deepshrink.load`. Returns the path."""
    from deepshrink.fileio import atomic_path

    packed = to_packed_layers(model)
    path = Path(path)
    with atomic_path(path, protect=protect) as tmp:
        save(packed, tmp, extra=extra)
    return path


# --- sparse matmul inference --------------------------------------------------------------------

class SparseLinear(_Derived):
    """``y = x W^T + b`` with ``W`` in torch CSR form, for inference. The CSR arrays are ordinary
    buffers (so the module measures and serializes), assembled into a sparse tensor once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            csr = weight.detach().float().to_sparse_csr()
        # int32 indices: measured ~20 % faster than int64 in torch's CPU sparse kernels.
        idx = torch.int32 if csr.values().numel() < 2**31 - 1 else torch.int64
        self.register_buffer("crow_indices", csr.crow_indices().to(idx))
        self.register_buffer("col_indices", csr.col_indices().to(idx))
        self.register_buffer("values", csr.values().clone())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_layer(cls, layer: nn.Module) -> SparseLinear:
        w = layer.dense_weight() if isinstance(layer, PackedLayer) else layer.weight
        return cls(w, layer.bias)

    def _derive(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                           (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        return self._derive().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.derived()
        if x.dim() == 2 and x.shape[0] == 1:  # batch 1: sparse matrix-vector, measured fastest
            y = torch.mv(w, x[0]) if self.bias is None else torch.addmv(self.bias, w, x[0])
            return y.unsqueeze(0)
        lead = x.shape[:-1]
        y = torch.sparse.mm(w, x.reshape(-1, self.in_features).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def count_macs(self, output: torch.Tensor) -> int:
        """MACs actually performed: one per stored non-zero per output row (torch's FLOP counter
        does not see sparse kernels, so deepshrink.measure asks the module)."""
        return self.values.numel() * (output.numel() // self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nnz={self.values.numel()}"


def _random_sparse(shape: tuple[int, int], sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen)
    k = round(sparsity * w.numel())
    idx = torch.randperm(w.numel(), generator=gen)[:k]
    w.view(-1)[idx] = 0.0
    return w


def _time_pair(weight: torch.Tensor, bias: torch.Tensor | None, batch: int,
               latency_kw: dict[str, Any]) -> tuple[float, float]:
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    sparse = SparseLinear(weight, bias)
    x = torch.randn(batch, weight.shape[1])
    lat = compare_latency({"dense": dense, "sparse": sparse}, x, **latency_kw)
    return lat["dense"].median_ms, lat["sparse"].median_ms


@dataclasses.dataclass
class Crossover:
    """Dense vs CSR timings per (shape, batch, sparsity) and the crossover per (shape, batch): the
    lowest tried sparsity from which on sparse was faster at every higher tried sparsity too
    (``None``: never)."""

    rows: list[dict[str, Any]]
    crossover: dict[str, float | None]
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _key(out_f: int, in_f: int, batch: int) -> str:
    return f"{out_f}x{in_f}@b{batch}"


def measure_crossover(shapes: Sequence[tuple[int, int]], batches: Sequence[int] = (1, 256),
                      sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98), *,
                      seed: int = 0, latency_kw: dict[str, Any] | None = None) -> Crossover:
    """Time dense ``F.linear`` against :class:`SparseLinear` on random weights of each
    ``(out, in)`` shape, batch size and sparsity, interleaved (one run per pair)."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"rounds": 3, **(latency_kw or {})}
    rows, cross = [], {}
    for out_f, in_f in shapes:
        for b in batches:
            wins = []
            for s in sparsities:
                w = _random_sparse((out_f, in_f), s, gen)
                d_ms, s_ms = _time_pair(w, torch.zeros(out_f), b, kw)
                rows.append({"shape": [out_f, in_f], "batch": b, "sparsity": s, "dense_ms": d_ms,
                             "sparse_ms": s_ms, "speedup": d_ms / s_ms})
                wins.append(s_ms < d_ms)
            c = None
            for i in range(len(sparsities) - 1, -1, -1):
                if not wins[i]:
                    break
                c = sparsities[i]
            cross[_key(out_f, in_f, b)] = c
    return Crossover(rows, cross, torch.get_num_threads())


def _linear_weight(m: nn.Module) -> torch.Tensor | None:
    if isinstance(m, nn.Linear):
        return m.weight.detach()
    if isinstance(m, PackedLayer) and m.op == "linear":
        return m.dense_weight()
    return None


def sparse_inference_plan(model: nn.Module, *, batch_size: int = 1, min_sparsity: float | None = None,
                          latency_kw: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per Linear layer: its sparsity and whether to swap it. With ``min_sparsity`` the rule is
    ``sparsity >= min_sparsity``; without, each layer's own weights are timed dense vs sparse at
    ``batch_size`` and the layer is swapped only if sparse was faster."""
    plan: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        w = _linear_weight(m)
        if w is None or not name:
            continue
        sp = 1.0 - int(torch.count_nonzero(w)) / w.numel()
        entry: dict[str, Any] = {"shape": list(w.shape), "sparsity": sp}
        if min_sparsity is not None:
            entry["swap"] = sp >= min_sparsity
        else:
            d_ms, s_ms = _time_pair(w, m.bias, batch_size, {"rounds": 3, **(latency_kw or {})})
            entry.update(batch=batch_size, dense_ms=d_ms, sparse_ms=s_ms, swap=s_ms < d_ms)
        plan[name] = entry
    return plan


def to_sparse_inference(model: nn.Module, *, min_sparsity: float | None = None, batch_size: int = 1,
                        plan: dict[str, dict[str, Any]] | None = None) -> nn.Module:
    """Swap Linear layers for :class:`SparseLinear` in place where the plan (given, or made by
    :func:`sparse_inference_plan`) says sparse is faster. Returns the model; the plan used is kept
    as ``model.deepshrink_sparse_plan``."""
    plan = plan if plan is not None else sparse_inference_plan(model, batch_size=batch_size,
                                                               min_sparsity=min_sparsity)
    for name, entry in plan.items():
        if entry["swap"]:
            set_submodule(model, name, SparseLinear.from_layer(model.get_submodule(name)))
    object.__setattr__(model, "deepshrink_sparse_plan", plan)
    return model
