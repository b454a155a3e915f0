"""Demo stage: exit heads on the digits baseline (lenet300), trained on the frozen backbone,
thresholds calibrated on the validation split to 1 accuracy point; real skipping at run time."""

from __future__ import annotations

from deepshrink.checkpoint import save
from deepshrink.demo.context import DemoContext
from deepshrink.early_exit import (
    CalibrationConfig,
    ExitConfig,
    ExitTrainConfig,
    add_exits,
    calibrate,
    evaluate_exits,
    train_exits,
)
from deepshrink.train import TrainConfig


def demo_stage(ctx: DemoContext) -> None:
    original = ctx.fresh_baseline()
    multi = add_exits(ctx.fresh_baseline(), ExitConfig(hidden=32), example_inputs=ctx.example(2))
    tc = TrainConfig(epochs=10 if ctx.quick else 30, batch_size=64, lr=5e-3, seed=0, progress=False)
    train_exits(multi, ctx.data, ExitTrainConfig(mode="heads", train=tc))
    cal = calibrate(multi, CalibrationConfig(budget=1.0), calibration=ctx.data, reference=original)
    rep = evaluate_exits(multi, ctx.data.loader("test", 512), costs=cal.costs)
    path = save(multi, ctx.out_dir / "early_exit.safetensors", extra={"test": rep.to_dict()})
    measured = ctx.measure(multi, "early-exit", file=path)
    measured.macs = round(rep.mean_macs)  # mean over the test split, not one sample's path
    shares = "/".join(f"{100 * s:.0f}" for s in rep.shares)
    ctx.add_row("early exits (budget 1 pt)", measured, exit_shares=shares)
