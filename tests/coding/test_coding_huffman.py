"""Canonical Huffman streams: exact round trips, optimal lengths, closeness to the entropy."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from deepshrink.coding.huffman import (
    MAX_LEN,
    Code,
    decode_stream,
    encode_stream,
    entropy_bits,
    huffman_lengths,
    kraft_ok,
    pack_codes,
)
from deepshrink.errors import FormatError

RNG = np.random.default_rng(0)


def reference_huffman_bits(counts: np.ndarray) -> int:
    """Textbook Huffman cost: the sum of all merged weights (heapq, no canonical form)."""
    heap = [int(c) for c in counts if c > 0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a + b
        heapq.heappush(heap, a + b)
    return total


CASES = {
    "random": (RNG.integers(0, 32, 50_000), 32),
    "skewed": (np.minimum(RNG.geometric(0.4, 50_000) - 1, 63), 64),
    "single": (np.full(3000, 5), 8),
    "empty": (np.zeros(0, np.int64), 4),
    "two": (np.array([1, 0, 1, 1]), 2),
    "big_alphabet": (RNG.integers(0, 3000, 20_000), 3000),
}


@pytest.mark.parametrize("mode", ["huffman", "fixed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_exact(case: str, mode: str) -> None:
    symbols, alphabet = CASES[case]
    data, info = encode_stream(symbols, alphabet, mode, block=1000)
    out = decode_stream(data)
    assert out.dtype.kind == "u"
    np.testing.assert_array_equal(out.astype(np.int64), symbols)
    assert info.count == len(symbols)
    assert 8 * len(data) == info.total_bits


def test_single_symbol_costs_no_payload_bits() -> None:
    data, info = encode_stream(np.full(100_000, 3), 16)
    assert info.payload_bits == 0 and len(data) < 20
    np.testing.assert_array_equal(decode_stream(data), np.full(100_000, 3))


@pytest.mark.parametrize("alphabet", [2, 3, 7, 40, 300])
def test_lengths_are_optimal(alphabet: int) -> None:
    for trial in range(5):
        counts = np.random.default_rng(trial).integers(0, 1000, alphabet)
        counts[0] = max(counts[0], 1)
        counts[-1] = max(counts[-1], 1)
        lengths = huffman_lengths(counts)
        assert kraft_ok(lengths)
        assert Code(lengths).coded_bits(counts) == reference_huffman_bits(counts)


def test_canonical_codes_are_prefix_free() -> None:
    counts = RNG.integers(1, 100, 50)
    code = Code(huffman_lengths(counts))
    words = {format(int(c), f"0{int(n)}b") for c, n in zip(code.codes, code.lengths, strict=True)}
    assert len(words) == 50
    for a in words:
        assert not any(b != a and b.startswith(a) for b in words)


def test_length_limit_on_fibonacci_counts() -> None:
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, dtype=np.int64)  # unrestricted Huffman would need 29-bit codes
    lengths = huffman_lengths(counts)
    assert lengths.max() <= MAX_LEN and kraft_ok(lengths)
    symbols = np.repeat(np.arange(30), np.minimum(counts, 50))
    data, _ = encode_stream(symbols, 30)
    np.testing.assert_array_equal(decode_stream(data), symbols)


def test_pack_codes_matches_bit_strings() -> None:
    codes = RNG.integers(0, 1 << 20, 500).astype(np.uint32)
    lens = RNG.integers(1, 21, 500)
    codes &= (np.uint32(1) << lens.astype(np.uint32)) - np.uint32(1)
    data, pos, nbits = pack_codes(codes, lens)
    bits = "".join(format(int(c), f"0{int(n)}b") for c, n in zip(codes, lens, strict=True))
    assert nbits == len(bits) and pos[1] == lens[0]
    expect = int(bits + "0" * (-len(bits) % 8), 2).to_bytes((len(bits) + 7) // 8, "big")
    assert data == expect


def test_coded_size_close_to_entropy() -> None:
    # a weight-index-like distribution: about 4.5 bits of entropy over 32 symbols
    p = np.exp(-0.5 * ((np.arange(32) - 15.5) / 6) ** 2)
    symbols = RNG.choice(32, 200_000, p=p / p.sum())
    _, info = encode_stream(symbols, 32)
    h = entropy_bits(np.bincount(symbols, minlength=32))
    assert info.entropy_bits == pytest.approx(h)
    assert h <= info.payload_bits <= 1.02 * h


def test_corrupt_stream_raises_format_error() -> None:
    data, _ = encode_stream(RNG.integers(0, 10, 5000), 10, block=512)
    for cut in (0, 1, 5, len(data) // 2, len(data) - 1):
        with pytest.raises(FormatError):
            decode_stream(data[:cut])
    flipped = bytearray(data)
    flipped[-20] ^= 0xFF
    with pytest.raises(FormatError):
        decode_stream(bytes(flipped) + b"\0")
    with pytest.raises(FormatError, match="count"):
        decode_stream(data, max_count=10)
