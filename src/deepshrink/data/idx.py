"""Reader for IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

Layout: 2 zero bytes, a type code, the number of dimensions, one big-endian uint32 per dimension,
then the data. Every size is checked against the bytes actually present before allocating.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from deepshrink.errors import DataError

_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_ELEMENTS = 1 << 31  # refuse absurd headers before allocating


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file into a numpy array (native byte order). Raises :class:`DataError`
    naming the file and the problem (bad magic, bad type code, truncated data, trailing bytes)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip stream: {exc}") from exc
    return parse_idx(raw, str(path))


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    if len(raw) < 4:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} bytes, need at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: bad IDX magic number {raw[:4].hex()} (must start with 0000)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _TYPES:
        raise DataError(f"{name}: unknown IDX type code 0x{type_code:02x} at offset 2")
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions at offset 3")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{name}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
                        f"file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    count = 1
    for d in dims:
        count *= d
    if count > MAX_ELEMENTS:
        raise DataError(f"{name}: IDX dimensions {dims} are implausibly large")
    dtype = _TYPES[type_code]
    need = header_len + count * dtype.itemsize
    if len(raw) < need:
        raise DataError(f"{name}: truncated: dimensions {dims} need {need} bytes, file has {len(raw)}")
    if len(raw) > need:
        raise DataError(f"{name}: {len(raw) - need} unexpected trailing bytes after offset {need}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an IDX file (gzip-compressed when the name ends in .gz). Used by tests and tools."""
    codes = {v.newbyteorder("=").str: k for k, v in _TYPES.items()}
    arr = np.asarray(array)
    key = arr.dtype.newbyteorder("=").str
    if key not in codes:
        raise DataError(f"IDX cannot store dtype {arr.dtype}")
    code = codes[key]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = arr.astype(_TYPES[code], copy=False).tobytes()
    data = header + body
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
