"""Canonical Huffman coding of small-alphabet integer symbols, vectorized with numpy.

Encoding places every codeword with array arithmetic (bit offsets from a cumulative sum, then
codewords OR-ed into 64-bit words). Decoding is table-driven: one lookup table indexed by the
next ``max_len`` bits gives (symbol, length). A Huffman stream is inherently sequential, so the
symbols are cut into *lanes* of ``block`` symbols whose starting bit offsets are stored; the
decoder then advances all lanes together, one numpy step per symbol position in a lane — the
Python loop runs ``block`` times, never once per symbol.

A stream is serialized as one self-describing byte string (see :func:`encode_stream`):

    varint mode (0 fixed-width, 1 Huffman) | varint count | varint alphabet | varint block |
    varint nbits | code lengths (Huffman: 4 bits per symbol) | lane starts (u32 LE each) | bits

Code lengths are limited to 15 bits so they fit in a nibble and the decode table has at most
32768 entries. Decoding validates everything (lengths, Kraft sum, lane offsets, that every lane
ends exactly where the next starts) and raises :class:`FormatError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from deepshrink.errors import FormatError

MAX_LEN = 15  # longest codeword; lengths are stored as nibbles
DEFAULT_BLOCK = 4096  # symbols per lane: 4 bytes of lane offset per 4096 symbols (< 0.01 bit/symbol)
MAX_BLOCK = 1 << 16  # bounds the decoder's Python loop on hostile input
MAX_ALPHABET = 1 << 24
FIXED, HUFFMAN = 0, 1


# --------------------------------------------------------------------------- code construction


def huffman_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Optimal code lengths for symbol ``counts`` (0 for unused symbols), limited to ``max_len``.

    A single used symbol gets length 1 (streams then store no bits at all, see
    :func:`encode_stream`). When the optimal code is longer than ``max_len`` (only for extremely
    skewed counts), lengths are redistributed with the JPEG (ITU T.81, K.3) adjustment, which
    keeps the Kraft sum at one.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.uint8)
    used = np.flatnonzero(counts)
    if len(used) <= 1:
        lengths[used] = 1
        return lengths
    if len(used) > (1 << max_len):
        raise ValueError(f"{len(used)} used symbols cannot fit codes of at most {max_len} bits")
    # Plain Huffman over the used symbols: a loop over the alphabet, not over the data.
    n = len(used)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    heap = [(int(counts[s]), i) for i, s in enumerate(used)]
    heapq.heapify(heap)
    nxt = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (w1 + w2, nxt))
        nxt += 1
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for node in range(2 * n - 3, -1, -1):  # parents are created after children: walk top-down
        depth[node] = depth[parent[node]] + 1
    leaf_len = depth[:n]
    if leaf_len.max() > max_len:
        leaf_len = _limit_lengths(counts[used], leaf_len, max_len)
    lengths[used] = leaf_len
    return lengths


def _limit_lengths(weights: np.ndarray, lengths: np.ndarray, max_len: int) -> np.ndarray:
    """JPEG K.3: move codes deeper than ``max_len`` up while keeping the Kraft sum at 1."""
    bl_count = np.bincount(lengths, minlength=int(lengths.max()) + 1).astype(np.int64)
    for i in range(len(bl_count) - 1, max_len, -1):
        while bl_count[i] > 0:
            j = i - 2
            while bl_count[j] == 0:
                j -= 1
            bl_count[i] -= 2
            bl_count[i - 1] += 1
            bl_count[j + 1] += 2
            bl_count[j] -= 1
    new_lengths = np.repeat(np.arange(len(bl_count)), bl_count)[: len(weights)]
    out = np.empty_like(lengths)
    out[np.argsort(-weights, kind="stable")] = new_lengths  # most frequent get the shortest
    return out


def fixed_width(alphabet: int) -> int:
    """Bits per symbol of a fixed-width code for ``alphabet`` symbols (0 for one symbol)."""
    return int(alphabet - 1).bit_length() if alphabet > 1 else 0


@dataclasses.dataclass
class Code:
    """A canonical prefix code: ``lengths[s]`` bits for symbol ``s`` (0 = unused)."""

    lengths: np.ndarray

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.uint8)
        self.codes = _canonical_codes(self.lengths)

    @property
    def alphabet(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def coded_bits(self, counts: np.ndarray) -> int:
        """Bits the payload takes for these symbol counts (no table, no lane offsets)."""
        return int(np.dot(np.asarray(counts, dtype=np.int64), self.lengths.astype(np.int64)))


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """DEFLATE-style canonical codes: sorted by (length, symbol), consecutive integers."""
    codes = np.zeros(len(lengths), dtype=np.uint32)
    used = np.flatnonzero(lengths)
    if len(used) == 0:
        return codes
    max_len = int(lengths.max())
    bl_count = np.bincount(lengths[used], minlength=max_len + 1).astype(np.int64)
    next_code = np.zeros(max_len + 1, dtype=np.int64)  # first code of each length
    code = 0
    for bits in range(1, max_len + 1):
        next_code[bits] = code
        code = (code + bl_count[bits]) << 1
    order = used[np.lexsort((used, lengths[used]))]
    lens = lengths[order].astype(np.int64)
    # rank of each symbol among the symbols of its length
    first_of_len = np.searchsorted(lens, lens, side="left")
    rank = np.arange(len(order)) - first_of_len
    codes[order] = (next_code[lens] + rank).astype(np.uint32)
    return codes


def kraft_ok(lengths: np.ndarray) -> bool:
    """True when the lengths describe a prefix code (Kraft sum <= 1)."""
    used = lengths[lengths > 0].astype(np.int64)
    if len(used) == 0:
        return True
    m = int(used.max())
    return int(np.sum(np.int64(1) << (m - used))) <= (1 << m)


# --------------------------------------------------------------------------- bit packing


PACK_CHUNK = 1 << 20  # codewords per pass: keeps the temporaries small and cache-friendly


def pack_codes(codes: np.ndarray, lens: np.ndarray) -> tuple[bytes, np.ndarray, int]:
    """Concatenate codewords MSB-first. Returns (bytes, bit offset of each codeword, total bits).

    Each codeword (<= 32 bits, all lengths > 0 or all 0) lands in at most two 64-bit words;
    because codewords never overlap, OR-reducing the parts per word builds the stream with no
    per-symbol loop. Work goes in chunks of :data:`PACK_CHUNK` codewords; a word shared by two
    chunks is OR-ed together.
    """
    ends = np.cumsum(lens, dtype=np.int64)
    nbits = int(ends[-1]) if len(lens) else 0
    pos = ends - lens
    if nbits == 0:
        return b"", pos, 0
    words = np.zeros((nbits + 63) // 64 + 1, dtype=np.uint64)
    for i in range(0, len(lens), PACK_CHUNK):
        p = pos[i : i + PACK_CHUNK]
        val = codes[i : i + PACK_CHUNK].astype(np.uint64)
        val <<= (64 - lens[i : i + PACK_CHUNK]).astype(np.uint64)  # left-aligned in 64 bits
        off = (p & 63).astype(np.uint64)
        w = p >> 6
        starts = np.flatnonzero(np.r_[True, w[1:] != w[:-1]])
        ws = w[starts]
        words[ws] |= np.bitwise_or.reduceat(val >> off, starts)
        # the part spilling into the next word; two shifts because a shift by 64 is undefined
        val <<= np.uint64(63) - off
        val <<= np.uint64(1)
        words[ws + 1] |= np.bitwise_or.reduceat(val, starts)
    return words.astype(">u8").tobytes()[: (nbits + 7) // 8], pos, nbits


def _window(data: bytes | np.ndarray) -> np.ndarray:
    """win[j] = the 4 bytes starting at byte j as a big-endian uint32 (zero padded)."""
    u = np.frombuffer(bytes(data) + b"\0\0\0\0", dtype=np.uint8).astype(np.uint32)
    return (u[:-3] << 24) | (u[1:-2] << 16) | (u[2:-1] << 8) | u[3:]


def _peek(win: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` (<= 25) bits starting at each bit position ``pos``."""
    idx = np.minimum(pos >> 3, len(win) - 1)  # clamp: corrupt input must not index out of range
    sh = (pos & 7).astype(np.uint32)
    return (win[idx] << sh) >> np.uint32(32 - width)


