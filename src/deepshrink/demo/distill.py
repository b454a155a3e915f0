"""Demo stage: distil the digits baseline (lenet300) into a small MLP (one hidden layer of 32)."""

from __future__ import annotations

import torch

from deepshrink.checkpoint import save
from deepshrink.demo.context import DemoContext
from deepshrink.distill.api import KDConfig, distill
from deepshrink.models import create_model
from deepshrink.train import TrainConfig


def demo_stage(ctx: DemoContext) -> None:
    teacher = ctx.fresh_baseline()
    torch.manual_seed(0)
    student = create_model("mlp", in_size=ctx.data.in_size, hidden=32, num_classes=ctx.data.num_classes)
    kd = KDConfig(temperature=4.0, alpha=0.9)  # teacher logits cached once, reused every epoch
    tc = TrainConfig(epochs=20 if ctx.quick else 60, batch_size=64, lr=3e-3, seed=0, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2x1000-param MLP: extra threads only cost barrier waits
    try:
        distill(student, kd, teacher=teacher, data=ctx.data, train_config=tc)
    finally:
        torch.set_num_threads(threads)
    path = save(student, ctx.out_dir / "distilled_mlp32.safetensors",
                extra={"distill": kd.to_dict(), "train": tc.to_dict(), "teacher": "baseline"})
    rep = ctx.measure(student, "distilled-mlp32", file=path)
    ctx.add_row("distilled student (mlp-32)", rep)
