"""One measurement object for every report: it renders as a rich table and as JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.measure.counts import LayerStats, count_macs, count_params, layer_stats
from deepshrink.measure.latency import Latency, measure_latency
from deepshrink.measure.size import file_bytes, fp32_safetensors_bytes
from deepshrink.modeling import Inputs, as_inputs, select, tile
from deepshrink.train import evaluate


@dataclasses.dataclass
class ModelReport:
    """Everything measured about one model. ``bytes`` is a real file size: the model's own
    compressed file when given, else its fp32 safetensors serialization."""

    name: str
    params: int
    nonzero: int
    macs: int | None  # None: not countable here (an ONNX graph has no torch layers to count)
    bytes: int
    fp32_bytes: int
    top1: float | None = None
    top5: float | None = None
    latency: dict[int, Latency] = dataclasses.field(default_factory=dict)
    layers: list[LayerStats] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        d = {
            "name": self.name, "params": self.params, "nonzero": self.nonzero,
            "sparsity": self.sparsity, "macs": self.macs, "bytes": self.bytes,
            "fp32_bytes": self.fp32_bytes, "top1": self.top1, "top5": self.top5,
            "latency": {str(b): lat.to_dict() for b, lat in self.latency.items()},
            "extra": self.extra,
        }
        if layers:
            d["layers"] = [r.to_dict() for r in self.layers]
        return d

    def layer_table(self) -> ResultTable:
        rows = [{"layer": r.name, "type": r.type, "shape": "x".join(map(str, r.shape)),
                 "params": r.params, "nonzero": r.nonzero, "sparsity": r.sparsity, "macs": r.macs}
                for r in self.layers]
        return ResultTable(f"{self.name}: layers", rows)

    def summary_table(self) -> ResultTable:
        row: dict[str, Any] = {"model": self.name, "params": self.params, "nonzero": self.nonzero,
                               "sparsity": self.sparsity, "MACs": "n/a" if self.macs is None else self.macs,
                               "bytes": self.bytes}
        if self.top1 is not None:
            row["top1"] = self.top1
        for b, lat in sorted(self.latency.items()):
            # with its spread: one median means little on a shared machine
            row[f"ms@b{b} (p10-p90)"] = f"{lat.median_ms:.3f} [{lat.p10_ms:.3f}-{lat.p90_ms:.3f}]"
        return ResultTable(f"{self.name}: summary", [row])


def measure_model(model: nn.Module, example: Inputs, *, name: str = "model",
                  loader: DataLoader | None = None, file: str | Path | None = None,
                  latency_batches: Sequence[int] = (1, 256),
                  runner: Callable[[torch.Tensor], Any] | None = None,
                  latency_kw: dict[str, Any] | None = None) -> ModelReport:
    """Measure params, MACs, bytes, accuracy (on ``loader``, a held-out split) and latency.

    ``example`` is one input batch: a tensor, a tuple of positional tensors or a dict of keyword
    tensors (its first row is tiled to each latency batch size).
    ``runner`` replaces ``model`` for accuracy and latency, e.g. an ONNX Runtime session, while
    counts still come from ``model``.
    """
    total, nonzero = count_params(model)
    example = as_inputs(example, "example")
    macs, per_module = count_macs(model, select(example, slice(0, 1)))
    fp32 = fp32_safetensors_bytes(model)
    rep = ModelReport(name, total, nonzero, macs, file_bytes(file) if file else fp32, fp32,
                      layers=layer_stats(model, per_module))
    fn = runner or model
    if loader is not None:
        ev = evaluate(fn, loader)
        rep.top1, rep.top5 = ev["top1"], ev.get("top5")
    for b in latency_batches:
        rep.latency[b] = measure_latency(fn, tile(example, b), **(latency_kw or {}))
    return rep


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if "sparsity" in key or key in ("top1", "top5", "acc") or key.endswith("_top1"):
            return f"{100 * v:.2f}%"
        if key.endswith("x") or "ratio" in key or "speedup" in key:
            return f"{v:.2f}x"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        if key in ("bytes",) or key.endswith("bytes"):
            return _human_bytes(v)
        return f"{v:,}"
    return str(v)


def _human_bytes(n: int) -> str:
    if n < 10_000:
        return f"{n} B"
    if n < 10_000_000:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.2f} MiB"


@dataclasses.dataclass
class ResultTable:
    """Rows of results: rendered for people (rich) and machines (JSON) from the same data."""

    title: str
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols.extend(k for k in r if k not in cols)
        return cols

    def to_rich(self) -> Table:
        t = Table(title=self.title)
        for c in self.columns:
            t.add_column(c, justify="left" if c in ("model", "stage", "layer", "type", "shape")
                         else "right")
        for r in self.rows:
            t.add_row(*(_fmt(c, r.get(c)) for c in self.columns))
        return t

    def print(self, console: Console | None = None) -> None:
        (console or Console()).print(self.to_rich())

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "rows": self.rows}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
