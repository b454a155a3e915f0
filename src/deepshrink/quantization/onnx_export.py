"""ONNX export of quantized models for real integer execution in ONNX Runtime.

Each :class:`QuantizedLayer` exports through an autograd Function's ``symbolic`` (TorchScript
exporter) as the operator form ONNX Runtime runs fastest on x86 CPUs (measured on an AVX2
machine without VNNI; see bench/quantization.py):

* Linear, static:  ``QuantizeLinear(u8)`` -> ``com.microsoft.MatMulIntegerToFloat`` (int8
  per-channel weights, bias fused). ORT's QDQ form with per-channel int8 weights was not fused
  and ran 10x *slower* than fp32 on this CPU.
* Linear, dynamic: ``com.microsoft.DynamicQuantizeMatMul`` (per-tensor uint8 activations
  quantized at run time, int8 per-channel weights). On AVX2 without VNNI its u8 x s8 kernel
  can saturate int16 pair sums, so outputs may differ from the torch model by more than
  rounding (weights of at most 7 bits avoid it); the static path above showed no such error.
* Linear, dynamic per token (``act_granularity`` "token", or chosen by "auto"):
  ``ReduceMax(Abs(x))`` per row -> one per-axis ``QuantizeLinear`` of the rows with those
  run-time scales (uint8, zero point 128) -> ``com.microsoft.MatMulIntegerToFloat`` (int8
  weights; row and weight scales fused) -> ``Add`` bias. Layers fed the
  same tensor share the quantization.
* SmoothQuant factors kept in a layer: one ``Mul`` of the input (shared by layers fed the
  same tensor, e.g. query / key / value); factors folded into a norm cost nothing.
* Conv, static: QDQ around ``Conv`` with a quantized output, which ORT fuses to ``QLinearConv``.
  A conv left float in such a model (``ignore``, e.g. where int8 does not pay) is exported as
  ``com.microsoft::FusedConv``, which ORT's QDQ passes leave float (a plain ``Conv`` between
  DQ and Q nodes would be quantized by ORT itself).
* Conv, dynamic: ``DynamicQuantizeLinear`` -> ``ConvInteger`` -> rescale.
* Embedding (``embedding_bits``): ``Gather`` of int8 rows and their scales, then ``Mul``.
* weight-only: ``DequantizeLinear`` of int8 weights -> float ``MatMul`` / ``Conv`` (ORT's
  optimizer may turn DQ + MatMul into its dynamic int8 kernel).

Weights are int8 constants, so the file is ~1 byte per weight (bit widths below 8 are stored
in int8 too: ONNX Runtime has no fast kernel for them here; the packed safetensors file is
the small form). Everything else (normalization, attention maths, pooling) stays float.
"""

from __future__ import annotations

import io
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.errors import ModelError
from deepshrink.fileio import atomic_path
from deepshrink.modeling import output_tensor
from deepshrink.quantization.modules import (
    QuantizedLayer,
    act_fake_quant,
    apply_layer,
    clamp_act,
    dynamic_fake_quant,
    token_fake_quant,
)

OPSET = 17


