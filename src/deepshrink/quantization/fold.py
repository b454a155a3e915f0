"""Fold BatchNorm into the convolution (or Linear) before it, and find the activation after it —
through the graph the model actually runs, not by module names.

:func:`trace_graph` runs the model once on example inputs and records every leaf-module call
(its input and output tensors, by identity) and how many times each tensor is *used*: as the
input of a leaf module, or as an argument of any torch function called outside leaf modules
(``x + y``, ``torch.cat``, ``F.relu``...), seen through a ``TorchFunctionMode``. So this works for
any model that runs — registry models, a user's own module, `transformers` CNNs (ResNet,
MobileNetV2, ConvNeXt, EfficientNet) — without ``torch.fx`` (which fails on their control flow).

A BatchNorm is folded into a Conv / Linear when the BN's input *is* the conv's output tensor,
that tensor has no other use, both modules run exactly once, and the BN is in eval mode: then
``bn(conv(x)) == conv'(x)`` with ``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps)
+ beta``, exactly up to float rounding. The BN becomes ``nn.Identity``.

The activation that follows (ReLU, ReLU6, Hardtanh/clip) is recorded the same way (its input is
the conv/BN output and has no other use). Quantization absorbs it into the quantized layer so
the ONNX graph reads ``Conv -> Relu/Clip -> QuantizeLinear``, which ONNX Runtime fuses into one
``QLinearConv`` (the activation disappears into the output quantization range).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from deepshrink import modeling
from deepshrink.models import register_edit
from deepshrink.models.schema import NAME_RE, List, Obj, Str

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Activation modules that are idempotent clamps: (lo, hi) of the clamp.
ACTIVATIONS: dict[type, tuple[float, float]] = {nn.ReLU: (0.0, float("inf")), nn.ReLU6: (0.0, 6.0)}

# Tensor functions that read metadata only: they do not consume the tensor's values.
_META = {
    "size",
    "dim",
    "shape",
    "numel",
    "dtype",
    "device",
    "is_floating_point",
    "__len__",
    "ndim",
    "is_contiguous",
    "requires_grad",
    "__get__",
    "data_ptr",
    "is_complex",
    "layout",
    "stride",
    "element_size",
    "nelement",
    "__format__",
    "__repr__",
    "__bool__",
}


Key = tuple[int, int]  # (id of the tensor, version: bumped when an op writes it in place)


@dataclasses.dataclass
class Call:
    """One leaf-module call seen while tracing."""

    name: str
    inputs: list[Key]
    output: Key | None


@dataclasses.dataclass
class GraphTrace:
    calls: list[Call]
    uses: Counter  # tensor key -> number of value uses
    call_count: Counter  # module name -> number of calls
    versions: dict[int, int] = dataclasses.field(default_factory=dict)

    def key(self, t: torch.Tensor) -> Key:
        return (id(t), self.versions.get(id(t), 0))

    def written(self, t: torch.Tensor) -> Key:
        """``t`` was modified in place: later reads see a new value."""
        self.versions[id(t)] = self.versions.get(id(t), 0) + 1
        return self.key(t)

    def consumers(self, tensor: Key) -> list[Call]:
        return [c for c in self.calls if tensor in c.inputs]


@dataclasses.dataclass
class ActInfo:
    """An activation found right after a conv (after its BN, if any)."""

    module: str
    kind: str  # "relu" | "relu6" | "clip"
    lo: float
    hi: float
    shared: bool  # the module runs more than once (so it stays in place; it is idempotent)


@dataclasses.dataclass
class FoldResult:
    folded: dict[str, str]  # conv / linear name -> folded BatchNorm name
    activations: dict[str, ActInfo]  # conv / linear name -> the activation that follows it
    skipped: dict[str, str]  # BatchNorm name -> why it was not folded

    def summary(self) -> str:
        return (
            f"{len(self.folded)} BatchNorm folded, {len(self.activations)} activations found, "
            f"{len(self.skipped)} BatchNorm left"
        )


class _UseCounter(TorchFunctionMode):
    def __init__(self, trace: GraphTrace, depth: list[int], keep: list[torch.Tensor]) -> None:
        super().__init__()
        self.trace, self.depth, self.keep = trace, depth, keep

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.depth[0] == 0 and name not in _META:
            ins = _tensors((args, kwargs))
            self.keep.extend(ins)
            for t in ins:
                self.trace.uses[self.trace.key(t)] += 1
            if name.endswith("_") and not name.endswith("__") and ins:
                self.trace.written(ins[0])  # x.add_(y), x.relu_(): x holds a new value
        out = func(*args, **kwargs)
        self.keep.extend(_tensors(out))
        return out


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _is_leaf(m: nn.Module) -> bool:
    return next(iter(m.children()), None) is None


@torch.no_grad()
def trace_graph(model: nn.Module, example_inputs: Any) -> GraphTrace:
    """Run ``model`` once (eval mode) and record leaf-module calls and tensor uses."""
    trace = GraphTrace([], Counter(), Counter())
    depth = [0]
    keep: list[torch.Tensor] = []  # holds every traced tensor so that ids are never reused

    def pre(name: str) -> Any:
        def hook(m: nn.Module, args: tuple) -> None:
            if depth[0] == 0:
                ins = _tensors(args)
                keep.extend(ins)
                for t in ins:
                    trace.uses[trace.key(t)] += 1
                trace.calls.append(Call(name, [trace.key(t) for t in ins], None))
                trace.call_count[name] += 1
            depth[0] += 1

        return hook

    def post(m: nn.Module, args: tuple, out: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0 and isinstance(out, torch.Tensor):
            keep.append(out)
            call = trace.calls[-1]
            in_place = any(k[0] == id(out) for k in call.inputs)
            call.output = trace.written(out) if in_place else trace.key(out)

    hooks = []
    for name, m in model.named_modules():
        if name and _is_leaf(m):
            hooks.append(m.register_forward_pre_hook(pre(name)))
            hooks.append(m.register_forward_hook(post))
    try:
        with modeling.eval_mode(model), _UseCounter(trace, depth, keep):
            modeling.call(model, modeling.as_inputs(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return trace


def _single_successor(trace: GraphTrace, call: Call, modules: dict[str, nn.Module]) -> Call | None:
    """The one leaf call that consumes ``call``'s output, if its output has exactly one use
    (looking through ``nn.Identity``, e.g. a BatchNorm folded earlier)."""
    while True:
        if call.output is None or trace.uses[call.output] != 1:
            return None
        nxt = trace.consumers(call.output)
        if len(nxt) != 1 or nxt[0].inputs != [call.output]:
            return None
        if not isinstance(modules[nxt[0].name], nn.Identity):
            return nxt[0]
        call = nxt[0]


def fold_batchnorm(model: nn.Module, *, example_inputs: Any) -> FoldResult:
    """Fold every eligible BatchNorm into the Conv / Linear before it, **in place** (the BN
    becomes ``nn.Identity``), and find the activation after each conv. See the module doc."""
    trace = trace_graph(model, example_inputs)
    modules = dict(model.named_modules())
    result = FoldResult({}, {}, {})
    for call in trace.calls:
        layer = modules[call.name]
        if not isinstance(layer, FOLDABLE) or trace.call_count[call.name] != 1:
            continue
        nxt = _single_successor(trace, call, modules)
        if nxt is not None and isinstance(modules[nxt.name], NORMS):
            why = _fold_problem(layer, modules[nxt.name], trace.call_count[nxt.name])
            if why:
                result.skipped[nxt.name] = why
            else:
                fold_pair(layer, modules[nxt.name])
                modeling.set_submodule(model, nxt.name, nn.Identity())
                result.folded[call.name] = nxt.name
                nxt = _single_successor(trace, nxt, modules)
        act = _activation(modules[nxt.name], nxt.name, trace) if nxt is not None else None
        if act is not None:
            result.activations[call.name] = act
    for name, m in modules.items():
        if isinstance(m, NORMS) and name not in result.folded.values() and name not in result.skipped:
            result.skipped[name] = "its input is not the sole output of a Conv/Linear"
    return result


def _fold_problem(layer: nn.Module, bn: nn.Module, calls: int) -> str:
    if calls != 1:
        return "the BatchNorm runs more than once"
    if bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm has no running statistics"
    out_ch = layer.weight.shape[0]
    if bn.num_features != out_ch:
        return f"channel mismatch ({bn.num_features} vs {out_ch})"
    return ""


def _activation(m: nn.Module, name: str, trace: GraphTrace) -> ActInfo | None:
    shared = trace.call_count[name] > 1
    if type(m) in ACTIVATIONS:
        lo, hi = ACTIVATIONS[type(m)]
        return ActInfo(name, "relu" if hi == float("inf") else "relu6", lo, hi, shared)
    if type(m) is nn.Hardtanh and m.min_val <= 0.0 <= m.max_val:
        return ActInfo(name, "clip", float(m.min_val), float(m.max_val), shared)
    return None


@torch.no_grad()
def fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """``layer`` := ``bn o layer`` (in float64 for the arithmetic, stored back in the layer's dtype)."""
    w = layer.weight.double()
    inv = (bn.running_var.double() + bn.eps).rsqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
    scale = gamma * inv
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(inv)
    view = (-1,) + (1,) * (w.dim() - 1)
    layer.weight.copy_((w * scale.reshape(view)).to(layer.weight.dtype))
    new_bias = (b - bn.running_mean.double()) * scale + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
    else:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))


def absorb_activations(model: nn.Module, activations: dict[str, ActInfo]) -> None:
    """Replace each activation module absorbed by a quantized layer with ``nn.Identity`` (one
    that runs more than once stays: ReLU / ReLU6 / clip are idempotent, so applying it again
    changes nothing)."""
    for info in activations.values():
        if not info.shared:
            modeling.set_submodule(model, info.module, nn.Identity())


_NAMES = List(Str(pattern=NAME_RE), max_len=1 << 14)


@register_edit("fold", schema=Obj({"identity": _NAMES, "bias": _NAMES}))
def _replay_fold(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    """A rebuilt model repeats the folding's structure: folded BNs become Identity and the convs
    before them get a bias (its values come from the file)."""
    for name in edit.get("identity", []):
        modeling.set_submodule(model, name, nn.Identity())
    for name in edit.get("bias", []):
        layer = model.get_submodule(name)
        if isinstance(layer, FOLDABLE) and layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
    return model


def fold_edit(result: FoldResult) -> dict[str, Any]:
    """The structural edit to record after :func:`fold_batchnorm` (see :func:`_replay_fold`)."""
    return {"kind": "fold", "identity": sorted(result.folded.values()), "bias": sorted(result.folded)}
