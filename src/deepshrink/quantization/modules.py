"""Quantization modules.

* :class:`WeightFakeQuant` / :class:`ActFakeQuant`: fake quantization with a straight-through
  estimator (round's gradient is 1, clamp's is 0 outside the grid), optionally with a learned
  step size (LSQ, Esser et al. 2020). Used for QAT and for static-PTQ calibration.
* :class:`FakeQuantLayer`: a Linear / Conv1d / Conv2d wrapped with those quantizers (trainable).
* :class:`QuantizedLayer`: the deployable form PTQ and QAT both end in: packed integer codes,
  per-row scales and zero points, calibrated activation parameters. Its torch forward computes
  exactly what the exported ONNX graph computes (see :mod:`onnx_export`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.errors import ModelError
from deepshrink.quantization import core
from deepshrink.quantization.core import QuantSpec, from_rows, qparams, qrange, to_rows
from deepshrink.quantization.observers import Observer, make_observer, weight_range
from deepshrink.quantization.packing import pack_bits, packed_nbytes, unpack_bits

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
MODES = ("weight-only", "dynamic", "static")
ACT_GRANULARITIES = ("tensor", "token")
#: Class names of `transformers`' GPT-2 style ``Conv1D`` (a Linear with a transposed weight).
HF_CONV1D = ("Conv1D",)


def is_quantizable(m: nn.Module) -> bool:
    """Linear, Conv1d, Conv2d, or `transformers`' ``Conv1D`` (matched by class name and shape so
    that transformers need not be imported)."""
    return type(m) in QUANTIZABLE or is_hf_conv1d(m)


def is_hf_conv1d(m: nn.Module) -> bool:
    return (type(m).__name__ in HF_CONV1D and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2 and hasattr(m, "nf"))


def float_weight(layer: nn.Module) -> torch.Tensor:
    """The weight in PyTorch's (out, in, ...) layout (``Conv1D`` stores (in, out))."""
    w = layer.weight.detach().float()
    return w.t() if is_hf_conv1d(layer) else w


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value of x, gradient scaled by g (LSQ's step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


def ste_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int
                   ) -> torch.Tensor:
    """Fake quantization whose gradients are the STE's for x and LSQ's for a learned scale."""
    v = torch.clamp(x / scale + zero, qmin, qmax)
    return (round_ste(v) - zero) * scale


