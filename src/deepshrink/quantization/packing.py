"""Bit packing: n codes of b bits each in ceil(n * b / 8) bytes (little-endian bit order).

Codes are unsigned (``q - qmin``), so any grid of up to 8 bits packs densely: 3-bit codes
really take 3 bits, not a nibble.
"""

from __future__ import annotations

import numpy as np
import torch

from deepshrink.errors import FormatError


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes in [0, 2^bits) into a 1-D uint8 tensor."""
    c = codes.detach().reshape(-1).to(torch.int64).numpy()
    if c.size and (c.min() < 0 or c.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{c.min()}, {c.max()}]")
    if bits == 8:
        return torch.from_numpy(c.astype(np.uint8))
    planes = ((c[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return torch.from_numpy(np.packbits(planes, bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: n codes as an int16 tensor."""
    data = packed.detach().reshape(-1).numpy().astype(np.uint8)
    if data.size != packed_nbytes(n, bits):
        raise FormatError(f"packed tensor has {data.size} bytes, expected {packed_nbytes(n, bits)} "
                          f"for {n} codes of {bits} bits")
    if bits == 8:
        return torch.from_numpy(data.astype(np.int16))
    planes = np.unpackbits(data, count=n * bits, bitorder="little").reshape(n, bits)
    return torch.from_numpy((planes.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(1)
                            .astype(np.int16))
