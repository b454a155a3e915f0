"""AdaRound-lite: learned rounding lowers a layer's output error on the same grid, never moves
a weight by more than one step from nearest rounding, and runs through PTQ."""

from __future__ import annotations

import copy

import torch
from torch import nn

from deepshrink.quantization import PTQConfig, QuantizedLayer, quantize
from deepshrink.quantization.adaround import adaround_layer
from deepshrink.quantization.core import QuantSpec


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).pow(2).mean() / ref.pow(2).mean())


def test_adaround_lowers_output_error_on_the_same_grid() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(4, 8, 10, 10) * torch.linspace(0.1, 3.0, 8)[None, :, None, None]
    q = QuantizedLayer.from_float(conv, QuantSpec(bits=4, symmetric=True, granularity="channel"),
                                  "weight-only", method="minmax")
    w = conv.weight.detach()
    scale, nearest = q.scale.clone(), q.int_rows().clone()
    ref = nn.functional.conv2d(x, w, None, padding=1)
    before = _rel_err(nn.functional.conv2d(x, q.dense_weight(), None, padding=1), ref)
    after = adaround_layer(q, w, x, steps=150)
    assert abs(after - _rel_err(nn.functional.conv2d(x, q.dense_weight(), None, padding=1), ref)) < 1e-6
    assert after < 0.8 * before  # 4-bit: nearest rounding leaves much to gain
    assert torch.equal(q.scale, scale)  # same grid: scales untouched
    changed = (q.int_rows() - nearest).abs()
    assert int(changed.max()) == 1 and int((changed > 0).sum()) > 0  # up or down, never further
    assert int(q.int_rows().abs().max()) <= 7


def test_adaround_through_ptq_keeps_the_model_close() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    calib = torch.randn(16, 3, 8, 8)
    ref = model(calib[:8]).detach()
    outs = {}
    for ada in (False, True):
        cfg = PTQConfig(mode="static", bits=4, adaround=ada, adaround_steps=100, calibration_batches=2)
        q = quantize(copy.deepcopy(model), cfg, calibration=list(calib.split(8)))
        outs[ada] = _rel_err(q(calib[:8]).detach(), ref)
    assert outs[True] < outs[False]