class WeightFakeQuant(nn.Module):
    """Fake-quantizes a weight per row. Without LSQ the clipping range follows the weight every
    step (min-max times a per-row clip ratio fixed at initialisation by the range method);
    with LSQ the per-row scale is a parameter initialised from that range."""

    def __init__(self, spec: QuantSpec, method: str = "mse", lsq: bool = False) -> None:
        super().__init__()
        self.spec, self.method, self.lsq = spec, method, lsq
        self.register_buffer("clip", torch.ones(0))
        self.register_buffer("zero", torch.zeros(0))
        self.scale: nn.Parameter | None = None

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        rows = to_rows(weight.detach().float(), self.spec)
        if self.spec.binary:
            self.clip = torch.ones(rows.shape[0])
            init_scale, zero = core.binary_scale(rows), torch.zeros(rows.shape[0])
        else:
            lo, hi = weight_range(rows, self.spec, self.method)
            amax = torch.maximum(rows.abs().max(1).values, torch.full_like(lo, 1e-12))
            self.clip = (torch.maximum(-lo, hi) / amax).clamp(0.01, 1.0)
            init_scale, zero = qparams(lo, hi, self.spec)
        self.zero = zero
        if self.lsq:
            self.scale = nn.Parameter(init_scale.clone())

    def qparams_for(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero per row for the current weight (detached unless LSQ)."""
        if self.lsq:
            assert self.scale is not None
            return self.scale.detach(), self.zero
        with torch.no_grad():
            if self.spec.binary:
                return core.binary_scale(rows), self.zero
            lo, hi = torch.aminmax(rows, dim=1)
            return qparams(lo * self.clip, hi * self.clip, self.spec)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.clip.numel() == 0:
            self.init_from(w)
        rows = to_rows(w, self.spec)
        if self.lsq:
            assert self.scale is not None
            qmax = max(1, qrange(self.spec.bits, self.spec.symmetric, self.spec.narrow)[1])
            scale = grad_scale(self.scale, 1.0 / math.sqrt(rows.shape[1] * qmax)).abs() + 1e-12
            zero = self.zero
        else:
            scale, zero = self.qparams_for(rows)
        scale = scale[:, None]
        if self.spec.binary:
            sign = rows + (torch.where(rows >= 0, 1.0, -1.0) - rows).detach()
            out = sign * scale
        else:
            qmin, qmax = qrange(self.spec.bits, self.spec.symmetric, self.spec.narrow)
            out = ste_fake_quant(rows, scale, zero[:, None], qmin, qmax)
        return from_rows(out, w.shape, self.spec)


class ActFakeQuant(nn.Module):
    """Per-tensor affine activation quantizer.

    ``observing``: collect statistics and pass x through unchanged (PTQ calibration).
    Training (QAT): update a moving-average range and fake-quantize with it (STE); with LSQ the
    scale is initialised from the first batch and then learned. Eval: frozen scale/zero.
    """

    def __init__(self, bits: int = 8, method: str = "moving_average", lsq: bool = False,
                 pct: float = 99.99, momentum: float = 0.1) -> None:
        super().__init__()
        self.bits, self.method, self.lsq = bits, method, lsq
        self.spec = QuantSpec(bits=bits, symmetric=False, granularity="tensor")
        self.observer: Observer = make_observer(method, self.spec, pct, momentum)
        self.observing = False
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero", torch.tensor(0.0))
        self.register_buffer("ready", torch.tensor(False))
        self.lsq_scale: nn.Parameter | None = None

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute scale/zero from what the observer saw."""
        lo, hi = self.observer.range()
        s, z = qparams(torch.tensor([lo]), torch.tensor([hi]), self.spec)
        self.scale, self.zero = s[0].clone(), z[0].clone()
        self.ready = torch.tensor(True)
        if self.lsq and self.lsq_scale is None:
            self.lsq_scale = nn.Parameter(self.scale.clone())

    def current_scale(self) -> torch.Tensor:
        """The scale in effect (the learned one with LSQ)."""
        if self.lsq_scale is not None:
            return self.lsq_scale.detach().abs() + 1e-12
        return self.scale.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.bits, False)
        if self.observing:
            self.observer.update(x.detach())
            return x
        if self.training and (self.lsq_scale is None):
            self.observer.update(x.detach())
            self.freeze()
        if not bool(self.ready):
            raise ModelError("activation quantizer used before calibration",
                             hint="run calibration data through the model first")
        if self.lsq_scale is not None:
            g = 1.0 / math.sqrt(x[0].numel() * qmax)
            scale = grad_scale(self.lsq_scale, g).abs() + 1e-12
            with torch.no_grad():
                self.scale = scale.detach().clone()
            return ste_fake_quant(x, scale, self.zero, qmin, qmax)
        return ste_fake_quant(x, self.scale, self.zero, qmin, qmax)


def _layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear) or is_hf_conv1d(layer):
        return "linear"
    if isinstance(layer, nn.Conv1d):
        return "conv1d"
    if isinstance(layer, nn.Conv2d):
        return "conv2d"
    if isinstance(layer, nn.Embedding):
        if layer.max_norm is not None:
            raise ModelError("cannot quantize an Embedding with max_norm (it rewrites its weights)")
        return "embedding"
    raise ModelError(f"cannot quantize a {type(layer).__name__}; supported: Linear, Conv1d, Conv2d, "
                     "Embedding (weight-only)")


def _conv_args(layer: nn.Module) -> dict[str, Any]:
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return {}
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ModelError(f"conv padding {layer.padding!r}/{layer.padding_mode!r} is not supported; "
                         "use numeric zero padding")
    return {"stride": list(layer.stride), "padding": list(layer.padding),
            "dilation": list(layer.dilation), "groups": layer.groups}


