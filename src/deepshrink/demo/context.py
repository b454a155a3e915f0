"""What every demo stage receives: the data, the trained baseline, and the results table."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.data import DataBundle
from deepshrink.measure import ModelReport, ResultTable, measure_model


@dataclasses.dataclass
class DemoContext:
    data: DataBundle
    baseline: nn.Module
    baseline_report: ModelReport
    out_dir: Path
    table: ResultTable
    quick: bool = False
    models: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> callable, timed together
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)  # hand-offs between stages

    def fresh_baseline(self) -> nn.Module:
        """A copy of the trained baseline that a stage may modify freely."""
        return copy.deepcopy(self.baseline)

    def example(self, n: int = 1) -> torch.Tensor:
        return self.data.test.tensors[0][:n]

    def measure(self, model: nn.Module, name: str, *, file: Path | None = None,
                runner: Callable[[torch.Tensor], Any] | None = None) -> ModelReport:
        """Accuracy on the held-out test split, counts and bytes (latency is timed at the end,
        interleaved with the baseline, so every speedup is a ratio from one run)."""
        rep = measure_model(model, self.example(), name=name, loader=self.data.loader("test", 512),
                            file=file, latency_batches=(), runner=runner)
        self.models[name] = runner or model
        return rep

    def add_row(self, stage: str, rep: ModelReport, **extra: Any) -> None:
        base = self.baseline_report
        self.table.add(stage=stage, nonzero=rep.nonzero, bytes=rep.bytes,
                       size_ratio=base.bytes / rep.bytes, MACs=rep.macs, top1=rep.top1,
                       drop_pt=100 * ((base.top1 or 0) - (rep.top1 or 0)), **extra)
