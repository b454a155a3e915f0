"""Quantized residual adds, so that ONNX Runtime runs ``QLinearAdd``.

A residual ``x + f(x)`` is plain Python inside a block's ``forward`` (not a module), so static
PTQ cannot quantize it like a layer. ORT fuses ``DQ(a), DQ(b) -> Add -> Q`` into ``QLinearAdd``
only when the Add's single consumer is a ``QuantizeLinear``; without one the add stays float
(``DQ -> Add -> Q`` at every consumer).

:func:`find_residual_outputs` runs the model once and watches every ``add`` of two activation
tensors of the same shape called outside leaf modules (a ``TorchFunctionMode``), then finds the
module whose output *is* that sum, or the ReLU / ReLU6 of it (``relu(out + shortcut)``) — through
the traced tensors, not module names. Static PTQ gives that module an :class:`OutputQuant` child
(calibrated like a layer's output) that a forward hook applies to the module's output: the
export then reads ``Add [-> Relu] -> QuantizeLinear -> DequantizeLinear``, ORT drops the Relu into
the zero point and fuses ``QLinearAdd``, and the next conv reuses the add's scale (so its input
``DQ -> Q`` pair is removed and it reads the add's uint8 output directly).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from deepshrink import modeling
from deepshrink.errors import ModelError
from deepshrink.quantization.modules import ActFakeQuant, act_fake_quant

ATTR = "ds_output_q"  # the child module name on a block whose output is quantized
_ADDS = {"add", "__add__", "__iadd__", "add_", "__radd__"}
_CLAMPS = (nn.ReLU, nn.ReLU6)


class OutputQuant(nn.Module):
    """Fake-quantizes a module's output (uint8, per tensor); exported as QuantizeLinear ->
    DequantizeLinear. Carries the attributes :func:`cnn.finish` reads from a producer layer
    (``mode``, ``meta["out_q"]``, ``out_scale``, ``out_zero``), so consumers share its grid."""

    mode = "static"
    act_bits = 8

    def __init__(self) -> None:
        super().__init__()
        self.meta = {"out_q": True}
        self.register_buffer("out_scale", torch.tensor(1.0))
        self.register_buffer("out_zero", torch.tensor(0.0))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _QDQ.apply(y, self.out_scale, self.out_zero.round().clamp(0, 255).to(torch.uint8))
        return act_fake_quant(y, self.out_scale, self.out_zero, self.act_bits)


class _QDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return act_fake_quant(y, s, z.float(), 8)

    @staticmethod
    def symbolic(g: Any, y: Any, s: Any, z: Any) -> Any:
        return g.op("DequantizeLinear", g.op("QuantizeLinear", y, s, z), s, z)


def _quantize_output(mod: nn.Module, args: tuple, y: Any) -> Any:
    """Forward hook (a module-level function: deep copies of the model keep working)."""
    q = getattr(mod, ATTR, None)
    return q(y) if q is not None and isinstance(y, torch.Tensor) else None


def attach(model: nn.Module, name: str) -> OutputQuant:
    """Give module ``name`` an (uncalibrated) output quantizer and the hook applying it."""
    try:
        m = model.get_submodule(name)
    except AttributeError:  # a name read from a file that this model does not have
        raise ModelError(f"the model has no submodule {name!r} to quantize the output of") from None
    q = OutputQuant()
    setattr(m, ATTR, q)
    if _quantize_output not in m._forward_hooks.values():
        m.register_forward_hook(_quantize_output)
    return q


class _AddWatch(TorchFunctionMode):
    """Records (output id, time) of every add of two same-shape image activations (N, C, H, W)
    called outside leaf modules (a transformer's residual stream, 3-D, keeps its float adds)."""

    def __init__(self, depth: list[int], clock: list[int], keep: list[torch.Tensor],
                 adds: list[tuple[int, int]]) -> None:
        super().__init__()
        self.depth, self.clock, self.keep, self.adds = depth, clock, keep, adds

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if self.depth[0] == 0 and name in _ADDS and len(args) >= 2 and isinstance(out, torch.Tensor):
            a, b = args[0], args[1]
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                    and a.dim() == 4 and a.is_floating_point()):
                self.keep.append(out)
                self.clock[0] += 1
                self.adds.append((id(out), self.clock[0]))
        return out