# --------------------------------------------------------------------------- streams


def _smallest_uint(alphabet: int) -> np.dtype:
    return np.dtype(np.uint8 if alphabet <= 256 else np.uint16 if alphabet <= 65536 else np.uint32)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    """Bounds-checked cursor over a section's bytes; errors name the section and offset."""

    def __init__(self, buf: bytes, where: str, base: int) -> None:
        self.buf, self.where, self.base, self.pos = buf, where, base, 0

    def fail(self, msg: str) -> FormatError:
        return FormatError(f"{self.where} at offset {self.base + self.pos}: {msg}")

    def varint(self, field: str, limit: int) -> int:
        val, shift = 0, 0
        while True:
            if self.pos >= len(self.buf):
                raise self.fail(f"truncated varint for {field}")
            b = self.buf[self.pos]
            self.pos += 1
            val |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift > 63:
                raise self.fail(f"varint for {field} is too long")
        if val > limit:
            raise self.fail(f"{field} = {val} exceeds the limit {limit}")
        return val

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{field} needs {n} bytes, only {len(self.buf) - self.pos} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


@dataclasses.dataclass
class StreamInfo:
    """What :func:`encode_stream` produced: sizes in bits, for the entropy report."""

    mode: str
    count: int
    alphabet: int
    payload_bits: int  # codeword bits
    overhead_bits: int  # header, code table, lane offsets, byte padding
    entropy_bits: float  # count * empirical entropy of the symbols

    @property
    def total_bits(self) -> int:
        return self.payload_bits + self.overhead_bits

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def entropy_bits(counts: np.ndarray) -> float:
    """count * H(p): the empirical-entropy bound for coding symbols one at a time."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    if n == 0:
        return 0.0
    p = counts[counts > 0] / n
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def encode_stream(symbols: np.ndarray, alphabet: int, mode: str = "huffman",
                  block: int = DEFAULT_BLOCK) -> tuple[bytes, StreamInfo]:
    """Encode integer ``symbols`` in ``[0, alphabet)`` as one self-describing byte string."""
    symbols = np.asarray(symbols).ravel()
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"alphabet must be in [1, {MAX_ALPHABET}], got {alphabet}")
    if len(symbols) and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError(f"symbols outside [0, {alphabet})")
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be in [1, {MAX_BLOCK}], got {block}")
    if symbols.dtype.kind not in "iu" or symbols.dtype.itemsize > 4:
        symbols = symbols.astype(np.int64)  # small unsigned ints index tables as they are
    counts = np.bincount(symbols, minlength=alphabet)
    n = len(symbols)
    if mode == "fixed":
        width = fixed_width(alphabet)
        code = None
        codes, lens = symbols.astype(np.uint32), np.full(n, width, np.uint8)
        table = b""
    elif mode == "huffman":
        code = Code(huffman_lengths(counts))
        codes, lens = code.codes[symbols], code.lengths[symbols]
        if np.count_nonzero(code.lengths) == 1:  # one symbol: its count says it all, no bits
            lens = np.zeros(n, np.uint8)
        lp = code.lengths
        table = ((lp[0::2] << 4) | np.r_[lp[1::2], np.zeros(len(lp) % 2, np.uint8)]).astype(
            np.uint8).tobytes()
    else:
        raise ValueError(f"mode must be 'fixed' or 'huffman', got {mode!r}")
    data, pos, nbits = pack_codes(codes, lens)
    lanes = b""
    if code is not None and nbits and n > block:
        lanes = pos[block::block].astype("<u4").tobytes()
        if nbits >= 1 << 32:
            raise ValueError("stream longer than 2^32 bits; split the tensor")
    head = b"".join(_varint(v) for v in (HUFFMAN if code else FIXED, n, alphabet, block, nbits))
    out = head + table + lanes + data
    info = StreamInfo(mode, n, alphabet, nbits, 8 * len(out) - nbits, entropy_bits(counts))
    return out, info


def decode_stream(buf: bytes, *, where: str = "stream", base: int = 0,
                  max_count: int = 1 << 31) -> np.ndarray:
    """Decode :func:`encode_stream` output. ``max_count`` caps the symbols the caller accepts
    (checked before anything is allocated); ``where``/``base`` name the section in errors."""
    r = _Reader(buf, where, base)
    mode = r.varint("mode", 1)
    n = r.varint("count", max_count)
    alphabet = r.varint("alphabet", MAX_ALPHABET)
    block = r.varint("block", MAX_BLOCK)
    nbits = r.varint("nbits", 8 * len(buf))
    if alphabet < 1:
        raise r.fail("alphabet must be >= 1")
    if block < 1:
        raise r.fail("block must be >= 1")
    dtype = _smallest_uint(alphabet)
    if mode == FIXED:
        width = fixed_width(alphabet)
        if nbits != n * width:
            raise r.fail(f"nbits {nbits} != count {n} x width {width}")
        data = r.take((nbits + 7) // 8, "bitstream")
        _expect_end(r)
        if width == 0:
            return np.zeros(n, dtype)
        out = _peek(_window(data), np.arange(n, dtype=np.int64) * width, width)
        if n and int(out.max()) >= alphabet:
            raise r.fail(f"symbol {int(out.max())} outside the alphabet {alphabet}")
        return out.astype(dtype)

    table = np.frombuffer(r.take((alphabet + 1) // 2, "code table"), dtype=np.uint8)
    lengths = np.empty(2 * len(table), np.uint8)
    lengths[0::2], lengths[1::2] = table >> 4, table & 15
    if alphabet % 2 and lengths[-1]:
        raise r.fail("code table padding nibble is not zero")
    lengths = lengths[:alphabet]
    if not kraft_ok(lengths):
        raise r.fail("code lengths violate the Kraft inequality (not a prefix code)")
    used = int(np.count_nonzero(lengths))
    code = Code(lengths)
    if used <= 1:  # zero or one used symbol: no bits at all
        if nbits != 0 or (n and used == 0):
            raise r.fail(f"a code with {used} symbol(s) cannot carry {nbits} bits for {n} symbols")
        _expect_end(r)
        return np.full(n, int(np.argmax(lengths)) if used else 0, dtype)
    if n > nbits:
        raise r.fail(f"count {n} exceeds nbits {nbits} although every codeword has >= 1 bit")
    n_lanes = max(1, -(-n // block))
    starts = np.zeros(n_lanes, np.int64)
    if n_lanes > 1:
        starts[1:] = np.frombuffer(r.take(4 * (n_lanes - 1), "lane offsets"), dtype="<u4")
    data = r.take((nbits + 7) // 8, "bitstream")
    _expect_end(r)
    bounds = np.r_[starts, nbits]
    if np.any(np.diff(bounds) < 0):
        raise r.fail("lane offsets are not increasing within the bitstream")
    return _decode_lanes(data, code, n, block, starts, bounds[1:], dtype, r)


def _expect_end(r: _Reader) -> None:
    if r.pos != len(r.buf):
        raise r.fail(f"{len(r.buf) - r.pos} unexpected trailing bytes")


def _decode_lanes(data: bytes, code: Code, n: int, block: int, starts: np.ndarray,
                  ends: np.ndarray, dtype: np.dtype, r: _Reader) -> np.ndarray:
    width = code.max_len
    used = np.flatnonzero(code.lengths)
    order = used[np.argsort(code.codes[used].astype(np.int64) << (width - code.lengths[used]))]
    reps = np.int64(1) << (width - code.lengths[order].astype(np.int64))
    lut_sym = np.full(1 << width, code.alphabet, np.uint32)  # sentinel: prefix of no codeword
    lut_len = np.zeros(1 << width, np.int64)
    filled = int(reps.sum())
    lut_sym[:filled] = np.repeat(order, reps)
    lut_len[:filled] = np.repeat(code.lengths[order].astype(np.int64), reps)
    win = _window(data)
    n_lanes = len(starts)
    last = n - (n_lanes - 1) * block  # the last lane may be short
    out = np.empty((n_lanes, min(block, n)), np.uint32)
    pos = starts.copy()
    for t in range(min(block, n)):
        k = n_lanes if t < last else n_lanes - 1
        p = pos[:k]
        v = _peek(win, p, width)
        out[:k, t] = lut_sym[v]
        p += lut_len[v]
    if not np.array_equal(pos, ends):
        bad = int(np.flatnonzero(pos != ends)[0])
        raise r.fail(f"lane {bad} ends at bit {int(pos[bad])}, expected {int(ends[bad])} (corrupt bits)")
    flat = out.reshape(-1)[:n] if last == out.shape[1] else np.concatenate(
        [out[:-1].reshape(-1), out[-1, :last]])
    if n and int(flat.max()) >= code.alphabet:
        raise r.fail("bitstream holds a bit pattern that is no codeword")
    return flat.astype(dtype)
