"""The CNN steps of static PTQ (see :func:`ptq.quantize`): fold BatchNorm, optionally equalize,
absorb activations, quantize residual block outputs (:mod:`residual`), share quantization
parameters along conv chains, learn the rounding (AdaRound), correct biases.

Sharing: when a conv's input *is* another conv's quantized output, or a residual block's
quantized output (through Identity / Dropout / an idempotent ReLU), the consumer reuses the
producer's output scale and zero point. Its input
QuantizeLinear then repeats the producer's exactly, the exported ``DQ -> Q`` pair is removed
(:func:`ort_graph.collapse_qdq_pairs`) and ONNX Runtime sees ``QLinearConv -> QLinearConv``
with no float tensor in between.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepshrink import modeling
from deepshrink.models.schema import NAME_RE, List, Obj, Str
from deepshrink.quantization import residual
from deepshrink.quantization.equalize import EqualizeResult, correct_biases, equalize
from deepshrink.quantization.fold import ActInfo, FoldResult, absorb_activations, fold_batchnorm

Clamp = tuple[float, float]
_PASS_ALWAYS = (nn.Identity, nn.Dropout)
_CLAMPS: dict[type, Clamp] = {nn.ReLU: (0.0, math.inf), nn.ReLU6: (0.0, 6.0)}


@dataclasses.dataclass
class CnnPrep:
    """What the float-side steps did, for the PTQ report."""

    fold: FoldResult
    equalized: EqualizeResult | None
    activations: dict[str, ActInfo]
    means: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    outputs: list[str] = dataclasses.field(default_factory=list)  # residual blocks with quantized outputs

    def clamps(self) -> dict[str, Clamp]:
        return {n: (a.lo, a.hi) for n, a in self.activations.items()}

    def edit(self, quantized: set[str], absorbed: bool = True) -> dict[str, list[str]]:
        """What a rebuilt model must repeat before loading: modules that became Identity
        (folded BatchNorms, absorbed activations) and ReLU6 turned into ReLU by equalization."""
        gone = list(self.fold.folded.values())
        if absorbed:
            gone += [a.module for n, a in self.activations.items() if n in quantized and not a.shared]
        relu = self.equalized.relu6_replaced if self.equalized else []
        out: dict[str, list[str]] = {"identity": sorted(set(gone)), "relu": sorted(set(relu) - set(gone))}
        if self.outputs:
            out["outputs"] = list(self.outputs)
        return out


def prepare(model: nn.Module, batches: list[Any], *, equalize_weights: bool) -> CnnPrep:
    """Fold BN (and equalize) in place; find the activations to absorb."""
    folded = fold_batchnorm(model, example_inputs=batches[0])
    eq = None
    if equalize_weights:
        eq = equalize(model, example_inputs=batches[0])
        folded_again = fold_batchnorm(model, example_inputs=batches[0])  # activations may have changed
        acts = folded_again.activations
    else:
        acts = folded.activations
    return CnnPrep(folded, eq, acts)


def _contains(outer: Clamp, inner: Clamp | None) -> bool:
    return inner is not None and outer[0] <= inner[0] and inner[1] <= outer[1]


@torch.no_grad()
def link_chains(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    batch: Any,
    clamps: dict[str, Clamp],
    blocks: tuple[str, ...] | list[str] = (),
) -> dict[str, str]:
    """consumer layer -> producer whose (clamped) output is the consumer's input: a layer, or a
    block in ``blocks`` (a residual block whose output gets quantized)."""
    ins: dict[str, int] = {}
    outs: dict[int, str] = {}
    back: dict[int, tuple[int, Clamp | None]] = {}  # pass-through module: out id -> (in id, clamp)
    keep: list[torch.Tensor] = []
    hooks = []
    names = {id(m): n for n, m in layers}
    for b in blocks:
        hooks.append(model.get_submodule(b).register_forward_hook(
            _recorder(keep, lambda y, a, n=b: outs.__setitem__(id(y), n))))
    for _name, m in model.named_modules():
        if id(m) in names:
            n = names[id(m)]
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: ins.__setitem__(n, id(a[0]))))
            hooks.append(
                m.register_forward_hook(_recorder(keep, lambda y, a, n=n: outs.__setitem__(id(y), n)))
            )
        elif isinstance(m, _PASS_ALWAYS) or type(m) in _CLAMPS:
            c = _CLAMPS.get(type(m))
            hooks.append(
                m.register_forward_hook(
                    _recorder(keep, lambda y, a, c=c: back.__setitem__(id(y), (id(a[0]), c)))
                )
            )
    try:
        with modeling.eval_mode(model):
            modeling.call(model, batch)
    finally:
        for h in hooks:
            h.remove()
    links: dict[str, str] = {}
    for consumer, tid in ins.items():
        path: list[Clamp] = []
        seen = {tid}
        while tid not in outs and tid in back and back[tid][0] not in seen:
            tid, c = back[tid]
            seen.add(tid)
            if c is not None:
                path.append(c)
        producer = outs.get(tid)
        # every activation on the way must leave the producer's (clamped) values unchanged
        if producer and producer != consumer and all(_contains(c, clamps.get(producer)) for c in path):
            links[consumer] = producer
    return links


_NAMES = List(Str(pattern=NAME_RE), max_len=1 << 14)
EDIT_SCHEMA = Obj({}, optional={"identity": _NAMES, "relu": _NAMES, "outputs": _NAMES})


def replay(model: nn.Module, edit: dict[str, Any]) -> None:
    """Repeat :meth:`CnnPrep.edit` on a freshly built model (values come from the file)."""
    for name in edit.get("identity", []):
        modeling.set_submodule(model, name, nn.Identity())
    for name in edit.get("relu", []):
        modeling.set_submodule(model, name, nn.ReLU())
    for name in edit.get("outputs", []):
        residual.attach(model, name)


def _recorder(keep: list[torch.Tensor], record: Any) -> Any:
    """A forward hook that records (and keeps alive) tensors and returns None (a hook's return
    value would replace the module's output)."""

    def hook(mod: nn.Module, args: tuple, y: Any) -> None:
        # an in-place activation returns its input: identity is kept, nothing to record
        if isinstance(y, torch.Tensor) and args and isinstance(args[0], torch.Tensor) and args[0] is not y:
            keep.extend([args[0], y])
            record(y, args)

    return hook


def finish(
    model: nn.Module,
    prep: CnnPrep,
    float_weights: dict[str, torch.Tensor],
    links: dict[str, str],
    *,
    absorb: bool = True,
    adaround: Callable[[], Any] | None = None,
) -> dict[str, str]:
    """After the layers are quantized: share linked activation parameters, absorb activations,
    learn the rounding (``adaround``, on the finished graph), correct biases (for the final
    codes). Returns the links actually applied."""
    modules = dict(model.named_modules())
    applied = {}
    for consumer, producer in links.items():
        c, p = modules.get(consumer), residual.producer_view(modules.get(producer))
        if (
            getattr(c, "mode", None) == "static"
            and getattr(p, "mode", None) == "static"
            and p.meta.get("out_q")
        ):
            c.in_scale, c.in_zero = p.out_scale.clone(), p.out_zero.clone()
            applied[consumer] = producer
    quantized = {n: a for n, a in prep.activations.items() if hasattr(modules.get(n), "dense_weight")}
    if absorb:  # (not when layers may go back to float later: the activation must then stay)
        absorb_activations(model, quantized)
    if adaround is not None:
        adaround()
    if prep.means:
        correct_biases(model, prep.means, float_weights)
    return applied