def apply_layer(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
           conv: dict[str, Any]) -> torch.Tensor:
    if kind == "linear":
        return F.linear(x, w, b)
    if kind == "embedding":
        return F.embedding(x, w)
    fn = F.conv1d if kind == "conv1d" else F.conv2d
    return fn(x, w, b, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])


class FakeQuantLayer(nn.Module):
    """A Linear / Conv wrapped with weight and (optionally) input/output fake quantizers.
    The float layer's parameters stay trainable, so QAT runs in the shared training loop."""

    def __init__(self, layer: nn.Module, weight_q: WeightFakeQuant, input_q: ActFakeQuant | None,
                 output_q: ActFakeQuant | None = None) -> None:
        super().__init__()
        self.kind = _layer_kind(layer)
        self.conv = _conv_args(layer)
        self.layer = layer
        self.weight_q = weight_q
        self.input_q = input_q
        self.output_q = output_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_q is not None:
            x = self.input_q(x)
        w = self.layer.weight.t() if is_hf_conv1d(self.layer) else self.layer.weight
        y = apply_layer(self.kind, x, self.weight_q(w), self.layer.bias, self.conv)
        return self.output_q(y) if self.output_q is not None else y


def dynamic_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """What ONNX DynamicQuantizeLinear does: uint8 over [min(x, 0), max(x, 0)] of this tensor."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((hi - lo) / 255.0, min=1e-12)
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def token_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last axis reduced) symmetric int8 scales: max|x| / 127, shape (..., 1)."""
    return torch.clamp(x.abs().amax(-1, keepdim=True), min=1e-8) / 127.0


