"""Low-rank factorization: exactness at full rank, rank choice, the size/speed checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.models import create_model
from deepshrink.redesign import LowRankConfig, factorize, factorize_with_report, lowrank


def test_full_rank_svd_reproduces_the_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(40, 24)
    x = torch.randn(16, 40)
    pair = lowrank.factorized(layer, "linear", [24])
    assert [type(m) for m in pair] == [nn.Linear, nn.Linear]
    assert pair[0].bias is None and pair[1].bias is not None
    assert torch.allclose(pair(x), layer(x), atol=1e-5, rtol=0)
    # Truncated: the error is exactly the discarded singular values (Eckart-Young).
    s = torch.linalg.svdvals(layer.weight.detach().double())
    w8 = lowrank.dense_weight(layer.weight, "linear", [8]).double()
    assert torch.linalg.matrix_norm(layer.weight.double() - w8).item() == pytest.approx(
        s[8:].pow(2).sum().sqrt().item(), rel=1e-5)


@pytest.mark.parametrize("form", ["conv_svd", "tucker2", "cp"])
@pytest.mark.parametrize("conv", [dict(stride=1, padding=1), dict(stride=2, padding=2, dilation=2),
                                  dict(stride=1, padding=1, padding_mode="reflect", bias=False),
                                  dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), kernel_size=(3, 5)),
                                  dict(padding="same", padding_mode="circular")])
def test_factorized_conv_matches_at_full_rank(form, conv):
    torch.manual_seed(0)
    conv = {"kernel_size": 3, **conv}
    layer = nn.Conv2d(6, 10, **conv)
    x = torch.randn(2, 6, 11, 11)
    pair = lowrank.factorized(layer, form, lowrank.full_rank(layer, form))
    assert torch.allclose(pair(x), layer(x), atol=1e-5, rtol=0)
    assert all(type(m) is nn.Conv2d for m in pair)


def test_cp_form_is_two_depthwise_convs_and_its_fit_improves_with_rank():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 12, 3, padding=1)
    cp = lowrank.factorized(layer, "cp", [6])
    assert [(m.kernel_size, m.groups) for m in cp] == [((1, 1), 1), ((3, 1), 6), ((1, 3), 6), ((1, 1), 1)]
    n = sum(m.weight.numel() for m in cp)
    assert n == lowrank.weight_params(layer, "cp", [6]) == 6 * (8 + 3 + 3 + 12)
    kept = [lowrank.kept_energy(layer, "cp", [r]) for r in (2, 8, 24)]
    assert 0 < kept[0] < kept[1] < kept[2] < 1
    # ALS starts from seeded values: the same layer always gets the same factors (files replay
    # structure only, but a rerun of a bench must give the same model)
    w8 = lowrank.dense_weight(layer.weight, "cp", [8])
    assert torch.equal(w8, lowrank.dense_weight(layer.weight, "cp", [8]))


def test_energy_rank_and_weight_counts():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert lowrank.energy_rank(s, 9 / 14) == 1
    assert lowrank.energy_rank(s, 0.9) == 2
    assert lowrank.energy_rank(s, 1.0) == 3
    conv = nn.Conv2d(8, 16, 3)
    assert lowrank.weight_params(conv, "conv_svd", [4]) == 4 * (8 * 9 + 16)
    assert lowrank.weight_params(conv, "tucker2", [4, 5]) == 8 * 4 + 4 * 5 * 9 + 5 * 16
    assert lowrank.weight_params(conv, "cp", [4]) == 4 * (8 + 3 + 3 + 16)


def test_layer_that_would_not_pay_is_skipped_and_named():
    torch.manual_seed(0)
    model = create_model("lenet300", in_size=8)
    x = torch.rand(4, 1, 8, 8)
    # rank 40: 64x300 -> 40*(364) = 14560 < 19200 pays; 300x100 -> 16000 < 30000 pays;
    # 100x10 -> 40 > break-even 9.1: bigger, skipped.
    rep = factorize_with_report(model, LowRankConfig(rank=40, check_speed=False), example_inputs=x)
    by = {r.name: r for r in rep.layers}
    assert by["2"].action == "linear" and by["4"].action == "linear"
    assert by["6"].action == "skipped" and "does not pay" in by["6"].reason and "9.1" in by["6"].reason
    assert isinstance(model[6], nn.Linear) and isinstance(model[2], nn.Sequential)
    assert model[2][0].out_features == 40
    assert rep.totals()["params_after"] < rep.totals()["params_before"]


def test_slower_layer_is_skipped_by_the_speed_check():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    # Demanding an impossible speedup makes every layer "not faster": the check is what skips.
    rep = factorize_with_report(model, LowRankConfig(rank=2, min_speedup=1e6),
                                example_inputs=torch.randn(2, 32))
    assert not rep.rewritten
    assert all("not faster" in r.reason for r in rep.layers if r.name == "0")
    assert isinstance(model[0], nn.Linear)


def test_ignore_overrides_and_targets():
    model = create_model("lenet5", in_size=16)
    x = torch.rand(2, 1, 16, 16)
    cfg = LowRankConfig(rank=4, overrides={r"[68]": 3}, ignore=("1",), check_speed=False)
    rep = factorize_with_report(model, cfg, example_inputs=x)
    by = {r.name: r for r in rep.layers}
    assert by["1"].reason == "ignored by the config"
    assert by["6"].rank == [3] and by["3"].rank == [4]
    rep2 = factorize_with_report(create_model("lenet5", in_size=16),
                            LowRankConfig(rank=4, targets=("linear",), check_speed=False), example_inputs=x)
    assert {r.op for r in rep2.layers} == {"linear"}


def test_budget_search_reaches_the_parameter_budget_and_prefers_insensitive_layers():
    torch.manual_seed(0)
    # Layer 0 has rank 4 (exact at low rank), layer 2 is full rank: the search must cut 0 first.
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8)
    x = torch.randn(128, 64)
    total = sum(p.numel() for p in model.parameters())
    rep = factorize_with_report(model, LowRankConfig(budget=0.6, check_speed=False), calibration=x)
    after = sum(p.numel() for p in model.parameters())
    assert after <= 0.6 * total
    by = {r.name: r for r in rep.layers}
    assert by["0"].rank[0] <= 8  # the rank-4 layer went (nearly) all the way down
    assert by["0"].fit_error < 1e-3
    assert "target" in rep.notes[0]


def test_macs_budget():
    torch.manual_seed(0)
    model = create_model("lenet5", in_size=16)
    x = torch.rand(8, 1, 16, 16)
    from deepshrink.measure import count_macs

    before = count_macs(model, x[:1])[0]
    factorize(model, LowRankConfig(budget=0.7, budget_metric="macs", check_speed=False), calibration=x)
    assert count_macs(model, x[:1])[0] <= 0.7 * before


def test_config_validation_and_round_trip():
    cfg = LowRankConfig(budget=0.3, budget_metric="macs", conv="tucker2", overrides={"fc.*": 8})
    assert LowRankConfig.from_json(cfg.to_json()) == cfg
    assert LowRankConfig().energy == 0.9
    for bad in (dict(rank=4, energy=0.5), dict(rank=0), dict(energy=1.5), dict(budget=1.0),
                dict(conv="parafac"), dict(targets=("lstm",)), dict(overrides={"[": 3}),
                dict(budget_metric="flops", budget=0.5), dict(round_to=0)):
        with pytest.raises(ConfigError):
            LowRankConfig(**bad)


def test_budget_without_data_is_a_config_error():
    with pytest.raises(ConfigError, match="needs data"):
        factorize(create_model("mlp", in_size=8), LowRankConfig(budget=0.5))


@pytest.mark.parametrize("form,rank", [("linear", [5]), ("conv_svd", [5]), ("tucker2", [3, 7]),
                                       ("tucker2", [6, 6]), ("cp", [7])])
def test_dense_weight_is_what_the_factorized_layers_compute(form, rank):
    """The sensitivity scan swaps in dense_weight; it must equal the truncated factors' product."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 9) if form == "linear" else nn.Conv2d(6, 10, 3, padding=1)
    x = torch.randn(2, 12) if form == "linear" else torch.randn(2, 6, 7, 7)
    pair = lowrank.factorized(layer, form, rank)
    with torch.no_grad():
        layer.weight.copy_(lowrank.dense_weight(layer.weight, form, rank))
    assert torch.allclose(pair(x), layer(x), atol=1e-5, rtol=0)
