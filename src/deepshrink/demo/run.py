"""The main job: train a reference model on the embedded `digits` data, then run every
compression technique on it and print one table of measured results.

Each technique family contributes a stage: a function ``stage(ctx) -> None`` that compresses
``ctx.baseline`` (never modifying it), measures the result with :meth:`DemoContext.measure`, and
appends its row(s) with :meth:`DemoContext.add_row`. The stages are listed in
:data:`deepshrink.demo.STAGES` in pipeline order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from deepshrink.checkpoint import save
from deepshrink.data import data_record, load_digits
from deepshrink.demo import (
    channels,
    distill,
    early_exit,
    quantization,
    redesign,
    sharing,
    unstructured,
    workflow,
)
from deepshrink.demo.context import DemoContext
from deepshrink.measure import ModelReport, ResultTable, compare_latency, speedup
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, train

Stage = Callable[[DemoContext], None]
LATENCY_BATCHES = (1, 256)

#: The stages in pipeline order. A family adds its stage module beside this one and a line here.
STAGES: list[Stage] = [
    unstructured.demo_stage,
    channels.demo_stage,
    sharing.demo_stage,
    distill.demo_stage,
    redesign.demo_stage,
    quantization.demo_stage,
    early_exit.demo_stage,
    workflow.demo_stage,
]


def train_baseline(out: Path, *, quick: bool, seed: int, progress: bool) -> DemoContext:
    """Train lenet300 on digits, save it, and return a context holding it and its first row."""
    data = load_digits()
    torch.manual_seed(seed)
    model = create_model("lenet300", in_size=data.in_size, num_classes=data.num_classes)
    cfg = TrainConfig(epochs=15 if quick else 40, batch_size=64, lr=2e-3, seed=seed,
                      progress=progress, keep_best=True)
    train(model, data, cfg)
    save(model, out / "baseline.safetensors", extra={"data": data_record(data).to_dict()})
    table = ResultTable("deepshrink demo: lenet300 on digits (held-out test split)")
    ctx = DemoContext(data, model, ModelReport("", 0, 0, 0, 0, 0), out, table, quick)
    ctx.baseline_report = ctx.measure(model, "baseline", file=out / "baseline.safetensors")
    ctx.add_row("baseline (fp32)", ctx.baseline_report)
    return ctx


def time_all(ctx: DemoContext) -> None:
    """Latency of every model in one interleaved run, as ratios against the fp32 baseline."""
    for b in LATENCY_BATCHES:
        x = ctx.example(1).expand(b, *ctx.data.input_shape).contiguous()
        lats = compare_latency(ctx.models, x, rounds=2, repeats=20)
        for row, name in zip(ctx.table.rows, ctx.models, strict=True):
            s = speedup(lats["baseline"], lats[name])
            row[f"ms@b{b}"] = lats[name].median_ms
            # A ratio whose p10/p90 spread overlaps 1.0 is not a measured difference: say so.
            row[f"speedup@b{b}"] = "~1 (noise)" if s.overlaps_one and name != "baseline" else s.ratio


def run_demo(out_dir: str | Path = "demo-out", *, quick: bool = False, seed: int = 0,
             progress: bool = True, stages: Sequence[Stage] | None = None,
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
    ctx = train_baseline(out, quick=quick, seed=seed, progress=progress)
    for stage in STAGES if stages is None else stages:
        stage(ctx)
    time_all(ctx)
    ctx.table.title += f" — {time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads"
    (out / "demo.json").write_text(ctx.table.to_json())
    write_demo_report(ctx)
    return ctx.table


def write_demo_report(ctx: DemoContext) -> None:
    """The run's HTML report: the workflow stage's measured recipe run, plus the demo table."""
    results = ctx.shared.get("workflow_results")
    if results is None:  # the workflow stage was not among the stages run
        return
    from deepshrink.report import write_report

    write_report({**results, "demo_table": ctx.table.to_dict()}, ctx.out_dir / "report.html")
