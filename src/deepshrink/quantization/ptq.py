"""Post-training quantization: ``quantize(model, PTQConfig(...), calibration=batches)``.

Modes:

* ``weight-only``: weights to ``bits`` (1-8) with packed storage; activations stay float.
* ``dynamic``: int8 weights; activations quantized per tensor at run time (uint8 over the
  batch's own range) — no calibration.
* ``static``: int8 weights and activations; input (and conv output) ranges calibrated on
  ``calibration`` with the chosen observer.

Mixed precision: with ``target_bits`` set, a sensitivity pass picks per-layer weight bits from
``candidate_bits`` so that the parameter-weighted average meets the target (see :mod:`mixed`).
The quantized model records a ``{"kind": "quantize"}`` edit in its spec, so ``deepshrink.save``
writes a rebuildable file and ``deepshrink.load`` reads it back.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from deepshrink.config import Config, check
from deepshrink.errors import DataError
from deepshrink.modeling import Inputs, calibration_batches, call, eval_mode, set_submodule
from deepshrink.models import record_edit, register_edit
from deepshrink.quantization.core import GRANULARITIES, QuantSpec, validate_bits
from deepshrink.quantization.modules import (
    MODES,
    ActFakeQuant,
    QuantizedLayer,
    is_quantizable,
)
from deepshrink.quantization.observers import ACT_RANGE_METHODS, RANGE_METHODS


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
    for pat, b in cfg.overrides.items():
        validate_bits(n, f"overrides[{pat!r}]", b)
    check_patterns(n, "overrides", cfg.overrides)
    check_patterns(n, "ignore", cfg.ignore)


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
    calibration_batches: int = 8
    overrides: dict[str, int] = dataclasses.field(default_factory=dict)  # name regex -> weight bits
    ignore: tuple[str, ...] = ()  # name regexes (full match) left in float
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
        check(self.calibration_batches >= 1, n, "calibration_batches",
              f"must be >= 1, got {self.calibration_batches}")
        for b in self.candidate_bits:
            validate_bits(n, "candidate_bits", b)
        if self.embedding_bits is not None:
            validate_bits(n, "embedding_bits", self.embedding_bits)
        if self.target_bits is not None:
            check(min(self.candidate_bits) <= self.target_bits <= max(self.candidate_bits), n,
                  "target_bits",
                  f"must lie within candidate_bits {self.candidate_bits}, got {self.target_bits}")

    def spec_for(self, name: str, bits: int | None = None) -> QuantSpec:
        return QuantSpec(bits=bits or bits_for(name, self.bits, self.overrides),
                         symmetric=self.symmetric, granularity=self.granularity,
                         group_size=self.group_size)


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` equals one of ``patterns`` or matches it as a regex (full match)."""
    return any(name == p or re.fullmatch(p, name) for p in patterns)


def check_patterns(cls_name: str, field: str, patterns: Iterable[str]) -> None:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            check(False, cls_name, field, f"bad regex {p!r}: {exc}")


def bits_for(name: str, default: int, overrides: dict[str, int]) -> int:
    """Per-layer bits: the first regex in ``overrides`` that fully matches ``name`` wins."""
    for pat, b in overrides.items():
        if name_matches(name, (pat,)):
            return b
    return default


def quantizable_layers(model: nn.Module, ignore: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv1d / Conv2d / HF Conv1D not matched by an ``ignore`` regex."""
    ignore = tuple(ignore)
    return [(n, m) for n, m in model.named_modules()
            if is_quantizable(m) and not name_matches(n, ignore)]


def need_batches(calibration: Any, n: int, why: str) -> list[Inputs]:
    """Calibration batches, or a DataError saying why they are needed."""
    batches = calibration_batches(calibration, n)
    if not batches:
        raise DataError(f"{why} needs calibration data",
                        hint="pass calibration= (a DataBundle, DataLoader, tensor, tuple or tokenizer dict)")
    return batches


@torch.no_grad()
def calibrate(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Inputs],
              cfg: PTQConfig) -> dict[str, tuple[ActFakeQuant, ActFakeQuant | None]]:
    """Observe each layer's input (and conv output) over the batches; return frozen quantizers."""
    obs: dict[str, tuple[ActFakeQuant, ActFakeQuant | None]] = {}
    hooks = []
    for name, layer in layers:
        a_in = ActFakeQuant(cfg.act_bits, cfg.act_range, pct=cfg.percentile)
        conv = isinstance(layer, (nn.Conv1d, nn.Conv2d))
        a_out = ActFakeQuant(cfg.act_bits, cfg.act_range, pct=cfg.percentile) if conv else None
        # Hooks return None, so the float model runs unchanged while the observers watch.
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, q=a_in: q.observer.update(args[0].detach())))
        if a_out is not None:
            hooks.append(layer.register_forward_hook(
                lambda m, args, y, q=a_out: q.observer.update(y.detach())))
        obs[name] = (a_in, a_out)
    try:
        with eval_mode(model):
            for x in batches:
                call(model, x)
    finally:
        for h in hooks:
            h.remove()
    for a_in, a_out in obs.values():
        a_in.freeze()
        if a_out is not None:
            a_out.freeze()
    return obs


def quantize(model: nn.Module, config: PTQConfig | None = None, *, example_inputs: Any = None,
             calibration: Any = None) -> nn.Module:
    """Quantize ``model`` **in place** (its Linear/Conv layers become :class:`QuantizedLayer`)
    and return it. ``calibration`` (a DataBundle, DataLoader, list of batches, tensor, tuple or
    tokenizer dict) is needed for ``static`` mode and mixed precision; ``example_inputs`` is
    accepted for the common contract (one batch; used as calibration when none is given)."""
    cfg = config or PTQConfig()
    model.eval()
    if calibration is None and example_inputs is not None:
        calibration = [example_inputs]
    layers = quantizable_layers(model, cfg.ignore)
    layer_bits = dict(cfg.overrides)
    batches: list[Inputs] | None = None
    if cfg.mode == "static" or cfg.target_bits is not None:
        batches = need_batches(calibration, cfg.calibration_batches, f"{cfg.mode} quantization")
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
        set_submodule(model, name, q)
        metas[name] = q.meta
    if cfg.embedding_bits is not None:
        emb = [(n, m) for n, m in model.named_modules() if type(m) is nn.Embedding
               and not name_matches(n, cfg.ignore)]
        for name, layer in emb:
            spec = QuantSpec(bits=cfg.embedding_bits, symmetric=True, granularity="channel")
            q = QuantizedLayer.from_float(layer, spec, "weight-only", method=cfg.weight_range)
            set_submodule(model, name, q)
            metas[name] = q.meta
    record_edit(model, {"kind": "quantize", "layers": metas})
    return model


@register_edit("quantize")
def _replay_quantize(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    """Rebuild empty quantized layers of the recorded shapes; the file fills their buffers."""
    for name, meta in edit["layers"].items():
        set_submodule(model, name, QuantizedLayer(meta))
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all quantized weights as stored (codes, scales, zero points)."""
    return sum(m.weight_bytes() for m in quantized_layers(model).values())
