"""Demo stage: static int8 PTQ run in ONNX Runtime, and 4-bit weight-only QAT (packed file)."""

from __future__ import annotations

from typing import Any

from deepshrink.checkpoint import save
from deepshrink.quantization.onnx_export import export_onnx
from deepshrink.quantization.ort import OrtModel
from deepshrink.quantization.ptq import PTQConfig, quantize
from deepshrink.quantization.qat import QATConfig, convert, prepare_qat
from deepshrink.train import TrainConfig, train


def demo_stage(ctx: Any) -> None:
    # Static int8: calibrated on training batches, exported, executed by ONNX Runtime (1 thread).
    q8 = quantize(ctx.fresh_baseline(), PTQConfig(mode="static", bits=8), calibration=ctx.data)
    onnx_path = ctx.out_dir / "lenet300-int8.onnx"
    export_onnx(q8, onnx_path, ctx.example(2))
    rep = ctx.measure(q8, "quant-int8-static", file=onnx_path, runner=OrtModel(onnx_path, threads=1))
    ctx.add_row("quantize: int8 static (ONNX Runtime)", rep)

    # 4-bit weights: short QAT in the shared loop, saved as packed safetensors.
    m = prepare_qat(ctx.fresh_baseline(), QATConfig(bits=4, act_bits=None))
    train(m, ctx.data, TrainConfig(epochs=2 if ctx.quick else 5, batch_size=64, lr=5e-4,
                                   progress=False, seed=0))
    convert(m)
    w4_path = ctx.out_dir / "lenet300-w4.safetensors"
    save(m, w4_path)
    rep = ctx.measure(m, "quant-w4-qat", file=w4_path)
    ctx.add_row("quantize: 4-bit weights, QAT (packed)", rep)
