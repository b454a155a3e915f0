"""How one tensor becomes .dsz sections, and back.

A tensor record in the manifest::

    {"name": "2.weight", "shape": [300, 784], "dtype": "float32",
     "index":  {"kind": "dense"}
             | {"kind": "relative", "order": "C"|"F", "bits": b, "nnz": n, "stream": s}
             | {"kind": "csr", "order": "C"|"F", "nnz": n, "counts": s, "cols": s},
     "values": {"kind": "raw", "data": s}
             | {"kind": "shared", "k": k, "cb_dtype": "float32"|"float16", "codebook": s,
                "symbols": s}}

(or ``{"name": ..., "alias": other_name}`` for a tied tensor). ``s`` are section numbers.
*index* says which positions are stored (all, or the non-zeros in scan order, see
:mod:`deepshrink.coding.sparse`); *values* says what is stored there: raw element bytes, or
cluster indices into a codebook (with ``dense`` indexing, symbol ``k`` means "pruned zero").
Every symbol stream is a :func:`deepshrink.coding.huffman.encode_stream` section, Huffman or
fixed-width. The writer tries the index codings and keeps the smallest per tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from deepshrink.coding.codebook import SharedTensor
from deepshrink.coding.huffman import MAX_LEN, StreamInfo, decode_stream, encode_stream
from deepshrink.coding.sparse import (
    csr_decode,
    csr_encode,
    from_scan,
    relative_decode,
    relative_encode,
    scan_shape,
    to_scan,
)
from deepshrink.config import Config, check
from deepshrink.dsz.format import Container
from deepshrink.errors import FormatError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 8
MAX_CLUSTERS = 1 << 16
REL_BITS = range(1, 13)


@dataclasses.dataclass
class PackConfig(Config):
    """How :func:`deepshrink.dsz.pack` codes tensors.

    ``entropy``: "huffman" (canonical Huffman per stream) or "fixed" (fixed-width bit packing,
    e.g. to show what entropy coding adds). ``index``: "auto" keeps the smallest of dense /
    relative / CSR per tensor. ``order``: scan order ("auto" tries C and F). ``rel_bits``: the
    relative-index width (None: the best in 1..12). ``codebook_dtype``: how centroids are stored
    (float16 halves the codebooks but then the loaded weights differ from the shared ones by the
    fp16 rounding). ``sparse_raw``: store only the non-zeros of unshared float tensors when that
    is smaller.
    """

    entropy: str = "huffman"
    index: str = "auto"
    order: str = "auto"
    rel_bits: int | None = None
    codebook_dtype: str = "float32"
    sparse_raw: bool = True
    block: int = 4096

    def validate(self) -> None:
        n = type(self).__name__
        check(self.entropy in ("huffman", "fixed"), n, "entropy",
              f"must be 'huffman' or 'fixed', got {self.entropy!r}")
        check(self.index in ("auto", "dense", "relative", "csr"), n, "index",
              f"must be auto, dense, relative or csr, got {self.index!r}")
        check(self.order in ("auto", "C", "F"), n, "order", f"must be auto, C or F, got {self.order!r}")
        check(self.rel_bits is None or self.rel_bits in REL_BITS, n, "rel_bits",
              f"must be None or in [1, 12], got {self.rel_bits!r}")
        check(self.codebook_dtype in ("float32", "float16"), n, "codebook_dtype",
              f"must be float32 or float16, got {self.codebook_dtype!r}")
        check(1 <= self.block <= 1 << 16, n, "block", f"must be in [1, 65536], got {self.block}")


@dataclasses.dataclass
class Encoded:
    """One tensor's manifest record, its sections (bytes, codec) and per-stream statistics."""

    record: dict[str, Any]
    sections: list[tuple[bytes, str]]
    streams: dict[str, StreamInfo]

    @property
    def nbytes(self) -> int:
        return sum(len(d) for d, _ in self.sections)


class _Sections:
    """Collects sections for one tensor, numbering them from ``base``."""

    def __init__(self, base: int) -> None:
        self.base, self.items, self.streams = base, [], {}

    def add(self, data: bytes, codec: str) -> int:
        self.items.append((data, codec))
        return self.base + len(self.items) - 1

    def stream(self, role: str, symbols: np.ndarray, alphabet: int, cfg: PackConfig) -> int:
        data, info = encode_stream(symbols, alphabet, _mode(cfg, alphabet), cfg.block)
        self.streams[role] = info
        return self.add(data, info.mode)