def _int8_weight(layer: QuantizedLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 weight in ONNX layout, scale, int8 zero point) for one layer."""
    if layer.spec.granularity == "group":
        raise ModelError(f"ONNX export supports per-tensor / per-channel weights, not per-group "
                         f"({layer.extra_repr()})", hint="save per-group models as .safetensors")
    q = layer.int_weight()
    zero = layer.zero_rows()
    if q.max() > 127:  # affine 8-bit grid [0, 255]: shift to int8, same values
        q, zero = q - 128, zero - 128
    scale = layer.scale.clone()
    if layer.spec.granularity == "tensor":
        scale, zero = scale.reshape(()), zero.reshape(())
    q8 = q.round().to(torch.int8)
    if layer.kind == "linear":
        q8 = q8.t().contiguous()  # MatMul wants (in, out)
    return q8, scale, zero.round().to(torch.int8)


# The tracer accepts only simple Python values besides tensors, so layers travel by key.
_EXPORTING: dict[int, QuantizedLayer] = {}


class _QLayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: int, *tensors: torch.Tensor) -> torch.Tensor:
        # Only the passed tensors may be read here: touching the traced module's own buffers
        # inside a Function breaks the TorchScript tracer.
        layer = _EXPORTING[key]
        t = dict(zip(_ARGS, tensors, strict=True))
        if layer.kind == "embedding":
            w = (t["wq"].float() - t["wz"].float().reshape(-1, 1)) * t["ws_r"]
            return torch.nn.functional.embedding(x, w)
        if layer.in_mul is not None:
            x = x * t["sm"]
        if layer.mode == "static":
            x = act_fake_quant(x, t["a_s"], t["a_z"].float(), 8)
        elif layer.mode == "dynamic":
            x = token_fake_quant(x) if layer.act_granularity == "token" else dynamic_fake_quant(x)
        if layer.kind == "linear":
            w = ((t["wq"].float() - t["wz"].float()) * t["ws"]).t()
        else:
            view = (-1,) + (1,) * (t["wq"].dim() - 1)
            w = (t["wq"].float() - t["wz"].float().reshape(view)) * t["ws"].reshape(view)
        y = apply_layer(layer.kind, x, w, t["b"] if t["bq"].numel() == 0 else t["bq"].float() * t["bs"],
                        layer.conv)
        if layer.act is not None:
            y = clamp_act(y, layer.act)
        if layer.mode == "static" and layer.meta.get("out_q"):
            y = act_fake_quant(y, t["o_s"], t["o_z"].float(), 8)
        return y

    @staticmethod
    def symbolic(g: Any, x: Any, key: int, wq: Any, ws: Any, wz: Any, b: Any,
                 a_s: Any, a_z: Any, o_s: Any, o_z: Any, ws_r: Any, b_r: Any, sm: Any, bq: Any, bs: Any,
                 bz: Any) -> Any:
        layer = _EXPORTING[key]
        mode = layer.mode
        if layer.in_mul is not None:  # SmoothQuant factors kept in the layer
            x = _shared(("mul", _value_id(x), _tensor_key(layer.in_mul)), lambda: g.op("Mul", x, sm))
        if layer.kind == "linear" and mode == "dynamic" and layer.act_granularity == "token":
            return _token_matmul(g, x, wq, ws, wz, b, tuple(layer.shape))
        if layer.kind == "embedding":
            # Gather int8 rows and their scales, then dequantize only the rows used.
            rows = g.op("Cast", g.op("Gather", wq, x, axis_i=0), to_i=1)
            return g.op("Mul", rows, g.op("Gather", ws_r, x, axis_i=0))
        if layer.kind == "linear":
            if mode == "static":
                xq = g.op("QuantizeLinear", x, a_s, a_z)
                y = g.op("com.microsoft::MatMulIntegerToFloat", xq, wq, a_s, ws, a_z, wz, b)
                return _act_op(g, _typed(y, x, layer.shape[0]), layer)
            if mode == "dynamic":
                y = g.op("com.microsoft::DynamicQuantizeMatMul", x, wq, ws, wz, b)
                return _act_op(g, _typed(y, x, layer.shape[0]), layer)
            wd = g.op("DequantizeLinear", wq, ws, wz, axis_i=1)
            return _act_op(g, g.op("Add", g.op("MatMul", x, wd), b), layer)
        c = layer.conv
        attrs = {"strides_i": c["stride"], "pads_i": list(c["padding"]) * 2,
                 "dilations_i": c["dilation"], "group_i": c["groups"]}
        if mode == "dynamic":
            xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
            yi = g.op("ConvInteger", xq, wq, xz, wz, **attrs)
            y = g.op("Mul", g.op("Cast", yi, to_i=1), g.op("Mul", xs, ws_r))  # to_i=1: FLOAT
            return _act_op(g, g.op("Add", y, b_r), layer)
        wd = g.op("DequantizeLinear", wq, ws, wz, axis_i=0)
        if mode == "static":
            x = g.op("DequantizeLinear", g.op("QuantizeLinear", x, a_s, a_z), a_s, a_z)
            # QLinearConv takes an int32 bias on the (input x weight) scale grid: exported as
            # DequantizeLinear of int32 so that ONNX Runtime's QDQ fusion recognises the pattern.
            b = g.op("DequantizeLinear", bq, bs, bz, axis_i=0)
        # Conv -> Relu/Clip -> QuantizeLinear: ORT drops the activation into the output range
        # and fuses the rest into one QLinearConv.
        y = _act_op(g, g.op("Conv", x, wd, b, **attrs), layer)
        if mode == "static" and layer.meta.get("out_q"):
            y = g.op("DequantizeLinear", g.op("QuantizeLinear", y, o_s, o_z), o_s, o_z)
        return y


def _act_op(g: Any, y: Any, layer: QuantizedLayer) -> Any:
    """The absorbed activation: Relu for [0, inf), else Clip."""
    if layer.act is None:
        return y
    lo, hi = layer.act
    if lo == 0.0 and hi == float("inf"):
        return g.op("Relu", y)
    lo_t = g.op("Constant", value_t=torch.tensor(lo, dtype=torch.float32))
    hi_t = g.op("Constant", value_t=torch.tensor(hi, dtype=torch.float32))
    return g.op("Clip", y, lo_t, hi_t)


# Layers fed the same tensor (query / key / value) share one smoothing Mul and one per-token
# quantization: built once per export, keyed by the input value and the factors.
_SHARED: dict[tuple, Any] = {}


def _shared(key: tuple, build: Any) -> Any:
    if key not in _SHARED:
        _SHARED[key] = build()
    return _SHARED[key]


def _value_id(v: Any) -> int:
    return int(v.unique()) if hasattr(v, "unique") else id(v)


def _tensor_key(t: torch.Tensor) -> int:
    return hash(t.detach().cpu().numpy().tobytes())


def _token_matmul(g: Any, x: Any, wq: Any, ws: Any, wz: Any, b: Any, shape: tuple[int, ...]) -> Any:
    """Per-token symmetric int8 inputs around ONNX Runtime's ``MatMulIntegerToFloat``: the rows
    of x (a 2-D view) get s = max|x| / 127 each and go through one per-axis ``QuantizeLinear``
    with those run-time scales (uint8 q + 128, zero point 128: ORT's u8 x s8 kernel is its fast
    one); ``MatMulIntegerToFloat`` applies the row scales (an (M, 1) ``a_scale``) and the weight
    scales; then the leading shape is restored and the bias added. (Its own bias input is not
    used: with a per-row ``a_scale`` ONNX Runtime 1.32 adds it wrongly, measured.) On MiniLM's FFN output
    projection 1.2-1.4x faster than Div / Round / Add / Cast -> MatMulInteger -> Cast / Mul / Mul,
    with identical results."""
    q, s, zp, lead = _shared(("token", _value_id(x)), lambda: _token_quant(g, x, shape[1]))
    y = g.op("com.microsoft::MatMulIntegerToFloat", q, wq, s, ws, zp, wz)
    n_out = g.op("Constant", value_t=torch.tensor([shape[0]], dtype=torch.int64))
    return g.op("Add", g.op("Reshape", y, g.op("Concat", lead, n_out, axis_i=0)), b)


def _token_quant(g: Any, x: Any, in_features: int) -> tuple[Any, Any, Any, Any]:
    """(uint8 rows (M, in), row scales (M, 1), zero point 128, x's leading dims)."""
    f32 = lambda v: g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32))  # noqa: E731
    i64 = lambda v: g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))  # noqa: E731
    rows = g.op("Reshape", x, i64([-1, in_features]))
    amax = g.op("ReduceMax", g.op("Abs", rows), axes_i=[-1], keepdims_i=1)
    s = g.op("Div", g.op("Max", amax, f32(1e-8)), f32(127.0))
    s_flat = g.op("Reshape", s, i64([-1]))
    zp = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
    q = g.op("QuantizeLinear", rows, s_flat, g.op("Expand", zp, g.op("Shape", s_flat)), axis_i=0)
    lead = g.op("Slice", g.op("Shape", x), i64([0]), i64([-1]))
    return q, s, zp, lead


