"""Where the non-zeros are: relative-index coding (Deep Compression) and CSR.

Both work on a tensor viewed as a 2-D *scan matrix* (rows, cols) — ``(shape[0], rest)`` in C
order, or its transpose in "F" order, which often has longer zero runs (a dead input pixel zeroes
a whole column of a first dense layer). Positions are flat indices into the scan matrix.

Relative indices: each non-zero stores the gap (zeros skipped) since the previous one in
``bits`` bits. A gap that does not fit is bridged by *filler* entries: symbol ``M = 2^bits - 1``
skips ``M`` zeros and carries no value (Han et al. store a zero weight there; the filler's value
is implied here, so it costs no value symbol). Symbols ``0..M-1`` mean "skip s zeros, then a
non-zero". CSR stores, per row, the count of non-zeros and, per non-zero, its column.

All functions are vectorized; decoders validate their input and raise :class:`FormatError`.
"""

from __future__ import annotations

import numpy as np

from deepshrink.errors import FormatError

MAX_REL_BITS = 16


def scan_shape(shape: tuple[int, ...], order: str) -> tuple[int, int]:
    """(rows, cols) of the scan matrix of a tensor of ``shape`` in ``order`` "C" or "F"."""
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    rows = int(shape[0]) if len(shape) >= 1 and shape[0] > 0 else 1
    cols = numel // rows if rows else 0
    return (rows, cols) if order == "C" else (cols, rows)


def to_scan(x: np.ndarray, order: str) -> np.ndarray:
    """Flatten a tensor into its scan order."""
    rows, cols = scan_shape(x.shape, "C")
    m = x.reshape(rows, cols)
    return (m if order == "C" else m.T).reshape(-1)


def from_scan(flat: np.ndarray, shape: tuple[int, ...], order: str) -> np.ndarray:
    """Inverse of :func:`to_scan`."""
    rows, cols = scan_shape(shape, "C")
    m = flat.reshape(rows, cols) if order == "C" else flat.reshape(cols, rows).T
    return np.ascontiguousarray(m).reshape(shape)


def relative_encode(positions: np.ndarray, bits: int) -> np.ndarray:
    """Symbols in ``[0, 2^bits)`` for sorted, unique flat ``positions``."""
    if not 1 <= bits <= MAX_REL_BITS:
        raise ValueError(f"bits must be in [1, {MAX_REL_BITS}], got {bits}")
    m = (1 << bits) - 1
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps // m
    # Each non-zero emits `fillers` copies of M followed by its remainder symbol.
    reps = fillers + 1
    out = np.full(int(reps.sum()), m, dtype=np.int64)
    out[np.cumsum(reps) - 1] = gaps % m
    return out


def relative_decode(symbols: np.ndarray, bits: int, numel: int, where: str = "relative index"
                    ) -> np.ndarray:
    """Flat positions from relative-index ``symbols``; checks they stay inside ``numel``."""
    m = (1 << bits) - 1
    s = np.asarray(symbols, dtype=np.int64)
    if len(s) and (s.min() < 0 or s.max() > m):
        raise FormatError(f"{where}: symbol outside [0, {m}]")
    is_value = s < m
    advance = s + is_value  # a value symbol s skips s zeros and covers the non-zero itself
    ends = np.cumsum(advance)
    pos = ends[is_value] - 1
    if len(s) and not is_value[-1]:
        raise FormatError(f"{where}: stream ends with a filler (no value after it)")
    if len(pos) and pos[-1] >= numel:
        raise FormatError(f"{where}: position {int(pos[-1])} beyond the tensor's {numel} elements")
    return pos


def csr_encode(positions: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(non-zeros per row, column of each non-zero) for sorted flat ``positions``."""
    positions = np.asarray(positions, dtype=np.int64)
    if cols == 0:
        return np.zeros(rows, np.int64), positions
    return np.bincount(positions // cols, minlength=rows), positions % cols


def csr_decode(counts: np.ndarray, columns: np.ndarray, rows: int, cols: int,
               where: str = "csr index") -> np.ndarray:
    """Flat positions from CSR row counts and columns; checks order, range and totals."""
    counts = np.asarray(counts, dtype=np.int64)
    columns = np.asarray(columns, dtype=np.int64)
    if len(counts) != rows:
        raise FormatError(f"{where}: {len(counts)} row counts for {rows} rows")
    if int(counts.sum()) != len(columns):
        raise FormatError(f"{where}: row counts sum to {int(counts.sum())}, {len(columns)} columns given")
    if len(columns) and (columns.min() < 0 or columns.max() >= cols):
        raise FormatError(f"{where}: column index outside [0, {cols})")
    pos = np.repeat(np.arange(rows, dtype=np.int64), counts) * cols + columns
    if len(pos) > 1 and np.any(np.diff(pos) <= 0):
        raise FormatError(f"{where}: columns are not strictly increasing within a row")
    return pos
