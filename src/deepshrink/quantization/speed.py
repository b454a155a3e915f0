"""Does int8 pay, layer by layer, on *this* CPU? Measured, not assumed.

:func:`measure_conv_speed` runs the model once to see every conv's input shape, then times each
conv alone in ONNX Runtime as the float ``Conv`` ORT would run and as the ``QLinearConv`` (uint8
activations, per-channel int8 weights) the quantized export fuses to — interleaved, same threads,
median of rounds. Layers where int8 is not at least ``min_speedup`` faster are returned in
:attr:`SpeedPlan.keep_float`; ``PTQConfig(ignore=plan.patterns())`` keeps them float, and the
ONNX export writes them as ``com.microsoft::FusedConv`` so that ONNX Runtime does not quantize
them itself. Whether the whole model then runs faster (the layout changes and Q/DQ around a
float island cost time too) is measured end to end (``bench/quantization.py --only cnn``).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from deepshrink import modeling


@dataclasses.dataclass
class LayerSpeed:
    name: str
    input_shape: tuple[int, ...]
    groups: int
    fp32_ms: float
    int8_ms: float

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms if self.int8_ms > 0 else float("inf")


@dataclasses.dataclass
class SpeedPlan:
    layers: list[LayerSpeed]
    keep_float: list[str]  # layers where int8 does not pay on this CPU
    threads: int

    def patterns(self) -> tuple[str, ...]:
        """The layers to keep in float, as ``PTQConfig.ignore`` patterns (full-match regexes)."""
        return tuple(re.escape(n) for n in self.keep_float)

    def table(self) -> str:
        rows = [f"{'layer':32s} {'input':>18s} {'groups':>6s} {'fp32 ms':>8s} {'int8 ms':>8s} {'x':>5s}"]
        rows += [
            f"{s.name:32s} {s.input_shape!s:>18s} {s.groups:6d} {s.fp32_ms:8.3f} {s.int8_ms:8.3f} "
            f"{s.speedup:5.2f}"
            for s in self.layers
        ]
        return "\n".join(rows)


@torch.no_grad()
def _conv_inputs(model: nn.Module, example_inputs: Any) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:  # returns None: the input stays as it is
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    try:
        with modeling.eval_mode(model):
            modeling.call(model, modeling.as_inputs(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _conv_graphs(conv: nn.Conv2d) -> tuple[bytes, bytes]:
    """(float Conv, QLinearConv) single-node ONNX models with this conv's attributes."""
    from onnx import TensorProto, helper, numpy_helper

    w = conv.weight.detach().float().numpy()
    out_ch = w.shape[0]
    attrs = {
        "strides": list(conv.stride),
        "pads": list(conv.padding) * 2,
        "dilations": list(conv.dilation),
        "group": conv.groups,
    }
    bias = np.zeros(out_ch, np.float32)
    fl = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)],
        "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")],
    )
    wq = np.clip(
        np.round(w / (np.abs(w).reshape(out_ch, -1).max(1).reshape(-1, 1, 1, 1) / 127 + 1e-12)), -127, 127
    ).astype(np.int8)
    inits = [
        numpy_helper.from_array(wq, "w"),
        numpy_helper.from_array(np.full(out_ch, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(out_ch, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, np.uint8), "yz"),
        numpy_helper.from_array(np.zeros(out_ch, np.int32), "b"),
    ]
    q = helper.make_graph(
        [
            helper.make_node(
                "QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"], **attrs
            )
        ],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        inits,
    )
    models = [helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]) for g in (fl, q)]
    return models[0].SerializeToString(), models[1].SerializeToString()


def _session(data: bytes, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _time(sess: Any, x: np.ndarray, repeats: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        sess.run(None, {"x": x})
    return (time.perf_counter() - t0) * 1000 / repeats


def measure_conv_speed(
    model: nn.Module,
    *,
    example_inputs: Any,
    threads: int = 1,
    rounds: int = 5,
    repeats: int = 10,
    min_speedup: float = 1.0,
) -> SpeedPlan:
    """Time every Conv2d of ``model`` alone, float vs int8 (see the module doc)."""
    shapes = _conv_inputs(model, example_inputs)
    modules = dict(model.named_modules())
    rng = np.random.default_rng(0)
    out: list[LayerSpeed] = []
    for name, shape in shapes.items():
        conv = modules[name]
        fdata, qdata = _conv_graphs(conv)
        fs, qs = _session(fdata, threads), _session(qdata, threads)
        xf = rng.standard_normal(shape).astype(np.float32)
        xq = rng.integers(0, 256, shape, dtype=np.uint8)
        _time(fs, xf, 2), _time(qs, xq, 2)  # warm-up
        tf, tq = [], []
        for _ in range(rounds):  # interleaved: machine load hits both alike
            tf.append(_time(fs, xf, repeats))
            tq.append(_time(qs, xq, repeats))
        out.append(LayerSpeed(name, shape, conv.groups, statistics.median(tf), statistics.median(tq)))
    keep = [s.name for s in out if s.speedup < min_speedup]
    return SpeedPlan(out, keep, threads)


@dataclasses.dataclass
class ModelSpeed:
    """End-to-end latency of an int8 ONNX model against its fp32 export (one interleaved run)."""

    batch: int
    fp32_ms: float
    int8_ms: float
    threads: int

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms

    @property
    def slower(self) -> bool:
        return self.speedup < 1.0


def compare_onnx_speed(fp32: bytes, int8: bytes, inputs: torch.Tensor, *, threads: int = 1, rounds: int = 5,
                       repeats: int = 10) -> ModelSpeed:
    """Time the fp32 and int8 ONNX models on ``inputs``, interleaved; warns when int8 is slower
    (so it never is without saying so)."""
    sessions = [_session(d, threads) for d in (fp32, int8)]
    name = sessions[0].get_inputs()[0].name
    x = inputs.detach().float().contiguous().numpy()
    feeds = {name: x}
    times: list[list[float]] = [[], []]
    for s in sessions:
        s.run(None, feeds)
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            for _ in range(repeats):
                s.run(None, feeds)
            times[i].append((time.perf_counter() - t0) * 1000 / repeats)
    res = ModelSpeed(int(x.shape[0]), statistics.median(times[0]), statistics.median(times[1]), threads)
    if res.slower:
        warnings.warn(f"int8 model is slower than fp32 on this CPU at batch {res.batch}: "
                      f"{res.int8_ms:.2f} ms vs {res.fp32_ms:.2f} ms", stacklevel=2)
    return res
