"""Registers the .dsz format with :func:`deepshrink.load`.

Kept free of module-level imports of :mod:`deepshrink.dsz` (which itself imports the sharing
state types), so importing :mod:`deepshrink.sharing` never runs into a circular import.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from deepshrink.checkpoint import register_loader

DSZ_MAGIC = b"\x89DSZ\r\n\x1a\n"


def _sniff(head: bytes, path: Path) -> bool:
    return head[: len(DSZ_MAGIC)] == DSZ_MAGIC


def _load(path: Path) -> nn.Module:
    from deepshrink.dsz.model import load_dsz

    return load_dsz(path)


register_loader("dsz", _sniff, _load)
