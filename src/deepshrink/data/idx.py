"""Reader for IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

Layout: 2 zero bytes, a type code, the number of dimensions, one big-endian uint32 per dimension,
then the data. Every size is checked against the bytes actually present before allocating.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from deepshrink.errors import DataError, FormatError

_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_ELEMENTS = 1 << 28  # refuse absurd headers before allocating (Fashion-MNIST: 47M)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file into a numpy array (native byte order). Raises :class:`FormatError`
    naming the file and the problem (bad magic, bad type code, truncated data, trailing bytes,
    a corrupt gzip stream); a gzip file is never inflated beyond what its header declares."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(2)
            f.seek(0)
            raw = _read_gzip(f, str(path)) if magic == b"\x1f\x8b" else _read_bounded(f, str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_idx(raw, str(path))


def _read_gzip(f: BinaryIO, name: str) -> bytes:
    """Inflate just enough (see :func:`_read_bounded`): a gzip bomb costs no more memory than an
    honest file with its header."""
    try:
        with gzip.GzipFile(fileobj=f) as g:
            return _read_bounded(g, name)
    except (OSError, EOFError, zlib.error) as exc:
        raise FormatError(f"{name}: corrupt gzip stream: {exc}") from exc


def _read_bounded(f: BinaryIO, name: str) -> bytes:
    """The header, then at most the data bytes it declares plus one (to detect trailing data)."""
    head = f.read(4)
    if len(head) == 4 and head[:2] == b"\0\0" and head[2] in _TYPES:
        head += f.read(4 * head[3])
    need = _data_bytes(head, name) if len(head) >= 4 else 0
    return head + f.read(need + 1)


def _data_bytes(head: bytes, name: str) -> int:
    """Bytes of data a (possibly truncated) header declares; 0 when the header is unusable."""
    if head[:2] != b"\0\0" or head[2] not in _TYPES or head[3] == 0 or len(head) < 4 + 4 * head[3]:
        return 0
    dims = struct.unpack(f">{head[3]}I", head[4 : 4 + 4 * head[3]])
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise FormatError(f"{name}: IDX dimensions {dims} are implausibly large")
    return count * _TYPES[head[2]].itemsize


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    if len(raw) < 4:
        raise FormatError(f"{name}: truncated IDX header ({len(raw)} bytes, need at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise FormatError(f"{name}: bad IDX magic number {raw[:4].hex()} (must start with 0000)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _TYPES:
        raise FormatError(f"{name}: unknown IDX type code 0x{type_code:02x} at offset 2")
    if ndim == 0:
        raise FormatError(f"{name}: IDX header declares 0 dimensions at offset 3")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise FormatError(f"{name}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
                          f"file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise FormatError(f"{name}: IDX dimensions {dims} are implausibly large")
    dtype = _TYPES[type_code]
    need = header_len + count * dtype.itemsize
    if len(raw) < need:
        raise FormatError(f"{name}: truncated: dimensions {dims} need {need} bytes, file has {len(raw)}")
    if len(raw) > need:
        raise FormatError(f"{name}: unexpected trailing bytes after offset {need}")
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
