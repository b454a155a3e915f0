"""Multi-exit models in ONNX Runtime, two ways.

* **segments** (:func:`export_exits_onnx`, ``OrtExitModel(dir, mode="segments")``): the base
  model is cut at the exit points (torch.fx, so the cut is exact) into one ONNX file per stage
  (segment + its exit head, outputs ``feature`` and ``logits``); a small runner here scores the
  head's logits, keeps the exited rows and feeds only the remaining rows to the next stage.
* **if-graph** (``ifgraph.onnx``, ``mode="if"``): the same stages inlined into one graph where
  each exit is an ``If`` node whose ``else`` branch holds the rest of the network. An ``If``
  condition is one boolean, so the graph exits only when *every* sample of the batch is sure
  (at batch 1: exactly the per-sample policy); it can't drop rows from a batch.

Each piece is exported with :func:`deepshrink.quantization.export_onnx`, so a multi-exit model
quantized with :func:`deepshrink.quantization.quantize` exports with real int8 kernels too.
Segment cuts need exactly one tensor crossing each exit point (CNNs, MLPs, residual stages).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.split_module import split_module

from deepshrink.early_exit.model import MultiExitModel
from deepshrink.errors import FormatError, ModelError
from deepshrink.fileio import atomic_write_text
from deepshrink.modeling import eval_mode

MANIFEST = "exits.json"
_QOPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulIntegerToFloat",
         "DynamicQuantizeMatMul", "ConvInteger", "QLinearConv", "MatMulInteger"}


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Exit points stay whole (the cut goes right after them); layers without children
        # (including compressed layers) are exported as they are.
        return qualname in self.leaves or not any(True for _ in m.children()) or \
            super().is_leaf_module(m, qualname)


def split_segments(model: MultiExitModel) -> list[nn.Module]:
    """The base model as ``K + 1`` modules run one after the other: up to exit point 0, from
    there to exit point 1, ..., to the final output. Each takes and returns one tensor."""
    base = model.base
    try:
        graph = _Tracer(set(model.points)).trace(base)
    except Exception as exc:  # fx raises many types on data-dependent control flow
        raise ModelError(f"cannot cut {type(base).__name__} into ONNX segments: torch.fx failed "
                         f"({type(exc).__name__}: {str(exc)[:200]})",
                         hint="use the torch multi-exit model, or export the model whole") from exc
    gm = torch.fx.GraphModule(base, graph)
    part, points, assign = 0, list(model.points), {}
    for node in gm.graph.nodes:
        assign[node.name] = part
        if node.op == "call_module" and part < len(points) and node.target == points[part]:
            part += 1
    if part != len(points):
        raise ModelError(f"exit point {points[part]!r} is not called directly by the model's forward")
    split = split_module(gm, base, lambda n: assign[n.name])
    calls = [n for n in split.graph.nodes if n.op == "call_module"]
    for i, n in enumerate(calls):
        if len(n.args) != 1 or n.kwargs:
            raise ModelError(f"segment {i} of the cut takes {len(n.args) + len(n.kwargs)} values; ONNX "
                             "segments need one tensor crossing each exit point")
    return [getattr(split, n.target) for n in calls]


class _MatmulPool(nn.Module):
    """Adaptive average pooling as one matrix product (ONNX has no adaptive pooling whose
    output size does not divide the input size); exact up to float rounding."""

    def __init__(self, h: int, w: int, out: int) -> None:
        super().__init__()
        eye = torch.eye(h * w).reshape(h * w, 1, h, w)
        self.register_buffer("matrix", torch.nn.functional.adaptive_avg_pool2d(eye, out).reshape(h * w, -1))
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        return (x.flatten(2) @ self.matrix).reshape(n, c, self.out, self.out)


def _exportable_head(head: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of a (Sequential) head with non-dividing adaptive pools replaced by matmuls."""
    import copy

    head = copy.deepcopy(head)
    if not isinstance(head, nn.Sequential):
        return head
    for i, layer in enumerate(head):
        if isinstance(layer, nn.AdaptiveAvgPool2d) and x.dim() == 4:
            out = layer.output_size if isinstance(layer.output_size, int) else layer.output_size[0]
            h, w = x.shape[-2:]
            if h % out or w % out:
                head[i] = _MatmulPool(h, w, out)
        x = layer(x)
    return head