def _typed(y: Any, x: Any, out_features: int) -> Any:
    """Give a contrib op's output its type so the exporter's shape inference stays quiet."""
    try:
        sizes = x.type().varyingSizes()
        y.setType(x.type().with_sizes([*sizes[:-1], out_features]))
    except (RuntimeError, AttributeError, TypeError):
        pass  # shape unknown: leave it to ONNX Runtime's inference
    return y


def _u8(z: torch.Tensor) -> torch.Tensor:
    return z.round().clamp(0, 255).to(torch.uint8).reshape(())


_ARGS = ("wq", "ws", "wz", "b", "a_s", "a_z", "o_s", "o_z", "ws_r", "b_r", "sm", "bq", "bs", "bz")


def _export_tensors(layer: QuantizedLayer) -> dict[str, torch.Tensor]:
    """The constant inputs of one layer's ONNX subgraph, computed before tracing starts."""
    if layer.mode == "static" and layer.act_bits != 8:
        raise ModelError(f"ONNX export needs 8-bit activations, layer has {layer.act_bits}")
    wq, ws, wz = _int8_weight(layer)
    if layer.kind != "linear" and layer.mode == "dynamic" and wz.dim() > 0:
        # ORT's ConvInteger takes one weight zero point only (symmetric weights: all zero).
        if bool((wz != wz[0]).any()):
            raise ModelError(f"dynamic conv export needs one weight zero point ({layer.extra_repr()})",
                             hint="use symmetric weights or per-tensor granularity")
        wz = wz[0].clone()
    out_ch = layer.shape[0]
    b = layer.bias.clone() if layer.bias is not None else torch.zeros(out_ch)
    one, zero = torch.tensor(1.0), torch.tensor(0, dtype=torch.uint8)
    static = layer.mode == "static"
    has_out = static and layer.meta.get("out_q")
    nd = 1 if layer.kind == "conv1d" else 2
    bshape = (1, out_ch) + (1,) * nd
    if layer.kind == "embedding":
        if bool((wz != 0).any()):
            raise ModelError("embedding export needs symmetric weights (zero point 0)")
        bshape = (out_ch, 1)  # one scale per row (token)
    bq = bs = bz = torch.zeros(0)
    if static and layer.kind in ("conv1d", "conv2d"):
        bs = layer.bias_scale().clone()
        bq = torch.round(b / bs).clamp(-(2**31) + 1, 2**31 - 1).to(torch.int32)
        bz = torch.zeros(out_ch, dtype=torch.int32)
    return {"bq": bq, "bs": bs, "bz": bz, "wq": wq, "ws": ws, "wz": wz, "b": b,
            "a_s": layer.in_scale.reshape(()).clone() if static else one,
            "a_z": _u8(layer.in_zero) if static else zero,
            "o_s": layer.out_scale.reshape(()).clone() if has_out else one,
            "o_z": _u8(layer.out_zero) if has_out else zero,
            "ws_r": (ws.expand(out_ch) if ws.dim() == 0 else ws).reshape(bshape).clone(),
            "b_r": b.reshape(bshape).clone(),
            "sm": layer.in_mul.clone() if layer.in_mul is not None else one}


