"""An ONNX Runtime session that behaves like a model: call it on torch tensors, get torch logits.

So :func:`deepshrink.train.evaluate`, :func:`deepshrink.measure.measure_latency` and
``DemoContext.measure(..., runner=...)`` work on the deployed integer model unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepshrink.checkpoint import register_loader
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

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Inputs as the torch model took them: one tensor, positional tensors, a dict, or
        keyword tensors (named like the ONNX inputs)."""
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            kwargs, args = args[0], ()
        feeds = {k: _np(v) for k, v in kwargs.items() if v is not None}
        feeds.update({n: _np(v) for n, v in zip(self.input_names, args, strict=False)})
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ModelError(f"the ONNX model needs inputs {missing}")
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def __repr__(self) -> str:
        return f"OrtModel(inputs={self.input_names}, threads={self.threads})"


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    x = x.detach()
    return x.numpy() if x.is_floating_point() is False else x.float().contiguous().numpy()


class OnnxModule(nn.Module):
    """An ``.onnx`` file as an ``nn.Module`` (what :func:`deepshrink.load` returns for one): its
    forward runs ONNX Runtime, so evaluation and latency measurement treat it like any model.
    It has no torch parameters; ``onnx_params`` counts the weights stored in the graph."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = path
        self.ort = OrtModel(path, threads=threads or torch.get_num_threads())
        self.onnx_params = _initializer_count(path)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.ort(*args, **kwargs)


def _initializer_count(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    # weights are initializers, or Constant nodes (deepshrink's quantized export writes those)
    consts = [a.t for n in model.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in [*model.graph.initializer, *consts])


def load_onnx(path: Path, model: nn.Module | None = None, *, trust: Any = ()) -> nn.Module:
    if model is not None:
        raise ModelError(f"{path} is an ONNX graph: it cannot load into a torch model")
    return OnnxModule(path)


def _is_onnx(head: bytes, path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


register_loader("onnx", _is_onnx, load_onnx)
