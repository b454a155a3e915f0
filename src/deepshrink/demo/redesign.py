"""Demo stage: low-rank factorization of the digits baseline (lenet300) at a third of its
parameters, ranks spread by measured sensitivity, then KD fine-tuning from the original."""

from __future__ import annotations

from deepshrink.checkpoint import save
from deepshrink.demo.context import DemoContext
from deepshrink.redesign import LowRankConfig, factorize_with_report, recover
from deepshrink.train import TrainConfig


def demo_stage(ctx: DemoContext) -> None:
    original = ctx.fresh_baseline()
    model = ctx.fresh_baseline()
    cfg = LowRankConfig(budget=0.33, calibration_batches=8)
    report = factorize_with_report(model, cfg, calibration=ctx.data)
    tc = TrainConfig(epochs=5 if ctx.quick else 15, batch_size=64, lr=1e-3, seed=0, progress=False)
    recover(model, ctx.data, tc, teacher=original)
    path = save(model, ctx.out_dir / "lowrank.safetensors",
                extra={"redesign": report.to_dict(), "train": tc.to_dict()})
    ranks = ", ".join(f"{r.name}:{r.rank[0]}" for r in report.rewritten)
    ctx.add_row(f"low-rank (1/3 params; ranks {ranks}) + KD", ctx.measure(model, "lowrank", file=path))