def _mode(cfg: PackConfig, alphabet: int) -> str:
    # Huffman tables hold at most 2^15 used symbols; bigger alphabets fall back to fixed width.
    return cfg.entropy if alphabet <= 1 << MAX_LEN else "fixed"


def _raw_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------- encoding


def encode_tensor(name: str, t: torch.Tensor, shared: SharedTensor | None, cfg: PackConfig,
                  base: int) -> Encoded:
    """Encode ``t`` (or its ``shared`` codebook + indices) choosing the smallest index coding."""
    if t.dtype not in DTYPE_NAMES:
        raise FormatError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in a .dsz file")
    shape = tuple(t.shape)
    if len(shape) > MAX_DIMS:
        raise FormatError(f"tensor {name!r}: {len(shape)} dimensions exceed the limit {MAX_DIMS}")
    head = {"name": name, "shape": list(shape), "dtype": DTYPE_NAMES[t.dtype]}
    if shared is not None:
        stored = shared.index.cpu().numpy().reshape(shape) >= 0
    elif cfg.sparse_raw and t.is_floating_point():
        stored = (t.detach().cpu() != 0).numpy()
    else:
        stored = None
    candidates = []
    orders = ("C", "F") if cfg.order == "auto" and len(shape) >= 2 else (
        (cfg.order,) if len(shape) >= 2 else ("C",))
    if cfg.index in ("auto", "dense") or stored is None:
        candidates.append(_encode(head, t, shared, None, "C", cfg, base))
    if stored is not None and cfg.index != "dense":
        kinds = ("relative", "csr") if cfg.index == "auto" else (cfg.index,)
        for order in orders:
            for kind in kinds:
                candidates.append(_encode(head, t, shared, (kind, stored), order, cfg, base))
    return min(candidates, key=lambda e: e.nbytes)


def _encode(head: dict[str, Any], t: torch.Tensor, shared: SharedTensor | None,
            sparse: tuple[str, np.ndarray] | None, order: str, cfg: PackConfig, base: int) -> Encoded:
    rec = dict(head)
    secs = _Sections(base)
    shape = tuple(t.shape)
    if sparse is None:
        rec["index"] = {"kind": "dense"}
        pos = None
    else:
        kind, stored = sparse
        pos = np.flatnonzero(to_scan(stored, order))
        rows, cols = scan_shape(shape, order)
        if kind == "relative":
            bits = cfg.rel_bits or _best_rel_bits(pos, cfg)
            sid = secs.stream("index", relative_encode(pos, bits), 1 << bits, cfg)
            rec["index"] = {"kind": "relative", "order": order, "bits": bits, "nnz": len(pos),
                            "stream": sid}
        else:
            counts, columns = csr_encode(pos, rows, cols)
            c_sid = secs.stream("csr_counts", counts, cols + 1, cfg)
            k_sid = secs.stream("csr_cols", columns, max(cols, 1), cfg)
            rec["index"] = {"kind": "csr", "order": order, "nnz": len(pos), "counts": c_sid,
                            "cols": k_sid}
    if shared is not None:
        k = len(shared.codebook)
        cb = shared.codebook.to(DTYPES[cfg.codebook_dtype])
        cb_sid = secs.add(_raw_bytes(cb), "raw")
        idx = shared.index.cpu().numpy().reshape(shape)
        if pos is None:
            sym, alphabet = np.where(idx >= 0, idx, k).reshape(-1), k + 1
        else:
            sym, alphabet = to_scan(idx, order)[pos], k
        s_sid = secs.stream("values", sym, alphabet, cfg)
        rec["values"] = {"kind": "shared", "k": k, "cb_dtype": cfg.codebook_dtype, "codebook": cb_sid,
                         "symbols": s_sid}
    else:
        flat = t.detach().cpu().contiguous()
        if pos is not None:  # in torch: numpy has no bfloat16
            rows, cols = scan_shape(shape, "C")
            m = flat.reshape(rows, cols)
            flat = (m if order == "C" else m.t()).reshape(-1)[torch.from_numpy(pos)]
        rec["values"] = {"kind": "raw", "data": secs.add(_raw_bytes(flat), "raw")}
    return Encoded(rec, secs.items, secs.streams)


