"""Relative-index (with fillers) and CSR coding of non-zero positions."""

from __future__ import annotations

import numpy as np
import pytest

from deepshrink.coding.sparse import (
    csr_decode,
    csr_encode,
    from_scan,
    relative_decode,
    relative_encode,
    scan_shape,
    to_scan,
)
from deepshrink.errors import FormatError


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_relative_round_trip_with_overflowing_gaps(bits: int) -> None:
    rng = np.random.default_rng(bits)
    numel = 5000
    pos = np.sort(rng.choice(numel, 300, replace=False))
    pos = np.unique(np.r_[0, pos, 4000, numel - 1])  # gaps of 0 and gaps far beyond 2^bits
    sym = relative_encode(pos, bits)
    assert sym.max() <= (1 << bits) - 1
    np.testing.assert_array_equal(relative_decode(sym, bits, numel), pos)


def test_relative_filler_counts() -> None:
    # gap 10 with 2 bits (M = 3): three fillers of 3 zeros, then remainder 1 with the value
    sym = relative_encode(np.array([10]), 2)
    assert sym.tolist() == [3, 3, 3, 1]
    assert relative_encode(np.array([], np.int64), 4).size == 0


def test_relative_decode_rejects_bad_streams() -> None:
    with pytest.raises(FormatError, match="beyond"):
        relative_decode(np.array([0, 6]), 3, 5)
    with pytest.raises(FormatError, match="filler"):
        relative_decode(np.array([0, 7]), 3, 50)


def test_csr_round_trip_and_validation() -> None:
    rng = np.random.default_rng(1)
    rows, cols = 30, 40
    pos = np.sort(rng.choice(rows * cols, 200, replace=False))
    counts, columns = csr_encode(pos, rows, cols)
    assert counts.sum() == 200 and columns.max() < cols
    np.testing.assert_array_equal(csr_decode(counts, columns, rows, cols), pos)
    with pytest.raises(FormatError):
        csr_decode(counts, columns[::-1], rows, cols)
    with pytest.raises(FormatError):
        csr_decode(counts[:-1], columns, rows, cols)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 2), (7,), ()])
def test_scan_orders_are_inverse(shape: tuple[int, ...]) -> None:
    x = np.arange(int(np.prod(shape))).reshape(shape)
    for order in ("C", "F"):
        flat = to_scan(x, order)
        assert flat.size == x.size
        np.testing.assert_array_equal(from_scan(flat, shape, order), x)
    if len(shape) == 2:
        assert scan_shape(shape, "F") == (shape[1], shape[0])
        np.testing.assert_array_equal(to_scan(x, "F"), x.T.ravel())
