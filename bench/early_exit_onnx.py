"""ONNX Runtime part of bench/early_exit.py: the committed multi-exit models exported as
per-stage files + runner and as one graph with If nodes, float and int8, timed interleaved
against the original model in ONNX Runtime (accuracy on the test split)."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import deepshrink as ds
from _common import RESULTS
from deepshrink.early_exit.onnx import OrtExitModel, export_exits_onnx
from deepshrink.quantization import OrtModel, PTQConfig, export_onnx, quantize
from deepshrink.train import evaluate


def _accuracy(fn: Any, data: Any, n: int, batch: int) -> float:
    x, y = data.test.tensors
    hits = 0
    for i in range(0, n, batch):
        hits += int((fn(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return hits / n


def one_model(name: str, data: Any, args: Any, tmp: Path) -> dict[str, Any]:
    from early_exit import interleaved

    multi = ds.load(RESULTS / f"{name}-exits.safetensors")
    example = data.test.tensors[0][:1]
    original = copy.deepcopy(multi.base)
    runners: dict[str, Any] = {"ort original": OrtModel(export_onnx(original, None, example))}
    export_exits_onnx(multi, tmp / "fp32", example)
    runners["ort exits: segments"] = OrtExitModel(tmp / "fp32")
    runners["ort exits: if-graph"] = OrtExitModel(tmp / "fp32", mode="if")
    q = copy.deepcopy(multi)
    with q.all_heads():
        quantize(q, PTQConfig(mode="static", bits=8), calibration=data)
    export_exits_onnx(q, tmp / "int8", example)
    runners["ort int8 exits: segments"] = OrtExitModel(tmp / "int8")
    runners["ort int8 exits: if-graph"] = OrtExitModel(tmp / "int8", mode="if")
    runners["torch exits"] = multi
    n = args.b1
    acc = {k: _accuracy(f, data, 2000, 1 if "if-graph" in k else 250) for k, f in runners.items()}
    acc["torch original"] = evaluate(original, data.loader("test", 500))["top1"]
    xs = data.test.tensors[0]
    t0 = time.perf_counter()
    b1 = interleaved(runners, [xs[i:i + 1] for i in range(n)], args.rounds)
    b256 = interleaved({k: v for k, v in runners.items()}, [xs[i:i + 256] for i in range(0, 256 * 4, 256)],
                       args.rounds)
    return {"test_top1_first_2000": acc, "batch1": b1, "batch256": b256, "seconds": time.perf_counter() - t0,
            "note": "if-graph exits a batch only when every sample in it is sure, so at batch 256 it runs "
                    "(almost) the whole network; its accuracy is measured at batch 1"}


def onnx_part(data: Any, args: Any) -> dict[str, Any]:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name in ("lenet5", "resnet_small"):
            if (RESULTS / f"{name}-exits.safetensors").exists():
                out[name] = one_model(name, data, args, Path(d) / name)
                print(name, {k: round(v["speedup_vs_original"], 2) for k, v in out[name]["batch1"].items()},
                      flush=True)
    return out
