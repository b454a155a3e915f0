"""Post-training quantization: ``quantize(model, PTQConfig(...), calibration_data)``.

Modes:

* ``weight-only``: weights to ``bits`` (1-8) with packed storage; activations stay float.
* ``dynamic``: int8 weights; activations quantized per tensor at run time (uint8 over the
  batch's own range) — no calibration.
* ``static``: int8 weights and activations; input (and conv output) ranges calibrated on
  ``calibration_data`` with the chosen observer.

Mixed precision: with ``target_bits`` set, a sensitivity pass picks per-layer weight bits from
``candidate_bits`` so that the parameter-weighted average meets the target (see :mod:`mixed`).
The quantized model records a ``{"kind": "quantize"}`` edit in its spec, so ``deepshrink.save``
writes a rebuildable file and ``deepshrink.load`` reads it back.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.config import Config, check
from deepshrink.data import DataBundle
from deepshrink.errors import DataError
from deepshrink.models import record_edit, register_edit
from deepshrink.models.schema import CONV_ARGS, Bool, Int, List, Map, Obj, Str
from deepshrink.quantization.core import GRANULARITIES, QuantSpec, validate_bits
from deepshrink.quantization.modules import (
    MODES,
    QUANTIZABLE,
    ActFakeQuant,
    QuantizedLayer,
)
from deepshrink.quantization.observers import ACT_RANGE_METHODS, RANGE_METHODS

Inputs = torch.Tensor | dict[str, torch.Tensor]


def validate_weight_fields(cfg: Any) -> None:
    """Checks shared by PTQConfig and QATConfig: weight bits, granularity, group size, range
    method and per-layer bits."""
    n = type(cfg).__name__
    validate_bits(n, "bits", cfg.bits)
    check(cfg.granularity in GRANULARITIES, n, "granularity",
          f"must be one of {GRANULARITIES}, got {cfg.granularity!r}")
    check(cfg.group_size >= 1, n, "group_size", f"must be >= 1, got {cfg.group_size}")
    check(cfg.weight_range in RANGE_METHODS, n, "weight_range",
          f"must be one of {RANGE_METHODS}, got {cfg.weight_range!r}")
    for pat, b in cfg.layer_bits.items():
        validate_bits(n, f"layer_bits[{pat!r}]", b)


@dataclasses.dataclass
class PTQConfig(Config):
    mode: str = "static"  # weight-only | dynamic | static
    bits: int = 8  # weight bits (1 = binary; 2 with symmetric = ternary)
    act_bits: int = 8  # static mode activations (ONNX export needs 8)
    symmetric: bool = True  # weights; activations are always affine (uint8 in ONNX)
    granularity: str = "channel"  # tensor | channel | group (group: weight-only / safetensors)
    group_size: int = 64
    weight_range: str = "mse"  # minmax | percentile | mse
    act_range: str = "percentile"  # minmax | moving_average | percentile | mse
    percentile: float = 99.99
    calib_batches: int = 8
    layer_bits: dict[str, int] = dataclasses.field(default_factory=dict)  # name pattern -> bits
    skip: tuple[str, ...] = ()  # name patterns left in float (fnmatch)
    target_bits: float | None = None  # mixed precision: average weight bits to reach
    candidate_bits: tuple[int, ...] = (2, 4, 8)
    embedding_bits: int | None = None  # also quantize nn.Embedding tables (weight-only, per row)

    def validate(self) -> None:
        n = type(self).__name__
        check(self.mode in MODES, n, "mode", f"must be one of {MODES}, got {self.mode!r}")
        validate_weight_fields(self)
        validate_bits(n, "act_bits", self.act_bits)
        check(self.act_range in ACT_RANGE_METHODS, n, "act_range",
              f"must be one of {ACT_RANGE_METHODS}, got {self.act_range!r}")
        check(50.0 < self.percentile <= 100.0, n, "percentile",
              f"must be in (50, 100], got {self.percentile}")
        check(self.calib_batches >= 1, n, "calib_batches", f"must be >= 1, got {self.calib_batches}")
        for b in self.candidate_bits:
            validate_bits(n, "candidate_bits", b)
        if self.embedding_bits is not None:
            validate_bits(n, "embedding_bits", self.embedding_bits)
        if self.target_bits is not None:
            check(min(self.candidate_bits) <= self.target_bits <= max(self.candidate_bits), n,
                  "target_bits",
                  f"must lie within candidate_bits {self.candidate_bits}, got {self.target_bits}")

    def spec_for(self, name: str, bits: int | None = None) -> QuantSpec:
        return QuantSpec(bits=bits or bits_for(name, self.bits, self.layer_bits),
                         symmetric=self.symmetric, granularity=self.granularity,
                         group_size=self.group_size)


def bits_for(name: str, default: int, layer_bits: dict[str, int]) -> int:
    """Per-layer bits: the first pattern in ``layer_bits`` matching ``name`` wins."""
    for pat, b in layer_bits.items():
        if fnmatch.fnmatchcase(name, pat):
            return b
    return default


def quantizable_layers(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv1d / Conv2d not matched by a ``skip`` pattern."""
    skip = tuple(skip)
    return [(n, m) for n, m in model.named_modules()
            if type(m) in QUANTIZABLE and not any(fnmatch.fnmatchcase(n, p) for p in skip)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def calibration_batches(data: Any, n: int, batch_size: int = 64) -> list[Inputs]:
    """Up to ``n`` input batches from a DataBundle (train split), DataLoader, tensor, dict of
    tensors (e.g. ``{"input_ids": ...}``) or an iterable of batches."""
    if data is None:
        raise DataError("static quantization needs calibration data",
                        hint="pass a DataBundle, DataLoader or tensor of inputs")
    if isinstance(data, DataBundle):
        data = data.loader("train", batch_size, shuffle=True, seed=0)
    if isinstance(data, torch.Tensor):
        return list(data.split(batch_size))[:n]
    if isinstance(data, dict):
        first = next(iter(data.values()))
        return [{k: v[i:i + batch_size] for k, v in data.items()}
                for i in range(0, len(first), batch_size)][:n]
    out: list[Inputs] = []
    for batch in data if isinstance(data, (DataLoader, Iterable)) else ():
        if len(out) >= n:
            break
        out.append(batch if isinstance(batch, (torch.Tensor, dict)) else batch[0])
    if not out:
        raise DataError("calibration data yielded no batches")
    return out


def run_model(model: nn.Module, x: Inputs) -> Any:
    return model(**x) if isinstance(x, dict) else model(x)


@torch.no_grad()
def calibrate(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Inputs],
              cfg: PTQConfig) -> dict[str, tuple[ActFakeQuant, ActFakeQuant | None]]:
    """Observe each layer's input (and conv output) over the batches; return frozen quantizers."""
    obs: dict[str, tuple[ActFakeQuant, ActFakeQuant | None]] = {}
    hooks = []
    for name, layer in layers:
        a_in = ActFakeQuant(cfg.act_bits, cfg.act_range, pct=cfg.percentile)
        a_out = None if isinstance(layer, nn.Linear) else ActFakeQuant(cfg.act_bits, cfg.act_range,
                                                                        pct=cfg.percentile)
        # Hooks return None, so the float model runs unchanged while the observers watch.
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, q=a_in: q.observer.update(args[0].detach())))
        if a_out is not None:
            hooks.append(layer.register_forward_hook(
                lambda m, args, y, q=a_out: q.observer.update(y.detach())))
        obs[name] = (a_in, a_out)
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            run_model(model, x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for a_in, a_out in obs.values():
        a_in.freeze()
        if a_out is not None:
            a_out.freeze()
    return obs


def quantize(model: nn.Module, config: PTQConfig | None = None, calibration_data: Any = None) -> nn.Module:
    """Quantize ``model`` **in place** (its Linear/Conv layers become :class:`QuantizedLayer`)
    and return it. ``calibration_data`` is needed for ``static`` mode and mixed precision."""
    cfg = config or PTQConfig()
    model.eval()
    layers = quantizable_layers(model, cfg.skip)
    layer_bits = dict(cfg.layer_bits)
    batches: list[Inputs] | None = None
    if cfg.mode == "static" or cfg.target_bits is not None:
        batches = calibration_batches(calibration_data, cfg.calib_batches)
    if cfg.target_bits is not None:
        from deepshrink.quantization.mixed import choose_bits, layer_sensitivity

        assert batches is not None
        sens = layer_sensitivity(model, layers, batches, cfg)
        sizes = {n: m.weight.numel() for n, m in layers}
        chosen = choose_bits(sens, sizes, cfg.target_bits)
        layer_bits = {**chosen, **layer_bits}
    acts = calibrate(model, layers, batches, cfg) if cfg.mode == "static" else {}
    metas: dict[str, Any] = {}
    for name, layer in layers:
        spec = cfg.spec_for(name, bits_for(name, cfg.bits, layer_bits))
        a_in, a_out = acts.get(name, (None, None))
        q = QuantizedLayer.from_float(layer, spec, cfg.mode, method=cfg.weight_range, act=a_in, out=a_out)
        set_module(model, name, q)
        metas[name] = q.meta
    if cfg.embedding_bits is not None:
        emb = [(n, m) for n, m in model.named_modules() if type(m) is nn.Embedding
               and not any(fnmatch.fnmatchcase(n, p) for p in cfg.skip)]
        for name, layer in emb:
            spec = QuantSpec(bits=cfg.embedding_bits, symmetric=True, granularity="channel")
            q = QuantizedLayer.from_float(layer, spec, "weight-only", method=cfg.weight_range)
            set_module(model, name, q)
            metas[name] = q.meta
    record_edit(model, {"kind": "quantize", "layers": metas})
    return model


_QSPEC = Obj({}, optional={"type": Str(choices=("QuantSpec",)), "bits": Int(1, 8), "symmetric": Bool(),
                           "granularity": Str(choices=GRANULARITIES), "group_size": Int(1, 1 << 20),
                           "narrow": Bool(), "axis": Int(-8, 8)})
QUANTIZE_SCHEMA = Obj({"layers": Map(Obj(
    {"kind": Str(choices=("linear", "conv1d", "conv2d", "embedding")), "mode": Str(choices=MODES),
     "spec": _QSPEC, "shape": List(Int(0, 1 << 31), min_len=1, max_len=5)},
    optional={"bias": Bool(), "conv": CONV_ARGS, "act_bits": Int(1, 16), "out_q": Bool()}))})


@register_edit("quantize", schema=QUANTIZE_SCHEMA)
def _replay_quantize(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    """Rebuild empty quantized layers of the recorded shapes; the file fills their buffers."""
    for name, meta in edit["layers"].items():
        set_module(model, name, QuantizedLayer(meta))
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all quantized weights as stored (codes, scales, zero points)."""
    return sum(m.weight_bytes() for m in quantized_layers(model).values())