def _best_rel_bits(pos: np.ndarray, cfg: PackConfig) -> int:
    """The relative-index width with the fewest coded bits (Huffman lengths or fixed width)."""
    from deepshrink.coding.huffman import huffman_lengths

    gaps = np.diff(pos, prepend=-1) - 1
    best, best_cost = 1, None
    for bits in REL_BITS:
        m = (1 << bits) - 1
        counts = np.bincount(gaps % m, minlength=m + 1)
        counts[m] += int((gaps // m).sum())
        if cfg.entropy == "fixed":
            cost = int(counts.sum()) * bits
        else:
            cost = int(np.dot(counts, huffman_lengths(counts).astype(np.int64))) + 4 * (m + 1)
        if best_cost is None or cost < best_cost:
            best, best_cost = bits, cost
    return best


# --------------------------------------------------------------------------- decoding


def _int(rec: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    v = rec.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise FormatError(f"{where}: '{key}' must be an integer in [{lo}, {hi}], got {v!r:.60}")
    return v


def _obj(rec: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    v = rec.get(key)
    if not isinstance(v, dict):
        raise FormatError(f"{where}: '{key}' must be an object")
    return v


def record_numel(rec: dict[str, Any], where: str) -> int:
    """Validated element count of a tensor record (0 for an alias)."""
    if "alias" in rec:
        return 0
    shape = rec.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40
                       for d in shape)):
        raise FormatError(f"{where}: 'shape' must be a list of at most {MAX_DIMS} non-negative ints")
    n = 1
    for d in shape:
        n *= d
    return n


def decode_tensor(rec: dict[str, Any], c: Container, where: str
                  ) -> tuple[torch.Tensor, SharedTensor | None]:
    """Rebuild one tensor (and its sharing state) from a validated-size record."""
    shape = tuple(rec["shape"])
    numel = record_numel(rec, where)
    dtype_name = rec.get("dtype")
    if dtype_name not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {dtype_name!r:.40}")
    index, values = _obj(rec, "index", where), _obj(rec, "values", where)
    order = index.get("order", "C")
    if order not in ("C", "F"):
        raise FormatError(f"{where}: index order must be 'C' or 'F', got {order!r:.20}")
    pos, nnz = _decode_positions(index, shape, numel, order, c, where)
    vkind = values.get("kind")
    if vkind == "raw":
        return _decode_raw(values, DTYPES[dtype_name], shape, pos, nnz, order, c, where), None
    if vkind != "shared":
        raise FormatError(f"{where}: unknown values kind {vkind!r:.40}")
    if not DTYPES[dtype_name].is_floating_point:
        raise FormatError(f"{where}: shared values need a float dtype, got {dtype_name}")
    shared = _decode_shared(values, shape, pos, nnz, order, c, where)
    return shared.weight().to(DTYPES[dtype_name]), shared


def _stream(c: Container, sid: Any, field: str, count: int, alphabet: int) -> np.ndarray:
    """Exactly ``count`` symbols, each below ``alphabet``, from section ``sid``."""
    data, off = c.section(sid, field)
    out = decode_stream(data, where=f"{c.where}: {field} (section {sid})", base=off, max_count=count)
    if len(out) != count:
        raise FormatError(f"{c.where}: {field} (section {sid}) at offset {off} holds "
                          f"{len(out)} symbols, expected {count}")
    head_alpha = int(out.max()) + 1 if len(out) else 0
    if head_alpha > alphabet:
        raise FormatError(f"{c.where}: {field} (section {sid}) has symbol "
                          f"{head_alpha - 1} outside [0, {alphabet})")
    return out


def _decode_positions(index: dict[str, Any], shape: tuple[int, ...], numel: int, order: str,
                      c: Container, where: str) -> tuple[np.ndarray | None, int]:
    """(scan positions of the stored values, their count); ``None`` positions means all of them."""
    ikind = index.get("kind")
    if ikind == "dense":
        return None, numel
    if ikind == "relative":
        bits = _int(index, "bits", 1, max(REL_BITS), f"{where}.index")
        nnz = _int(index, "nnz", 0, numel, f"{where}.index")
        m = (1 << bits) - 1
        sym = _stream_any_count(c, index.get("stream"), f"{where}.index.stream", nnz + numel // m + 1)
        if len(sym) and int(sym.max()) > m:
            raise FormatError(f"{c.where}: {where}.index: symbol above {m}")
        pos = relative_decode(sym, bits, numel, f"{c.where}: {where}.index")
        if len(pos) != nnz:
            raise FormatError(f"{c.where}: {where}.index decodes {len(pos)} positions, nnz says {nnz}")
        return pos, nnz
    if ikind == "csr":
        nnz = _int(index, "nnz", 0, numel, f"{where}.index")
        rows, cols = scan_shape(shape, order)
        counts = _stream(c, index.get("counts"), f"{where}.index.counts", rows, cols + 1)
        columns = _stream(c, index.get("cols"), f"{where}.index.cols", nnz, max(cols, 1))
        return csr_decode(counts, columns, rows, cols, f"{c.where}: {where}.index"), nnz
    raise FormatError(f"{where}: unknown index kind {ikind!r:.40}")


def _decode_raw(values: dict[str, Any], dtype: torch.dtype, shape: tuple[int, ...],
                pos: np.ndarray | None, nnz: int, order: str, c: Container, where: str) -> torch.Tensor:
    """A tensor whose stored values are raw element bytes at ``pos`` (zeros elsewhere)."""
    data, off = c.section(values.get("data"), f"{where}.values.data")
    item = torch.empty(0, dtype=dtype).element_size()
    if len(data) != nnz * item:
        raise FormatError(f"{c.where}: {where}.values (file offset {off}) has {len(data)} bytes, "
                          f"expected {nnz} x {item}")
    vals = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype) if data else \
        torch.empty(0, dtype=dtype)
    if dtype == torch.bool and data and max(data) > 1:
        raise FormatError(f"{c.where}: {where}.values (file offset {off}): bool bytes must be 0/1")
    if pos is None:
        return vals.reshape(shape).clone()
    out = torch.zeros(math.prod(shape), dtype=dtype)
    out[torch.from_numpy(pos)] = vals
    return _unscan(out, shape, order)


def _decode_shared(values: dict[str, Any], shape: tuple[int, ...], pos: np.ndarray | None, nnz: int,
                   order: str, c: Container, where: str) -> SharedTensor:
    """Codebook + cluster indices (``-1`` for pruned positions) of a shared tensor."""
    k = _int(values, "k", 1, MAX_CLUSTERS, f"{where}.values")
    cb_dtype = values.get("cb_dtype")
    if cb_dtype not in ("float32", "float16"):
        raise FormatError(f"{where}: codebook dtype {cb_dtype!r:.20} is not float32/float16")
    data, off = c.section(values.get("codebook"), f"{where}.values.codebook")
    item = 4 if cb_dtype == "float32" else 2
    if len(data) != k * item:
        raise FormatError(f"{c.where}: {where} codebook (file offset {off}) has {len(data)} bytes, "
                          f"expected {k} x {item}")
    book = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(DTYPES[cb_dtype]).float()
    if not torch.isfinite(book).all():
        raise FormatError(f"{c.where}: {where} codebook (file offset {off}) holds non-finite values")
    numel = math.prod(shape)
    field = f"{where}.values.symbols"
    if pos is None:  # dense: symbol k marks a pruned zero
        sym = _stream(c, values.get("symbols"), field, numel, k + 1).astype(np.int64)
        idx = np.where(sym == k, -1, sym)
    else:
        sym = _stream(c, values.get("symbols"), field, nnz, k).astype(np.int64)
        idx = np.full(numel, -1, np.int64)
        idx[pos] = sym
        idx = from_scan(idx, shape, order) if order == "F" else idx
    return SharedTensor(book, torch.from_numpy(np.ascontiguousarray(idx).reshape(shape)))


def _stream_any_count(c: Container, sid: Any, field: str, max_count: int) -> np.ndarray:
    data, off = c.section(sid, field)
    return decode_stream(data, where=f"{c.where}: {field} (section {sid})", base=off,
                         max_count=max_count)


def _unscan(flat: torch.Tensor, shape: tuple[int, ...], order: str) -> torch.Tensor:
    if order == "C":
        return flat.reshape(shape)
    rows, cols = scan_shape(shape, "C")
    return flat.reshape(cols, rows).T.contiguous().reshape(shape)