def _export(module: nn.Module, x: torch.Tensor) -> Any:
    import onnx

    from deepshrink.quantization import export_onnx

    return onnx.load_from_string(export_onnx(module.eval(), None, x))


def _inline(proto: Any, prefix: str, source: str) -> tuple[list[Any], list[Any], str]:
    """Nodes and initializers of a one-input, one-output model, renamed under ``prefix`` and
    reading its input from the value ``source``; returns also the name of its output."""
    from onnx import compose, helper

    m = compose.add_prefix(proto, prefix)
    g = m.graph
    nodes = [helper.make_node("Identity", [source], [g.input[0].name]), *g.node]
    return nodes, list(g.initializer), g.output[0].name


def _score_nodes(logits: str, prefix: str, criterion: str, num_classes: int) -> tuple[list[Any], str]:
    """Nodes computing one score per sample, higher = surer (as :func:`exit_scores`)."""
    from onnx import helper

    p = prefix
    if criterion == "confidence":
        return [helper.make_node("Softmax", [logits], [p + "prob"], axis=-1),
                helper.make_node("ReduceMax", [p + "prob"], [p + "score"], axes=[-1], keepdims=0)
                ], p + "score"
    scale = helper.make_tensor(p + "invlogc", 1, [], [1.0 / math.log(max(2, num_classes))])
    one = helper.make_tensor(p + "one", 1, [], [1.0])
    return [helper.make_node("LogSoftmax", [logits], [p + "logp"], axis=-1),
            helper.make_node("Exp", [p + "logp"], [p + "prob"]),
            helper.make_node("Mul", [p + "prob", p + "logp"], [p + "plogp"]),
            helper.make_node("ReduceSum", [p + "plogp", p + "axes"], [p + "negh"], keepdims=0),
            helper.make_node("Constant", [], [p + "axes"], value=helper.make_tensor(p + "ax", 7, [1], [-1])),
            helper.make_node("Constant", [], [p + "scale"], value=scale),
            helper.make_node("Constant", [], [p + "onec"], value=one),
            helper.make_node("Mul", [p + "negh", p + "scale"], [p + "negs"]),
            helper.make_node("Add", [p + "onec", p + "negs"], [p + "score"])], p + "score"


def _opsets(protos: list[Any]) -> list[Any]:
    from onnx import helper

    seen: dict[str, int] = {}
    for m in protos:
        for o in m.opset_import:
            seen[o.domain] = max(seen.get(o.domain, 0), o.version)
    return [helper.make_opsetid(d, v) for d, v in sorted(seen.items())]


def _renamed(info: Any, name: str) -> Any:
    from onnx import ValueInfoProto

    out = ValueInfoProto()
    out.CopyFrom(info)
    out.name = name
    return out


def _stage_model(seg: Any, head: Any | None, i: int) -> Any:
    """Segment ``i`` (+ its head): input ``input``, outputs ``feature`` (and ``logits``)."""
    from onnx import helper

    nodes, inits, feat = _inline(seg, f"s{i}/", "input")
    outs = [helper.make_node("Identity", [feat], ["feature"])]
    out_info = [_renamed(seg.graph.output[0], "feature")]
    if head is not None:
        hn, hi, logits = _inline(head, f"h{i}/", feat)
        nodes, inits = nodes + hn, inits + hi
        outs.append(helper.make_node("Identity", [logits], ["logits"]))
        out_info.append(_renamed(head.graph.output[0], "logits"))
    graph = helper.make_graph(nodes + outs, f"stage{i}", [seg.graph.input[0]], out_info, inits)
    protos = [seg] + ([head] if head is not None else [])
    return helper.make_model(graph, opset_imports=_opsets(protos), ir_version=seg.ir_version)


