"""Demo stage: channel (neuron) pruning of the demo's LeNet-300-100 (digits): half of the hidden
neurons removed, a short fine-tune, saved as a physically smaller model and measured from that
file (deepshrink.load rebuilds the smaller architecture from the recorded edit)."""

from __future__ import annotations

from typing import Any

from deepshrink.checkpoint import load, save
from deepshrink.pruning.structured import ChannelConfig, prune_channels
from deepshrink.train import TrainConfig, train

DEMO_CONFIG = ChannelConfig(ratio=0.5, importance="activation", calibration_batches=4)


def demo_stage(ctx: Any) -> None:
    """Remove 50 % of the hidden neurons (300 -> 150, 100 -> 50), fine-tune, add the row."""
    model = ctx.fresh_baseline()
    calib = ctx.data.loader("train", 128, shuffle=True, seed=0)
    prune_channels(model, DEMO_CONFIG, example_inputs=ctx.example(2), calibration=calib)
    ft = TrainConfig(epochs=6 if ctx.quick else 12, batch_size=64, lr=2e-3, scheduler="cosine",
                     keep_best=True, progress=False)
    train(model, ctx.data, ft)
    path = save(model, ctx.out_dir / "pruned-channels.safetensors",
                extra={"pruning": DEMO_CONFIG.to_dict(), "dataset": ctx.data.name})
    rep = ctx.measure(load(path), "pruned-channels", file=path)
    hidden = [m.out_features for m in model if hasattr(m, "out_features")][:-1]
    ctx.add_row(f"pruned (channels 50%: {'-'.join(map(str, hidden))} neurons)", rep)
