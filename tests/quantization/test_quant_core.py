"""Quantizer maths, range estimation, bit packing and configs."""

from __future__ import annotations

import pytest
import torch

from deepshrink.errors import ConfigError
from deepshrink.quantization import PTQConfig, QATConfig, QuantSpec, qparams, qrange, quantize_tensor
from deepshrink.quantization.core import fake_quantize_rows, to_rows
from deepshrink.quantization.observers import (
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    PercentileObserver,
    weight_range,
)
from deepshrink.quantization.packing import pack_bits, packed_nbytes, unpack_bits

SPECS = [QuantSpec(bits=b, symmetric=s, granularity=g, group_size=16)
         for b in range(2, 9) for s in (True, False) for g in ("tensor", "channel", "group")]


@pytest.mark.parametrize("spec", SPECS,
                         ids=lambda s: f"{s.bits}b-{'sym' if s.symmetric else 'aff'}-{s.granularity}")
def test_roundtrip_error_within_half_step(spec: QuantSpec) -> None:
    torch.manual_seed(spec.bits)
    # Skewed rows (offsets and scales differ per channel) and a width not divisible by the group.
    w = torch.randn(12, 40) * torch.linspace(0.1, 3, 12)[:, None] + torch.linspace(-1, 2, 12)[:, None]
    qt = quantize_tensor(w, spec)
    err = (qt.dequantize() - w).abs()
    # Each element's bound is its own row's scale / 2 (plus float rounding slack).
    rows_scale = qt.scale[:, None].expand(-1, to_rows(w, spec).shape[1])
    from deepshrink.quantization.core import from_rows

    bound = from_rows(rows_scale, w.shape, spec) / 2
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-7), float((err - bound).max())
    qmin, qmax = qrange(spec.bits, spec.symmetric, spec.narrow)
    assert int(qt.q.min()) >= qmin and int(qt.q.max()) <= qmax
    assert qt.q.dtype == torch.int16


@pytest.mark.parametrize("symmetric", [True, False])
def test_clamping_outside_range(symmetric: bool) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="tensor")
    lo, hi = torch.tensor([-1.0]), torch.tensor([1.0])
    x = torch.tensor([[-5.0, -1.0, 0.0, 0.3, 1.0, 7.0]])
    y = fake_quantize_rows(x, lo, hi, spec)
    scale, zero = qparams(lo, hi, spec)
    qmin, qmax = qrange(4, symmetric)
    assert torch.isclose(y[0, 0], (qmin - zero[0]) * scale[0])  # clamped to the grid's low end
    assert torch.isclose(y[0, -1], (qmax - zero[0]) * scale[0])
    assert float(y[0, 2]) == 0.0  # zero is exact
    assert float((y[0, 1:5] - x[0, 1:5]).abs().max()) <= float(scale[0]) / 2 + 1e-6


def test_scale_formula() -> None:
    # affine 8-bit over [-1, 3]: scale = 4 / 255, zero point round(255 / 4) = 64
    s, z = qparams(torch.tensor([-1.0]), torch.tensor([3.0]), QuantSpec(bits=8, symmetric=False))
    assert torch.isclose(s, torch.tensor([4 / 255])) and int(z) == 64
    s, z = qparams(torch.tensor([-1.0]), torch.tensor([3.0]), QuantSpec(bits=8, symmetric=True))
    assert torch.isclose(s, torch.tensor([3 / 127])) and int(z) == 0


def test_binary_and_ternary_values() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 50)
    qb = quantize_tensor(w, QuantSpec(bits=1))
    assert set(qb.q.unique().tolist()) == {-1, 1}
    d = qb.dequantize()
    for r in range(6):  # each channel: exactly ±mean|w|
        vals = d[r].abs().unique()
        assert len(vals) == 1 and torch.isclose(vals[0], w[r].abs().mean())
    assert torch.equal(torch.sign(d), torch.where(w >= 0, 1.0, -1.0))
    lo, hi = weight_range(to_rows(w, QuantSpec(bits=2)), QuantSpec(bits=2), "mse")
    qt = quantize_tensor(w, QuantSpec(bits=2), lo, hi)
    assert set(qt.q.unique().tolist()) == {-1, 0, 1}
    assert len(qt.dequantize()[0].unique()) == 3


def test_mse_clipping_beats_minmax_at_low_bits() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    w[:, 0] = 8.0  # one outlier per channel ruins min-max at 3 bits
    spec = QuantSpec(bits=3)
    rows = to_rows(w, spec)
    errs = {}
    for method in ("minmax", "percentile", "mse"):
        lo, hi = weight_range(rows, spec, method)
        errs[method] = float((fake_quantize_rows(rows, lo, hi, spec) - rows).pow(2).sum())
    assert errs["mse"] < errs["minmax"] and errs["mse"] <= errs["percentile"] * 1.0001


def test_observers() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(64, 32) for _ in range(6)]
    batches[-1][0, 0] = 100.0  # one outlier value in 12288
    mm, ema = MinMaxObserver(), MovingAverageObserver(0.1)
    pc, mse = PercentileObserver(99.9), MSEObserver(QuantSpec(bits=8, symmetric=False, granularity="tensor"))
    for b in batches:
        for o in (mm, ema, pc, mse):
            o.update(b)
    assert mm.range()[1] == 100.0
    assert ema.range()[1] < 20  # one outlier batch moves the EMA by 10 %
    assert pc.range()[1] < 10  # the outlier is < 0.1 % of the values
    assert 0 < mse.range()[1] <= 100.0
    with pytest.raises(ConfigError):
        MinMaxObserver().range()


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_roundtrip_and_bytes(bits: int) -> None:
    n = 1001
    codes = torch.randint(0, 2**bits, (n,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([2**bits]), bits)


def test_config_roundtrip() -> None:
    for cfg in (PTQConfig(mode="weight-only", bits=3, granularity="group", overrides={"fc.*": 8},
                          ignore=("0",), target_bits=4.0, embedding_bits=8),
                QATConfig(bits=2, act_bits=None, lsq=True, overrides={"2": 8}),
                QuantSpec(bits=5, symmetric=False, granularity="tensor")):
        back = type(cfg).from_json(cfg.to_json())
        assert back == cfg


@pytest.mark.parametrize("kwargs, field", [
    ({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"mode": "int4-magic"}, "mode"),
    ({"act_bits": 12}, "act_bits"), ({"granularity": "row"}, "granularity"),
    ({"weight_range": "max"}, "weight_range"), ({"overrides": {"x": 0}}, "overrides"),
    ({"ignore": ("(",)}, "ignore"),
    ({"target_bits": 9.0}, "target_bits"),
])
def test_bad_ptq_config_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"PTQConfig.{field}"):
        PTQConfig(**kwargs)


def test_bad_qat_and_spec_configs() -> None:
    with pytest.raises(ConfigError, match="QATConfig.bits"):
        QATConfig(bits=9)
    with pytest.raises(ConfigError, match="QATConfig.act_bits"):
        QATConfig(act_bits=0)
    with pytest.raises(ConfigError, match="QuantSpec.bits"):
        QuantSpec(bits=0)
    with pytest.raises(ConfigError, match="unknown config key"):
        PTQConfig.from_dict({"bitz": 4})