def token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes (float tensor in [-127, 127]) and scales: what the exported
    ReduceMax / Div / Round subgraph computes before ``MatMulInteger``."""
    s = token_scales(x)
    return torch.round(x / s), s


def token_fake_quant(x: torch.Tensor) -> torch.Tensor:
    q, s = token_quant(x)
    return q * s


def act_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """What ONNX QuantizeLinear + DequantizeLinear (uint8 at 8 bits) do."""
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


class QuantizedLayer(nn.Module):
    """Deployable quantized Linear / Conv1d / Conv2d.

    Buffers (all saved): ``packed`` (codes ``q - qmin`` packed to ``bits`` each), ``scale`` and
    ``zero`` per row (affine grids only), and for static mode the input (and, for convs, output)
    activation scale/zero. ``meta`` (JSON) holds what is needed to rebuild the empty layer.
    """

    def __init__(self, meta: dict[str, Any]) -> None:
        super().__init__()
        self.meta = meta
        self.kind = meta["kind"]
        self.mode = meta["mode"]
        self.spec = QuantSpec.from_dict(meta["spec"])
        self.shape = tuple(meta["shape"])
        self.conv = meta.get("conv", {})
        self.act_bits = int(meta.get("act_bits", 8))
        n = math.prod(self.shape)
        rows = to_rows(torch.empty(self.shape), self.spec).shape[0]
        self.register_buffer("packed", torch.zeros(packed_nbytes(self._rows_numel(n), self.spec.bits),
                                                   dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows))
        # Symmetric grids have zero point 0 everywhere: nothing to store.
        self._zero_free = self.spec.symmetric or self.spec.binary
        self.register_buffer("zero", torch.zeros(0 if self._zero_free else rows, dtype=torch.int16))
        # The bias stays float, as a frozen parameter (so parameter counts include it).
        self.bias = (nn.Parameter(torch.zeros(self.shape[0]), requires_grad=False)
                     if meta.get("bias") else None)
        # Dynamic linears: per-tensor (uint8, DynamicQuantizeMatMul) or per-token (int8) inputs.
        self.act_granularity = meta.get("act_granularity", "tensor")
        # SmoothQuant migration kept in the layer: inputs are multiplied by ``in_mul`` (1 / s per
        # input channel) and the stored weight is W * s, so the float product is unchanged.
        self.in_mul: torch.Tensor | None
        self.register_buffer("in_mul", torch.ones(self.shape[1]) if meta.get("smooth") else None)
        if self.mode == "static":
            self.register_buffer("in_scale", torch.tensor(1.0))
            self.register_buffer("in_zero", torch.tensor(0.0))
            if meta.get("out_q"):
                self.register_buffer("out_scale", torch.tensor(1.0))
                self.register_buffer("out_zero", torch.tensor(0.0))
        self._dense: torch.Tensor | None = None

    def _rows_numel(self, n: int) -> int:
        # Per-group rows are padded to whole groups; padded codes are stored too (honest bytes).
        if self.spec.granularity != "group":
            return n
        c = self.shape[self.spec.axis]
        per = n // c
        return c * (-(-per // self.spec.group_size)) * self.spec.group_size

    @classmethod
    def from_float(cls, layer: nn.Module, spec: QuantSpec, mode: str, *, method: str = "mse",
                   act: ActFakeQuant | None = None, out: ActFakeQuant | None = None,
                   weight_q: WeightFakeQuant | None = None, act_granularity: str = "tensor",
                   smooth: torch.Tensor | None = None) -> QuantizedLayer:
        """Quantize a float layer. ``weight_q`` (from QAT) fixes the scales; else ``method``
        estimates the clipping range. ``act`` / ``out`` carry calibrated activation params.
        ``smooth`` (linear only): SmoothQuant factors s per input channel, kept in the layer
        (weights times s, inputs divided by s). ``act_granularity="token"``: dynamic linears
        quantize each token (row of the input) with its own int8 scale."""
        kind = _layer_kind(layer)
        w = float_weight(layer)
        if smooth is not None:
            if kind != "linear":
                raise ModelError("smoothing factors apply to linear layers only")
            w = w * smooth.float()[None, :]
        meta: dict[str, Any] = {"kind": kind, "mode": mode, "spec": spec.to_dict(),
                                "shape": list(w.shape), "bias": getattr(layer, "bias", None) is not None,
                                "conv": _conv_args(layer), "act_bits": act.bits if act else 8,
                                "out_q": out is not None}
        if is_hf_conv1d(layer):
            meta["transposed"] = True  # the original layer stored (in, out): keep that view
        if kind == "linear" and mode == "dynamic" and act_granularity != "tensor":
            meta["act_granularity"] = act_granularity
        if smooth is not None:
            meta["smooth"] = True
        self = cls(meta)
        if smooth is not None:
            self.in_mul = (1.0 / smooth.float()).clone()
        rows = to_rows(w, spec)
        if weight_q is not None:
            if weight_q.clip.numel() == 0:
                weight_q.init_from(w)
            scale, zero = weight_q.qparams_for(rows)
            scale = scale.abs().clamp_min(1e-12)
        elif spec.binary:
            scale, zero = core.binary_scale(rows), torch.zeros(rows.shape[0])
        else:
            scale, zero = qparams(*weight_range(rows, spec, method), spec)
        q = core.quantize_affine(rows, scale[:, None], zero[:, None], spec.bits, spec.symmetric, spec.narrow)
        self.set_codes(q, scale, zero)
        if self.bias is not None:
            self.bias.data.copy_(layer.bias.detach().float())
        if mode == "static":
            if act is None:
                raise ModelError("static quantization needs calibrated input activations")
            self.in_scale, self.in_zero = act.current_scale(), act.zero.detach().clone()
            if out is not None:
                self.out_scale, self.out_zero = out.current_scale(), out.zero.detach().clone()
        return self

    def set_codes(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        qmin, _ = qrange(self.spec.bits, self.spec.symmetric, self.spec.narrow)
        codes = (q + 1) // 2 if self.spec.binary else q - qmin
        self.packed = pack_bits(codes.to(torch.int64), self.spec.bits)
        self.scale = scale.float().clone()
        self.zero = torch.zeros(0, dtype=torch.int16) if self._zero_free else zero.to(torch.int16)
        self._dense = None

    def zero_rows(self) -> torch.Tensor:
        """Zero point per row (float)."""
        return torch.zeros(self.scale.numel()) if self._zero_free else self.zero.float()

    def int_rows(self) -> torch.Tensor:
        """Integer weight values q per row (int16)."""
        rows = self.scale.numel()
        n = self._rows_numel(math.prod(self.shape))
        codes = unpack_bits(self.packed, self.spec.bits, n).reshape(rows, -1)
        if self.spec.binary:
            return codes * 2 - 1
        qmin, _ = qrange(self.spec.bits, self.spec.symmetric, self.spec.narrow)
        return codes + qmin

    def int_weight(self) -> torch.Tensor:
        """Integer weights in the layer's weight shape (float tensor holding integers)."""
        return from_rows(self.int_rows().float(), self.shape, self.spec)

    def dense_weight(self) -> torch.Tensor:
        """The dequantized float weight (cached; also what parameter counting sees)."""
        if self._dense is None:
            rows = (self.int_rows().float() - self.zero_rows()[:, None]) * self.scale[:, None]
            self._dense = from_rows(rows, self.shape, self.spec)
        return self._dense

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight in the original layer's layout, for code that inspects
        ``layer.weight`` (its dtype in ViT, its shape elsewhere)."""
        w = self.dense_weight()
        if self.in_mul is not None:  # undo the smoothing: the original layer's weight
            w = w * self.in_mul[None, :]
        return w.t() if self.meta.get("transposed") else w

    # Attributes third-party code reads on the layer it replaced (HF MobileNetV2 reads a conv's
    # stride / kernel_size / dilation for its TF padding; others read in/out features).
    @property
    def in_features(self) -> int:
        return int(self.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    @property
    def nf(self) -> int:  # transformers' Conv1D
        return int(self.shape[0])

    @property
    def nx(self) -> int:  # transformers' Conv1D
        return int(self.shape[1])

    @property
    def in_channels(self) -> int:
        return int(self.shape[1]) * int(self.conv.get("groups", 1))

    @property
    def out_channels(self) -> int:
        return int(self.shape[0])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.shape[2:])

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(self.conv.get("stride", ()))

    @property
    def padding(self) -> tuple[int, ...]:
        return tuple(self.conv.get("padding", ()))

    @property
    def dilation(self) -> tuple[int, ...]:
        return tuple(self.conv.get("dilation", ()))

    @property
    def groups(self) -> int:
        return int(self.conv.get("groups", 1))

    @property
    def padding_mode(self) -> str:
        return "zeros"

    @property
    def num_embeddings(self) -> int:
        return int(self.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.shape[1])

    def reset_cache(self) -> None:
        """Forget the cached dense weight (after its buffers were changed in place)."""
        self._dense = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._dense = None
        super()._load_from_state_dict(*args, **kwargs)

    def weight_bytes(self) -> int:
        """Bytes of the packed codes plus scales (fp32) and zero points (int16, affine only)."""
        return self.packed.numel() + 4 * self.scale.numel() + 2 * self.zero.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            from deepshrink.quantization.onnx_export import export_layer

            return export_layer(self, x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The torch computation the exported ONNX graph reproduces."""
        if self.kind == "embedding":
            return F.embedding(x, self.dense_weight())
        if self.in_mul is not None:
            x = x * self.in_mul
        if self.mode == "static":
            x = act_fake_quant(x, self.in_scale, self.in_zero, self.act_bits)
        elif self.mode == "dynamic":
            x = token_fake_quant(x) if self.act_granularity == "token" else dynamic_fake_quant(x)
        y = apply_layer(self.kind, x, self.dense_weight().to(x.dtype), self.bias, self.conv)
        if self.mode == "static" and self.meta.get("out_q"):
            y = act_fake_quant(y, self.out_scale, self.out_zero, self.act_bits)
        return y

    def extra_repr(self) -> str:
        dyn = self.mode == "dynamic" and self.kind == "linear"
        acts = f", per-{self.act_granularity} inputs" if dyn else ""
        return (f"{self.kind} {tuple(self.shape)}, {self.mode}, {self.spec.bits} bits, "
                f"{'sym' if self.spec.symmetric else 'affine'}, per-{self.spec.granularity}{acts}"
                f"{', smoothed' if self.in_mul is not None else ''}")