@torch.no_grad()
def find_residual_outputs(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the modules whose output is a residual sum, or the ReLU / ReLU6 of one (see the
    module doc); each runs once. Times order the events, so an in-place ``out += shortcut`` is
    not mistaken for the module that returned ``out`` before the add."""
    depth, clock, keep = [0], [0], []
    adds: list[tuple[int, int]] = []
    outs: list[tuple[int, str, int]] = []  # (output id, module, time): inner modules end first
    clamps: list[tuple[int, int, int]] = []  # ReLU / ReLU6 calls: (input id, output id, time)
    calls: Counter = Counter()
    leaves = {n for n, m in model.named_modules() if n and next(iter(m.children()), None) is None}

    def pre(name: str) -> Any:
        def hook(m: nn.Module, args: tuple) -> None:
            calls[name] += 1
            depth[0] += name in leaves

        return hook

    def post(name: str) -> Any:
        def hook(m: nn.Module, args: tuple, y: Any) -> None:
            depth[0] -= name in leaves
            if not isinstance(y, torch.Tensor):
                return
            keep.append(y)
            clock[0] += 1
            outs.append((id(y), name, clock[0]))
            if isinstance(m, _CLAMPS) and args and isinstance(args[0], torch.Tensor) and args[0] is not y:
                keep.append(args[0])
                clamps.append((id(args[0]), id(y), clock[0]))

        return hook

    hooks = []
    for n, m in model.named_modules():
        if n:
            hooks += [m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n))]
    try:
        with modeling.eval_mode(model), _AddWatch(depth, clock, keep, adds):
            modeling.call(model, modeling.as_inputs(example_inputs))
    finally:
        for h in hooks:
            h.remove()

    def owner(t: int, after: int, leaf_ok: bool) -> str | None:
        return next((n for i, n, tm in outs if i == t and tm >= after and calls[n] == 1
                     and (leaf_ok or n not in leaves)), None)

    found: list[str] = []
    for t, ta in adds:
        name = owner(t, ta, leaf_ok=False)
        if name is None:  # relu(out + shortcut): the module returning the activation's output
            act = next(((o, tm) for i, o, tm in clamps if i == t and tm > ta), None)
            name = owner(act[0], act[1], leaf_ok=True) if act else None
        if name is not None and name not in found:
            found.append(name)
    return found


@torch.no_grad()
def calibrate_outputs(model: nn.Module, names: list[str], batches: list[Any], bits: int, method: str,
                      pct: float) -> dict[str, ActFakeQuant]:
    """Observe each named module's output over ``batches`` (float model); frozen quantizers."""
    obs = {n: ActFakeQuant(bits, method, pct=pct) for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, y, q=obs[n]: q.observer.update(y.detach())) for n in names]
    modeling.run_hooked(model, batches, hooks)
    for q in obs.values():
        q.freeze()
    return obs


def quantize_outputs(model: nn.Module, observed: dict[str, ActFakeQuant]) -> None:
    """Attach the calibrated output quantizers."""
    for name, a in observed.items():
        q = attach(model, name)
        q.out_scale, q.out_zero = a.current_scale(), a.zero.detach().clone()


def producer_view(module: Any) -> Any:
    """What :func:`cnn.finish` reads a producer's output grid from: the module's own (a
    quantized layer) or its output quantizer (a residual block)."""
    return getattr(module, ATTR, module)


__all__ = ["OutputQuant", "attach", "calibrate_outputs", "find_residual_outputs", "quantize_outputs"]
