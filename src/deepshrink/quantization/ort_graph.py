"""What ONNX Runtime actually runs: its optimized graph, and a clean-up of our QDQ graphs.

* :func:`optimized_graph` asks ONNX Runtime to save the graph after its optimizations
  (``SessionOptions.optimized_model_filepath``), so a test can check that every quantized conv
  became ``QLinearConv`` and none fell back to a float ``Conv``.
* :func:`collapse_qdq_pairs` removes ``DequantizeLinear -> QuantizeLinear`` pairs with identical
  scale and zero point (an exact identity on the integer values), which chained quantized
  layers produce; what remains is ``QLinearConv -> QLinearConv`` after fusion.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from deepshrink.errors import ModelError

FLOAT_CONV_OPS = ("Conv", "FusedConv", "NhwcFusedConv")
INT_CONV_OPS = ("QLinearConv", "ConvInteger", "NhwcQLinearConv")


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise ModelError("onnx is not installed", hint="pip install 'deepshrink[onnx]'") from exc
    return onnx


def optimized_graph(model: bytes, threads: int = 1) -> Any:
    """The ``onnx.ModelProto`` ONNX Runtime runs after its (full, CPU) graph optimizations."""
    import onnxruntime as ort

    onnx = _onnx()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "optimized.onnx"
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(path)
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return onnx.load(str(path))


def op_counts(model: Any) -> Counter:
    """How many nodes of each op type the graph has."""
    return Counter(n.op_type for n in model.graph.node)


def float_convs(model: Any) -> list[str]:
    """Names of the float convolutions in a graph (in a quantized model: fallbacks)."""
    return [n.name or n.output[0] for n in model.graph.node if n.op_type in FLOAT_CONV_OPS]


def _consts(model: Any) -> dict[str, np.ndarray]:
    onnx = _onnx()
    out = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    return out


def _same(consts: dict[str, np.ndarray], a: str, b: str) -> bool:
    if a == b:
        return True
    if a not in consts or b not in consts:
        return False
    x, y = consts[a], consts[b]
    return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))


def collapse_qdq_pairs(data: bytes) -> bytes:
    """Remove every ``DequantizeLinear(q, s, z) -> QuantizeLinear(., s, z)`` pair (same constant
    scale and zero point, per-tensor): consumers of the Q read ``q`` directly. Exact."""
    onnx = _onnx()
    model = onnx.load_from_string(data)
    graph = model.graph
    consts = _consts(model)
    producer = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        dq = producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        if _axis(dq) != _axis(node) or consts.get(node.input[1], np.zeros(2)).size != 1:
            continue
        if _same(consts, dq.input[1], node.input[1]) and _same(consts, dq.input[2], node.input[2]):
            rename[node.output[0]] = dq.input[0]
            drop.add(id(node))
    if not rename:
        return data
    outputs = {o.name for o in graph.output}
    keep = [n for n in graph.node if id(n) not in drop]
    for n in keep:
        for i, name in enumerate(n.input):
            while name in rename:
                name = rename[name]
            n.input[i] = name
    if outputs & set(rename):
        return data  # a graph output would lose its name: leave the graph alone
    del graph.node[:]
    graph.node.extend(_prune(keep, outputs))
    return model.SerializeToString()


POOL_OPS = ("GlobalAveragePool", "AveragePool")


def quantize_pools(data: bytes) -> bytes:
    """Give every average pool that reads a per-tensor ``DequantizeLinear(q, s, z)`` the same
    ``QuantizeLinear -> DequantizeLinear`` (s, z) on its output, so ONNX Runtime runs
    ``QLinearGlobalAveragePool`` / ``QLinearAveragePool`` on the integers instead of transposing
    and dequantizing the whole feature map first. An average of values on a grid stays inside
    its range, so the input's grid serves; the only change is rounding the mean to it."""
    onnx = _onnx()
    model = onnx.load_from_string(data)
    graph = model.graph
    consts = _consts(model)
    producer = {o: n for n in graph.node for o in n.output}
    nodes: list[Any] = []
    for node in graph.node:
        nodes.append(node)
        dq = producer.get(node.input[0]) if node.op_type in POOL_OPS else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        if consts.get(dq.input[1], np.zeros(2)).size != 1:
            continue  # per-channel grids: leave the pool float
        out = node.output[0]
        node.output[0] = f"{out}_pooled"
        q_out = f"{out}_q"
        nodes.append(onnx.helper.make_node("QuantizeLinear", [node.output[0], dq.input[1], dq.input[2]],
                                           [q_out], name=f"{node.name or out}_Q"))
        nodes.append(onnx.helper.make_node("DequantizeLinear", [q_out, dq.input[1], dq.input[2]],
                                           [out], name=f"{node.name or out}_DQ"))
    if len(nodes) == len(graph.node):
        return data
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString()


def _axis(node: Any) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return 1


def _prune(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """Drop nodes whose outputs nobody reads (the now-unused DequantizeLinear nodes)."""
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept
