"""The .dsz container: a manifest plus checksummed byte sections, nothing executable.

Layout (all integers little-endian)::

    offset 0   8 bytes  magic  b"\\x89DSZ\\r\\n\\x1a\\n"  (PNG-style: catches text-mode mangling)
           8   u16      format version (1)
          10   u16      flags (bit 0: manifest is raw-deflate compressed)
          12   u32      manifest length M (bytes as stored)
          16   u32      CRC32 of the stored manifest
          20   u64      data length D
          28   M bytes  manifest: UTF-8 JSON object (see below), maybe deflated
        28+M   D bytes  sections, back to back, in manifest order
      28+M+D   u32      CRC32 of every byte before it
               4 bytes  end magic b"DSZ!"

The manifest holds ``format``/``version``, the model ``spec`` (how to rebuild the architecture),
free ``extra`` metadata, ``tensors`` (see :mod:`deepshrink.dsz.codec`) and ``sections``: one
``{"offset", "length", "crc32", "codec"}`` per section, offsets relative to the data start.

:func:`read_container` checks the header, every length and offset against the real file size,
the manifest and every section checksum and the whole-file checksum before returning anything;
sizes are capped (``MAX_MANIFEST``); JSON is the only thing parsed; nothing is unpickled.
Errors are :class:`FormatError` naming the file, the section and the byte offset.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path
from typing import Any

from deepshrink.errors import FormatError
from deepshrink.fileio import atomic_path

MAGIC = b"\x89DSZ\r\n\x1a\n"
END_MAGIC = b"DSZ!"
VERSION = 1
FLAG_DEFLATE = 1
HEADER = struct.Struct("<8sHHIIQ")  # 28 bytes
TRAILER = struct.Struct("<I4s")  # 8 bytes
MAX_MANIFEST = 64 << 20  # decompressed manifest bytes
MAX_SECTIONS = 1 << 20
MAX_FILE = 1 << 36  # 64 GiB


@dataclasses.dataclass
class Container:
    """A parsed, checksum-verified .dsz file: its manifest and the bytes of each section."""

    manifest: dict[str, Any]
    sections: list[bytes]
    data_offset: int  # file offset of section 0, for error messages
    size: int  # file bytes
    where: str  # the file name, for error messages

    def section(self, i: Any, field: str) -> tuple[bytes, int]:
        """(bytes, file offset) of section ``i``, validating the reference from ``field``."""
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.sections):
            raise FormatError(f"{self.where}: manifest {field} = {i!r} is not a section number "
                              f"(0..{len(self.sections) - 1})")
        return self.sections[i], self.data_offset + self.manifest["sections"][i]["offset"]


def write_container(path: str | Path, manifest: dict[str, Any], sections: list[tuple[bytes, str]],
                    *, protect: tuple[str | Path, ...] = ()) -> int:
    """Write ``manifest`` and ``(bytes, codec name)`` sections atomically; returns file bytes.

    The ``sections`` table of the manifest is filled in here.
    """
    table, off = [], 0
    for data, codec in sections:
        table.append({"offset": off, "length": len(data), "crc32": zlib.crc32(data), "codec": codec})
        off += len(data)
    manifest = {**manifest, "sections": table}
    raw = json.dumps(manifest, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    stored = comp.compress(raw) + comp.flush()
    head = HEADER.pack(MAGIC, VERSION, FLAG_DEFLATE, len(stored), zlib.crc32(stored), off)
    body = b"".join([head, stored, *(d for d, _ in sections)])
    blob = body + TRAILER.pack(zlib.crc32(body), END_MAGIC)
    with atomic_path(path, protect=protect) as tmp:
        tmp.write_bytes(blob)
    return len(blob)


def is_dsz(head: bytes) -> bool:
    return head[: len(MAGIC)] == MAGIC


def read_container(source: str | Path | bytes, *, name: str | None = None) -> Container:
    """Parse and verify a .dsz file (path or bytes). Raises :class:`FormatError`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        blob, where = bytes(source), name or "<bytes>"
    else:
        path = Path(source)
        where = name or str(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise FormatError(f"{where}: cannot read: {exc}") from exc
        if size > MAX_FILE:
            raise FormatError(f"{where}: {size} bytes exceeds the {MAX_FILE}-byte limit")
        blob = path.read_bytes()
    size = len(blob)
    if size < HEADER.size + TRAILER.size:
        raise FormatError(f"{where}: truncated: {size} bytes is shorter than header and trailer "
                          f"({HEADER.size + TRAILER.size})")
    magic, version, flags, mlen, mcrc, dlen = HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise FormatError(f"{where}: bad magic {magic!r} at offset 0 (not a .dsz file)")
    if version != VERSION:
        raise FormatError(f"{where}: format version {version} at offset 8 is not supported "
                          f"(this reader knows version {VERSION})")
    if flags & ~FLAG_DEFLATE:
        raise FormatError(f"{where}: unknown flags {flags:#x} at offset 10")
    expected = HEADER.size + mlen + dlen + TRAILER.size
    if expected != size:
        raise FormatError(f"{where}: header declares manifest {mlen} + data {dlen} bytes (offsets 12, "
                          f"20), i.e. a {expected}-byte file, but the file has {size} bytes "
                          f"(truncated or padded)")
    crc, end = TRAILER.unpack_from(blob, size - TRAILER.size)
    if end != END_MAGIC:
        raise FormatError(f"{where}: bad end magic {end!r} at offset {size - 4}")
    stored = blob[HEADER.size : HEADER.size + mlen]
    if zlib.crc32(stored) != mcrc:
        raise FormatError(f"{where}: manifest checksum mismatch (manifest at offset {HEADER.size}, "
                          f"{mlen} bytes)")
    manifest = _parse_manifest(stored, bool(flags & FLAG_DEFLATE), where)
    data_off = HEADER.size + mlen
    sections = _check_sections(manifest, blob, data_off, dlen, where)
    if zlib.crc32(blob[: size - TRAILER.size]) != crc:
        raise FormatError(f"{where}: whole-file checksum mismatch (trailer at offset {size - 8})")
    return Container(manifest, sections, data_off, size, where)


def _parse_manifest(stored: bytes, deflated: bool, where: str) -> dict[str, Any]:
    raw = stored
    if deflated:
        d = zlib.decompressobj(-15)
        try:
            raw = d.decompress(stored, MAX_MANIFEST)
        except zlib.error as exc:
            raise FormatError(f"{where}: manifest at offset {HEADER.size} does not inflate: {exc}") from exc
        if d.unconsumed_tail:
            raise FormatError(f"{where}: manifest inflates beyond the {MAX_MANIFEST}-byte limit")
        if not d.eof or d.unused_data:
            raise FormatError(f"{where}: manifest at offset {HEADER.size} is an incomplete or "
                              f"padded deflate stream")
    elif len(raw) > MAX_MANIFEST:
        raise FormatError(f"{where}: manifest of {len(raw)} bytes exceeds {MAX_MANIFEST}")
    try:
        manifest = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: manifest at offset {HEADER.size} is not valid JSON: "
                          f"{str(exc)[:200]}") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{where}: manifest is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != "deepshrink-dsz" or manifest.get("version") != VERSION:
        raise FormatError(f"{where}: manifest format/version is {manifest.get('format')!r}/"
                          f"{manifest.get('version')!r}, expected 'deepshrink-dsz'/{VERSION}")
    return manifest


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name} in JSON")


