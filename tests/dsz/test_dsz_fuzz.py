"""Property-based: random and mutated .dsz files give FormatError — never another exception, a hang
or a huge allocation. Mutations that keep the checksums valid reach the manifest and stream
decoders, not just the CRC checks."""

from __future__ import annotations

import copy
import json
import struct
import tracemalloc
import zlib
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepshrink.dsz import PackConfig, pack, read_dsz
from deepshrink.dsz.format import END_MAGIC, FLAG_DEFLATE, HEADER, MAGIC, TRAILER, VERSION, read_container
from deepshrink.errors import FormatError
from deepshrink.models import create_model
from deepshrink.sharing import KMeansConfig, share

SETTINGS = settings(max_examples=200, deadline=3000, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PEAK_LIMIT = 160 << 20  # numpy allocations while reading one small hostile file


def _valid_file(cfg: PackConfig) -> bytes:
    """A small pruned + shared MLP (small streams keep each example fast)."""
    import tempfile
    from pathlib import Path

    torch.manual_seed(0)
    m = create_model("mlp", in_size=5, hidden=24, num_classes=4)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p[p.abs() < p.abs().quantile(0.7)] = 0
    share(m, KMeansConfig(bits=3, overrides={"4": 0}))  # one layer stays raw sparse
    with tempfile.TemporaryDirectory() as d:
        pack(m, Path(d) / "m.dsz", cfg)
        return (Path(d) / "m.dsz").read_bytes()


# Huffman with auto index choice (relative/dense), and fixed-width codes with CSR indices.
VALIDS = [_valid_file(PackConfig(block=64)), _valid_file(PackConfig(entropy="fixed", index="csr"))]
VALID = VALIDS[0]
PARSED = read_container(VALID)
PARSED_ALL = [read_container(v) for v in VALIDS]


def build(manifest: dict[str, Any], sections: list[bytes], *, fix_table: bool = True) -> bytes:
    """A container with correct checksums around whatever manifest and sections are given."""
    manifest = copy.deepcopy(manifest)
    old_table = manifest.get("sections")
    if fix_table and isinstance(old_table, list):
        off, table = 0, []
        for i, data in enumerate(sections):
            old = old_table[i] if i < len(old_table) and isinstance(old_table[i], dict) else {}
            table.append({**old, "offset": off, "length": len(data), "crc32": zlib.crc32(data)})
            off += len(data)
        manifest["sections"] = table
    raw = json.dumps(manifest).encode()
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    stored = c.compress(raw) + c.flush()
    data = b"".join(sections)
    body = HEADER.pack(MAGIC, VERSION, FLAG_DEFLATE, len(stored), zlib.crc32(stored), len(data)) + \
        stored + data
    return body + TRAILER.pack(zlib.crc32(body), END_MAGIC)


def read_only_format_errors(blob: bytes) -> None:
    tracemalloc.start()
    try:
        read_dsz(blob)
    except FormatError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"reading allocated {peak} bytes"


@pytest.mark.parametrize("which", [0, 1])
def test_valid_files_read_and_rebuild_identically(which: int) -> None:
    c = PARSED_ALL[which]
    kinds = {t["index"]["kind"] for t in c.manifest["tensors"] if "index" in t}
    assert kinds >= ({"relative", "dense"} if which == 0 else {"csr"})
    a, b = read_dsz(VALIDS[which]), read_dsz(build(c.manifest, c.sections))
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@SETTINGS
@given(st.binary(max_size=4000), st.booleans())
def test_random_bytes(blob: bytes, with_magic: bool) -> None:
    read_only_format_errors((MAGIC + blob) if with_magic else blob)


@SETTINGS
@given(st.lists(st.integers(0, 8 * len(VALID) - 1), min_size=1, max_size=8, unique=True))
def test_bit_flips(bits: list[int]) -> None:
    blob = bytearray(VALID)
    for b in bits:
        blob[b // 8] ^= 1 << (b % 8)
    with pytest.raises(FormatError):
        read_dsz(bytes(blob))


@SETTINGS
@given(st.integers(0, len(VALID) - 1))
def test_truncation(n: int) -> None:
    with pytest.raises(FormatError):
        read_dsz(VALID[:n])


@SETTINGS
@given(st.sampled_from([8, 10, 12, 16, 20]), st.integers(0, 2**64 - 1))
def test_header_field_edits(offset: int, value: int) -> None:
    fmt = {8: "<H", 10: "<H", 12: "<I", 16: "<I", 20: "<Q"}[offset]
    value %= 1 << (8 * struct.calcsize(fmt))
    blob = bytearray(VALID)
    struct.pack_into(fmt, blob, offset, value)
    read_only_format_errors(bytes(blob))


HOSTILE = st.one_of(
    st.integers(-2, 3), st.sampled_from([2**31, 2**32 + 1, 2**40, 2**62, 2**70, -(2**63)]),
    st.sampled_from(["C", "F", "dense", "relative", "csr", "raw", "shared", "float16", "bool", "x"]),
    st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(0, 2**33), max_size=4), st.just({}), st.just([[[[]]]]),
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@SETTINGS
@given(st.sampled_from([0, 1]), st.data(), st.booleans())
def test_manifest_edits_with_valid_checksums(which: int, data: st.DataObject, fix_table: bool) -> None:
    parsed = PARSED_ALL[which]
    paths = [p for p in _paths(parsed.manifest) if p[0] in ("tensors", "sections", "spec")]
    edits = data.draw(st.lists(st.tuples(st.sampled_from(paths), HOSTILE), min_size=1, max_size=3))
    manifest = copy.deepcopy(parsed.manifest)
    for path, value in edits:
        node = manifest
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced a parent
    read_only_format_errors(build(manifest, parsed.sections, fix_table=fix_table))


@SETTINGS
@given(st.sampled_from([0, 1]), st.data())
def test_section_edits_with_valid_checksums(which: int, data: st.DataObject) -> None:
    parsed = PARSED_ALL[which]
    index = data.draw(st.integers(0, len(parsed.sections) - 1))
    sections = list(parsed.sections)
    sec = bytearray(sections[index])
    action = data.draw(st.sampled_from(["flip", "cut", "grow", "replace"]))
    if action == "flip" and sec:
        for _ in range(data.draw(st.integers(1, 4))):
            sec[data.draw(st.integers(0, len(sec) - 1))] ^= data.draw(st.integers(1, 255))
    elif action == "cut":
        del sec[data.draw(st.integers(0, len(sec))):]
    elif action == "grow":
        sec += data.draw(st.binary(min_size=1, max_size=64))
    else:
        sec = bytearray(data.draw(st.binary(max_size=64)))
    sections[index] = bytes(sec)
    read_only_format_errors(build(parsed.manifest, sections))
