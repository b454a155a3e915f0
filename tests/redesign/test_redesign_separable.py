"""Depthwise-separable substitution: MACs, exactness, the least-squares fit, skips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.measure import count_macs
from deepshrink.models import create_model
from deepshrink.redesign import SeparableConfig, dwsep, separate, separate_with_report


@pytest.mark.parametrize("o,i,k,hw", [(32, 16, 3, 10), (64, 8, 5, 9)])
def test_pair_macs_equal_the_hand_count_and_the_mobilenet_ratio(o, i, k, hw):
    conv = nn.Conv2d(i, o, k, padding=k // 2)
    pair = dwsep.build(conv, 1, "none")
    x = torch.randn(1, i, hw, hw)
    counted = count_macs(pair, x)[0]
    assert counted == i * k * k * hw * hw + i * o * hw * hw  # depthwise + pointwise, by hand
    original = count_macs(conv, x)[0]
    assert original == o * i * k * k * hw * hw
    assert counted / original == pytest.approx(1 / o + 1 / k**2, rel=1e-12)
    assert dwsep.pair_macs(conv, 1, hw * hw) == (original, counted)


def test_full_multiplier_reproduces_the_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 12, 3, stride=2, padding=1)
    pair = dwsep.separable(conv, multiplier=9)  # m = k^2 >= rank of every W[:, i] (12 x 9)
    x = torch.randn(2, 4, 9, 9)
    assert torch.allclose(pair(x), conv(x), atol=1e-5, rtol=0)


def test_least_squares_fit_beats_the_weight_svd_on_the_layer_outputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    # Correlated inputs (smooth images): the data-aware fit can exploit them, the weight SVD cannot.
    x = nn.functional.avg_pool2d(torch.randn(32, 8, 16, 16), 3, 1, 1)
    y = conv(x).detach()
    svd_only = dwsep.separable(conv, 1)
    fitted = dwsep.separable(conv, 1, inputs=[x[:16], x[16:]], iters=3)
    err = lambda p: float((p(x).detach() - y).norm() / y.norm())  # noqa: E731
    assert err(fitted) < 0.8 * err(svd_only)


def test_bn_relu_between_is_fitted_by_layerwise_distillation():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(16, 4, 8, 8)
    y = conv(x).detach()
    pair = dwsep.separable(conv, 2, "bn_relu", inputs=[x], distill_steps=0)
    before = float((pair.eval()(x) - y).norm() / y.norm())
    pair = dwsep.separable(conv, 2, "bn_relu", inputs=[x], distill_steps=150)
    assert [type(m) for m in pair] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert float((pair.eval()(x) - y).norm() / y.norm()) < 0.95 * before


def test_separate_replaces_eligible_convs_and_reports_the_rest():
    torch.manual_seed(0)
    model = create_model("resnet_small", in_size=8, widths=(8, 16), blocks=1)
    x = torch.rand(8, 1, 8, 8)
    rep = separate_with_report(model, SeparableConfig(check_speed=False), example_inputs=x)
    by = {r.name: r for r in rep.layers}
    assert by["layers.1.shortcut.0"].reason == "1x1 conv (already pointwise)"
    # the stem conv (1 input channel, 8 outputs): 9 + 8 + ... vs 72 weights: pays in size
    assert by["layers.0.conv1"].action == "separable"
    assert isinstance(model.layers[0].conv1, nn.Sequential)
    assert model.layers[0].conv1[0].groups == 8
    assert rep.totals()["macs_after"] < rep.totals()["macs_before"] / 3
    assert model(x).shape == (8, 10)


def test_layers_list_budget_and_ignore():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16)
    model = create_model("vgg_small", in_size=16, width=8, hidden=16)
    rep = separate_with_report(model, SeparableConfig(layers=("4", "8"), ignore=("8",), check_speed=False),
                               example_inputs=x)
    assert [r.name for r in rep.rewritten] == ["4"]
    assert {r.name: r.reason for r in rep.skipped}["8"] == "ignored by the config"
    model = create_model("vgg_small", in_size=16, width=8, hidden=16)
    total = count_macs(model, x[:1])[0]
    rep = separate_with_report(model, SeparableConfig(budget=0.6, check_speed=False), example_inputs=x)
    assert count_macs(model, x[:1])[0] <= 0.6 * total
    assert any(r.reason == "not needed to reach the budget" for r in rep.skipped) or len(rep.rewritten) == 4


def test_speed_check_skips_a_pair_that_is_not_faster():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    rep = separate_with_report(model, SeparableConfig(min_speedup=1e6),
                               example_inputs=torch.randn(2, 3, 8, 8))
    assert not rep.rewritten and "not faster" in rep.layers[0].reason


def test_separable_config():
    cfg = SeparableConfig(multiplier=2, between="bn_relu", layers=("conv.*",), budget=0.5)
    assert SeparableConfig.from_json(cfg.to_json()) == cfg
    for bad in (dict(multiplier=0), dict(between="relu"), dict(budget=1.5), dict(layers=("(",)),
                dict(overrides={"a": 0})):
        with pytest.raises(ConfigError):
            SeparableConfig(**bad)
    with pytest.raises(ConfigError, match="needs example_inputs"):
        separate(create_model("lenet5", in_size=16), SeparableConfig())