def _check_sections(manifest: dict[str, Any], blob: bytes, data_off: int, dlen: int,
                    where: str) -> list[bytes]:
    table = manifest.get("sections")
    if not isinstance(table, list) or len(table) > MAX_SECTIONS:
        raise FormatError(f"{where}: manifest 'sections' must be a list of at most {MAX_SECTIONS}")
    out, expect = [], 0
    for i, s in enumerate(table):
        if not isinstance(s, dict):
            raise FormatError(f"{where}: section {i} entry is not an object")
        vals = [s.get(k) for k in ("offset", "length", "crc32")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
            raise FormatError(f"{where}: section {i} needs non-negative integer offset/length/crc32, "
                              f"got {vals!r:.120}")
        off, length, crc = vals
        if off != expect:
            raise FormatError(f"{where}: section {i} starts at data offset {off}, expected {expect} "
                              f"(sections must be contiguous)")
        if off + length > dlen:
            raise FormatError(f"{where}: section {i} (data offset {off}, {length} bytes) runs past "
                              f"the {dlen}-byte data area")
        data = blob[data_off + off : data_off + off + length]
        if zlib.crc32(data) != crc:
            raise FormatError(f"{where}: section {i} checksum mismatch (file offset {data_off + off}, "
                              f"{length} bytes)")
        out.append(data)
        expect = off + length
    if expect != dlen:
        raise FormatError(f"{where}: sections cover {expect} of the {dlen} data bytes")
    return out