def _if_graph(segs: list[Any], heads: list[Any], thresholds: list[float | None], criterion: str,
              num_classes: int) -> Any:
    """All stages in one graph: exit ``k`` is an ``If`` whose ``else`` branch runs the rest."""
    from onnx import TensorProto, helper

    def rest(k: int, source: str) -> tuple[list[Any], list[Any], str]:
        nodes, inits, feat = _inline(segs[k], f"s{k}/", source)
        if k == len(heads):
            return nodes, inits, feat
        if thresholds[k] is None:
            more, more_inits, out = rest(k + 1, feat)
            return nodes + more, inits + more_inits, out
        hn, hi, logits = _inline(heads[k], f"h{k}/", feat)
        sn, score = _score_nodes(logits, f"c{k}/", criterion, num_classes)
        t = helper.make_tensor(f"c{k}/t", TensorProto.FLOAT, [], [float(thresholds[k])])
        cond = [helper.make_node("ReduceMin", [score], [f"c{k}/min"], keepdims=0),
                helper.make_node("Constant", [], [f"c{k}/tc"], value=t),
                helper.make_node("GreaterOrEqual", [f"c{k}/min", f"c{k}/tc"], [f"c{k}/cond"])]
        out = f"x{k}/out"
        info = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", num_classes])]
        then_g = helper.make_graph([helper.make_node("Identity", [logits], [out])], f"exit{k}", [], info)
        en, ei, eo = rest(k + 1, feat)
        else_g = helper.make_graph([*en, helper.make_node("Identity", [eo], [out])], f"go_on{k}", [], info,
                                   ei)
        node = helper.make_node("If", [f"c{k}/cond"], [f"if{k}/out"], then_branch=then_g, else_branch=else_g)
        return nodes + hn + sn + cond + [node], inits + hi, f"if{k}/out"

    nodes, inits, out = rest(0, "input")
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])
    graph = helper.make_graph([*nodes, helper.make_node("Identity", [out], ["logits"])], "early_exit",
                              [segs[0].graph.input[0]], [logits], inits)
    return helper.make_model(graph, opset_imports=_opsets(segs + heads), ir_version=segs[0].ir_version)


def export_exits_onnx(model: MultiExitModel, directory: str | Path, example: torch.Tensor) -> Path:
    """Write ``stage{i}.onnx`` (segment ``i`` + head ``i``; the last stage: the rest of the
    network), ``ifgraph.onnx`` (one graph with ``If`` nodes) and ``exits.json`` (thresholds,
    criterion) to ``directory``; returns the manifest path. ``example``: one input batch."""
    import onnx

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with eval_mode(model), torch.no_grad():
        segments = split_segments(model)
        x, segs, heads = example[:1], [], []
        for i, seg in enumerate(segments):
            segs.append(_export(seg, x))
            x = seg(x)
            if i < model.num_exits:
                heads.append(_export(_exportable_head(model.heads[i], x), x))
    num_classes = int(x.shape[-1])
    files = []
    for i, seg in enumerate(segs):
        stage = _stage_model(seg, heads[i] if i < len(heads) else None, i)
        files.append(f"stage{i}.onnx")
        _write(directory / files[-1], stage.SerializeToString())
    # ORT 1.32's optimizer aborts the process on int8 QDQ nodes inside If branches: an int8 If
    # graph is composed from pieces ORT has already optimized and then loaded with optimization
    # off; a float one is composed from the raw pieces and optimized whole when loaded.
    quantized = any(n.op_type in _QOPS for p in segs + heads for n in p.graph.node)
    pieces = ([_ort_optimized(p) for p in segs], [_ort_optimized(p) for p in heads]) if quantized \
        else (segs, heads)
    if_model = _if_graph(*pieces, model.thresholds, model.criterion, num_classes)
    onnx.checker.check_model(if_model)
    _write(directory / "ifgraph.onnx", if_model.SerializeToString())
    manifest = {"format": "deepshrink-early-exit-onnx", "version": 1, "stages": files,
                "ifgraph": "ifgraph.onnx", "ifgraph_optimize": not quantized,
                "thresholds": model.thresholds, "criterion": model.criterion,
                "points": model.points, "num_classes": num_classes}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2))
    return directory / MANIFEST


