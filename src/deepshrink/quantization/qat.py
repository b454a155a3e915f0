"""Quantization-aware training: ``prepare_qat(model, QATConfig(...))``, train with
:func:`deepshrink.train.train` as usual, then ``convert(model)`` to the same deployable
:class:`QuantizedLayer` form PTQ produces (saved, exported and run the same way).

Weights are fake-quantized with a straight-through estimator; activations (when ``act_bits``
is set) with a moving-average range, or — with ``lsq=True`` — weights and activations use a
learned step size (LSQ) initialised from the range estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from deepshrink.config import Config, check, override_for, warn_unmatched
from deepshrink.modeling import call, eval_mode, set_submodule
from deepshrink.models import record_edit
from deepshrink.quantization.core import QuantSpec, validate_bits
from deepshrink.quantization.fold import fold_batchnorm, fold_edit
from deepshrink.quantization.modules import (
    ActFakeQuant,
    FakeQuantLayer,
    QuantizedLayer,
    WeightFakeQuant,
    float_weight,
)
from deepshrink.quantization.ptq import need_batches, quantizable_layers, validate_weight_fields


@dataclasses.dataclass
class QATConfig(Config):
    bits: int = 4  # weight bits (1 = binary; 2 with symmetric = ternary)
    act_bits: int | None = 8  # None: weight-only QAT (converts to weight-only)
    symmetric: bool = True
    granularity: str = "channel"  # tensor | channel | group
    group_size: int = 64
    lsq: bool = False  # learned step size for weights and activations
    weight_range: str = "mse"  # initial clipping: minmax | percentile | mse
    momentum: float = 0.1  # activation moving-average range
    overrides: dict[str, int] = dataclasses.field(default_factory=dict)  # name regex -> weight bits
    ignore: tuple[str, ...] = ()  # name regexes (full match) left in float
    calibration_batches: int = 4
    # Fold BatchNorm into the convs first (needs calibration data to trace the model), so the
    # exported model is what was trained: a BN left in would keep updating its statistics.
    fold: bool = True

    def validate(self) -> None:
        n = type(self).__name__
        validate_weight_fields(self)
        if self.act_bits is not None:
            validate_bits(n, "act_bits", self.act_bits)
        check(self.calibration_batches >= 1, n, "calibration_batches",
              f"must be >= 1, got {self.calibration_batches}")
        check(0.0 < self.momentum <= 1.0, n, "momentum", f"must be in (0, 1], got {self.momentum}")


def prepare_qat(model: nn.Module, config: QATConfig | None = None, *, example_inputs: Any = None,
                calibration: Any = None) -> nn.Module:
    """Wrap every quantizable layer with fake quantizers, **in place**; return the model.

    ``calibration`` (or else ``example_inputs``, one batch) initialises activation ranges
    (required with ``lsq`` and ``act_bits``,
    whose learned scales must exist before the optimizer is built)."""
    cfg = config or QATConfig()
    warn_unmatched(type(cfg).__name__, (n for n, _ in model.named_modules()), [*cfg.ignore, *cfg.overrides])
    if calibration is None and example_inputs is not None:
        calibration = [example_inputs]
    if cfg.fold and calibration is not None:
        first = need_batches(calibration, 1, "BatchNorm folding")[0]
        record_edit(model, fold_edit(fold_batchnorm(model, example_inputs=first)))
    acts: list[ActFakeQuant] = []
    for name, layer in quantizable_layers(model, cfg.ignore):
        spec = QuantSpec(bits=override_for(name, cfg.overrides, cfg.bits), symmetric=cfg.symmetric,
                         granularity=cfg.granularity, group_size=cfg.group_size)
        wq = WeightFakeQuant(spec, cfg.weight_range, cfg.lsq)
        wq.init_from(float_weight(layer))
        a_in = a_out = None
        if cfg.act_bits is not None:
            a_in = ActFakeQuant(cfg.act_bits, "moving_average", cfg.lsq, momentum=cfg.momentum)
            if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
                a_out = ActFakeQuant(cfg.act_bits, "moving_average", cfg.lsq, momentum=cfg.momentum)
            acts += [a for a in (a_in, a_out) if a is not None]
        set_submodule(model, name, FakeQuantLayer(layer, wq, a_in, a_out))
    if acts and (calibration is not None or cfg.lsq):
        batches = need_batches(calibration, cfg.calibration_batches, "QAT with learned step sizes")
        for a in acts:
            a.observing = True
        with eval_mode(model), torch.no_grad():
            for x in batches:
                call(model, x)
        for a in acts:
            a.observing = False
            a.freeze()
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace fake-quant layers by deployable :class:`QuantizedLayer` s, **in place**."""
    metas: dict[str, Any] = {}
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLayer)]:
        mode = "static" if m.input_q is not None else "weight-only"
        q = QuantizedLayer.from_float(m.layer, m.weight_q.spec, mode, act=m.input_q, out=m.output_q,
                                      weight_q=m.weight_q)
        set_submodule(model, name, q)
        metas[name] = q.meta
    model.eval()
    record_edit(model, {"kind": "quantize", "layers": metas})
    return model
