"""An ONNX Runtime session that behaves like a model: call it on torch tensors, get torch logits.

So :func:`deepshrink.train.evaluate`, :func:`deepshrink.measure.measure_latency` and
``DemoContext.measure(..., runner=...)`` work on the deployed integer model unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepshrink.errors import FormatError, ModelError


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise ModelError("onnxruntime is not installed", hint="pip install 'deepshrink[onnx]'") from exc
    return onnxruntime


class OrtModel:
    """``OrtModel(path_or_bytes, threads=1)``; ``model(x)`` -> torch.Tensor (first output).

    Thread counts are set explicitly (intra- and inter-op) so timings say what they used.
    Inputs may be one tensor or a dict of named tensors; integer tensors keep their dtype.
    """

    def __init__(self, source: str | Path | bytes, threads: int = 1, optimize: bool = True) -> None:
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        try:
            self.session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for bad files
            where = "bytes" if isinstance(source, bytes) else str(source)
            raise FormatError(f"{where}: ONNX Runtime cannot load the model: {exc}") from exc
        self.threads = threads
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.nbytes = len(data)

    def __call__(self, x: torch.Tensor | dict[str, torch.Tensor] | np.ndarray) -> torch.Tensor:
        feeds = ({k: _np(v) for k, v in x.items()} if isinstance(x, dict)
                 else {self.input_names[0]: _np(x)})
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def __repr__(self) -> str:
        return f"OrtModel(inputs={self.input_names}, threads={self.threads})"


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    x = x.detach()
    return x.numpy() if x.is_floating_point() is False else x.float().contiguous().numpy()