def _ort_optimized(proto: Any) -> Any:
    """``proto`` after ONNX Runtime's extended graph optimizations (as ORT writes it out)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def _write(path: Path, data: bytes) -> None:
    from deepshrink.fileio import atomic_write_bytes

    atomic_write_bytes(path, data)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: cannot read the early-exit manifest: {exc}") from exc
    if not isinstance(m, dict) or m.get("format") != "deepshrink-early-exit-onnx" or m.get("version") != 1:
        raise FormatError(f"{path}: not a deepshrink early-exit manifest (format/version)")
    stages = m.get("stages")
    if not isinstance(stages, list) or not 2 <= len(stages) <= 65 or \
            any(not isinstance(s, str) or s != f"stage{i}.onnx" for i, s in enumerate(stages)):
        raise FormatError(f"{path}: stages: must be ['stage0.onnx', 'stage1.onnx', ...]")
    ts = m.get("thresholds")
    if not isinstance(ts, list) or len(ts) != len(stages) - 1 or any(
            t is not None and (not isinstance(t, (int, float)) or not 0 <= t <= 1) for t in ts):
        raise FormatError(f"{path}: thresholds: must be one null or number in [0, 1] per exit")
    if m.get("criterion") not in ("confidence", "entropy"):
        raise FormatError(f"{path}: criterion: must be confidence or entropy")
    return m


class OrtExitModel:
    """Run an exported multi-exit model in ONNX Runtime: ``model(x)`` -> logits (torch).

    ``mode="segments"``: one session per stage, exited rows leave the batch between stages;
    ``mode="if"``: the single graph with ``If`` nodes (exits only when the whole batch is sure).
    """

    def __init__(self, directory: str | Path, mode: str = "segments", threads: int = 1) -> None:
        from deepshrink.quantization import OrtModel

        directory = Path(directory)
        m = _read_manifest(directory)
        if mode not in ("segments", "if"):
            raise ModelError(f"mode must be 'segments' or 'if', got {mode!r}")
        self.mode, self.thresholds, self.criterion = mode, m["thresholds"], m["criterion"]
        if mode == "if":
            self.graph = OrtModel(directory / "ifgraph.onnx", threads=threads,
                                  optimize=m.get("ifgraph_optimize") is True)
        else:
            self.stages = [OrtModel(directory / s, threads=threads).session for s in m["stages"]]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "if":
            return self.graph(x)
        return torch.from_numpy(self._segments(x.numpy() if isinstance(x, torch.Tensor) else x))

    def _segments(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        out: np.ndarray | None = None
        alive = np.arange(n)
        for k, t in enumerate(self.thresholds):
            x, logits = self.stages[k].run(None, {"input": x})
            if t is None:
                continue
            done = _np_scores(logits, self.criterion) >= t
            if not done.any():
                continue
            if out is None:
                out = np.empty((n, logits.shape[-1]), dtype=logits.dtype)
            out[alive[done]] = logits[done]
            if done.all():
                return out
            alive, x = alive[~done], x[~done]
        final = self.stages[-1].run(None, {"input": x})[0]
        if out is None:
            return final
        out[alive] = final
        return out


def _np_scores(logits: np.ndarray, criterion: str) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    if criterion == "confidence":
        return np.exp(logp.max(-1))
    return 1.0 - (-(np.exp(logp) * logp).sum(-1)) / math.log(max(2, logits.shape[-1]))
