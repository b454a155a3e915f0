"""The main job: train a reference model on the embedded `digits` data, then run every
compression technique built so far on it and print one table of measured results.

Each technique family contributes a stage: a function ``stage(ctx) -> None`` that compresses
``ctx.baseline`` (never modifying it), measures the result with :func:`ctx.measure`, and appends
its row(s) with :meth:`DemoContext.add_row`. Stages are listed in :data:`STAGES` in pipeline order.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.checkpoint import save
from deepshrink.data import DataBundle, load_digits
from deepshrink.measure import ModelReport, ResultTable, compare_latency, measure_model
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, train

# "module:function" of each stage, in pipeline order. A family adds its line here.
STAGES: list[str] = [
    "deepshrink.pruning.demo:demo_stage",
    "deepshrink.pruning.structured_demo:demo_stage",
    "deepshrink.sharing.demo:demo_stage",
    "deepshrink.distill.demo:demo_stage",
    "deepshrink.quantization.demo:demo_stage",
    "deepshrink.early_exit.demo:demo_stage",
]

LATENCY_BATCHES = (1, 256)


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


def run_demo(out_dir: str | Path = "demo-out", *, quick: bool = False, seed: int = 0,
             progress: bool = True, stages: list[str] | None = None,
             threads: int | None = None) -> ResultTable:
    """Train the baseline, run every stage, time every model in one run, return the table.

    ``threads`` fixes torch's intra-op thread count for the whole run (recorded in the title);
    on a busy machine one thread gives far steadier batch-1 latencies.
    """
    t0 = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    torch.manual_seed(seed)
    model = create_model("lenet300", in_size=data.in_size, num_classes=data.num_classes)
    cfg = TrainConfig(epochs=15 if quick else 40, batch_size=64, lr=2e-3, seed=seed,
                      progress=progress, keep_best=True)
    train(model, data, cfg)
    save(model, out / "baseline.safetensors")
    table = ResultTable("deepshrink demo: lenet300 on digits (held-out test split)")
    ctx = DemoContext(data, model, ModelReport("", 0, 0, 0, 0, 0), out, table, quick)
    ctx.baseline_report = ctx.measure(model, "baseline", file=out / "baseline.safetensors")
    ctx.add_row("baseline (fp32)", ctx.baseline_report)
    for ref in STAGES if stages is None else stages:
        module_name, _, fn_name = ref.partition(":")
        getattr(importlib.import_module(module_name), fn_name)(ctx)
    # Latency: every model in one interleaved run, ratios against the fp32 baseline.
    for b in LATENCY_BATCHES:
        x = ctx.example(1).expand(b, *data.input_shape).contiguous()
        lats = compare_latency(ctx.models, x, rounds=2, repeats=20)
        base_ms = lats["baseline"].median_ms
        for row, name in zip(table.rows, ctx.models, strict=True):
            row[f"ms@b{b}"] = lats[name].median_ms
            row[f"speedup@b{b}"] = base_ms / lats[name].median_ms
    table.title += f" — {time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads"
    (out / "demo.json").write_text(table.to_json())
    return table