class _FloatConvFn(torch.autograd.Function):
    """A conv kept in float inside a quantized CNN, exported as ``com.microsoft::FusedConv``
    (no activation): ONNX Runtime's QDQ passes match the op type ``Conv``, so a plain ``Conv``
    between ``DequantizeLinear`` and ``QuantizeLinear`` would be quantized by ORT itself (its
    weight/bias quantization turns it into a per-tensor QLinearConv); FusedConv stays float."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, key: int) -> torch.Tensor:
        c = _ISLANDS[key]
        return torch.nn.functional.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    @staticmethod
    def symbolic(g: Any, x: Any, w: Any, b: Any, key: int) -> Any:
        c = _ISLANDS[key]
        y = g.op("com.microsoft::FusedConv", x, w, b, strides_i=list(c.stride),
                 pads_i=list(c.padding) * 2, dilations_i=list(c.dilation), group_i=c.groups,
                 kernel_shape_i=list(c.kernel_size))
        try:  # the output type, so the exporter's shape inference stays quiet
            n, _, *sizes = x.type().varyingSizes()
            dims = zip(sizes, c.padding, c.dilation, c.kernel_size, c.stride, strict=True)
            out = [None if v is None else (v + 2 * p - d * (k - 1) - 1) // st + 1 for v, p, d, k, st in dims]
            y.setType(x.type().with_sizes([n, c.out_channels, *out]))
        except (RuntimeError, AttributeError, TypeError, ValueError):
            pass
        return y


_ISLANDS: dict[int, nn.Conv2d] = {}


def _island_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    key = len(_ISLANDS)
    _ISLANDS[key] = conv
    b = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    return _FloatConvFn.apply(x, conv.weight, b, key)


def float_islands(model: nn.Module) -> list[nn.Conv2d]:
    """The float Conv2d layers of a model that has static quantized convs (see _FloatConvFn)."""
    if not any(isinstance(m, QuantizedLayer) and m.mode == "static" and m.kind == "conv2d"
               for m in model.modules()):
        return []
    return [m for m in model.modules() if type(m) is nn.Conv2d and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)]


def export_layer(layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
    """Called from :meth:`QuantizedLayer.forward` while exporting."""
    key = len(_EXPORTING)
    _EXPORTING[key] = layer
    return _QLayerFn.apply(x, key, *(getattr(layer, f"onnx_{k}") for k in _ARGS))


class _LogitsWrapper(nn.Module):
    """Positional inputs -> the model's output tensor (HF models take keyword inputs and return
    output objects: logits, or last_hidden_state for a plain encoder, or the named output)."""

    def __init__(self, model: nn.Module, names: list[str] | None, output: str | None = None) -> None:
        super().__init__()
        self.model, self.names, self.output = model, names, output

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, xs, strict=True))) if self.names else self.model(*xs)
        return output_tensor(out, self.output)


def export_onnx(model: nn.Module, path: str | Path | None,
                example: torch.Tensor | tuple | dict[str, torch.Tensor], *, opset: int = OPSET,
                dynamic_seq: bool = False, output: str | None = None) -> bytes:
    """Export ``model`` (float or quantized) to a single ONNX file with a dynamic batch axis.

    ``example`` is an input batch, or a dict of named inputs (``{"input_ids": ...}`` for a
    `transformers` model). The graph's one output is named ``logits`` whatever it holds: the
    model's logits, else its ``last_hidden_state`` (a plain encoder), or the field named by
    ``output`` (see :func:`deepshrink.modeling.output_tensor`). Returns the serialized model and,
    when ``path`` is given, writes it atomically.
    """
    names = list(example) if isinstance(example, dict) else None
    args = (tuple(example.values()) if isinstance(example, dict)
            else example if isinstance(example, tuple) else (example,))
    input_names = names or (["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))])
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in input_names}
    if dynamic_seq:
        for n in input_names:
            axes[n][1] = "seq"
    axes["logits"] = {0: "batch"}
    wrapper = _LogitsWrapper(model, names, output).eval()
    buf = io.BytesIO()
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    for layer in layers:  # temporary buffers: the tracer turns them into named initializers
        for k, t in _export_tensors(layer).items():
            layer.register_buffer(f"onnx_{k}", t, persistent=False)
    islands = float_islands(model)
    for conv in islands:  # exported as FusedConv while this export runs (the instance's forward)
        conv.forward = types.MethodType(_island_forward, conv)
    uses_contrib = bool(islands) or any(m.kind == "linear" and m.mode != "weight-only" for m in layers)
    contrib = {"com.microsoft": 1} if uses_contrib else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, buf, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=["logits"], dynamic_axes=axes,
                              custom_opsets=contrib, do_constant_folding=True)
    finally:
        _EXPORTING.clear()
        _SHARED.clear()
        _ISLANDS.clear()
        for conv in islands:
            del conv.forward
        for layer in layers:
            for k in _ARGS:
                delattr(layer, f"onnx_{k}")
    data = buf.getvalue()
    if any(m.mode == "static" and m.meta.get("out_q") for m in layers):
        from deepshrink.quantization.ort_graph import collapse_qdq_pairs, quantize_pools

        data = collapse_qdq_pairs(data)  # chained convs: drop the exact DQ -> Q repeats
        data = quantize_pools(data)  # pools on the integers (QLinearGlobalAveragePool)
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return data
