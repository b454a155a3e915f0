"""ChannelConfig validation and JSON round trip, importance criteria, save -> load of pruned models."""

from __future__ import annotations

import pytest
import torch

import deepshrink
from deepshrink.data import load_digits
from deepshrink.errors import ConfigError
from deepshrink.models import create_model
from deepshrink.pruning.graph import trace_graph
from deepshrink.pruning.importance import _IMPORTANCE, list_importance, register_importance, score_groups
from deepshrink.pruning.structured import ChannelConfig, prune_channels


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"ratio": 1.0}, "ChannelConfig.ratio"),
    ({"ratio": -0.1}, "ChannelConfig.ratio"),
    ({"heads_ratio": 1.5}, "ChannelConfig.heads_ratio"),
    ({"overrides": {"fc": 1.0}}, "ChannelConfig.overrides['fc']"),
    ({"importance": "random-ish"}, "ChannelConfig.importance"),
    ({"round_to": 0}, "ChannelConfig.round_to"),
    ({"ignore": ("(",)}, "ChannelConfig.ignore"),
    ({"calibration_batches": 0}, "ChannelConfig.calibration_batches"),
    ({"round": "sideways"}, "ChannelConfig.round"),
    ({"score_over": "everything"}, "ChannelConfig.score_over"),
    ({"hidden_ratio": 1.0}, "ChannelConfig.hidden_ratio"),
])
def test_bad_values_raise_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        ChannelConfig(**kwargs)
    assert str(info.value).startswith(field)


def test_config_round_trips_through_json():
    cfg = ChannelConfig(ratio=0.3, importance="apoz", overrides={r"layers\.0\..*": 0.1}, round_to=8,
                        ignore=("fc",), calibration_batches=3, heads_ratio=0.25, hidden=True,
                        hidden_ratio=0.2, round="down", score_over="producers")
    assert ChannelConfig.from_json(cfg.to_json()) == cfg
    assert ChannelConfig.from_dict(cfg.to_dict()) == cfg
    assert set(list_importance()) >= {"l1", "l2", "activation", "apoz", "taylor"}


def _scores(model, x, y, criterion, group_name, over="group"):
    graph = trace_graph(model, x)
    groups = [g for g in graph.groups if g.name == group_name]
    return score_groups(model, groups, criterion, [(x, y)], over=over, graph=graph)[0]


@pytest.mark.parametrize(("criterion", "over"), [("l1", "group"), ("l1", "producers"), ("l2", "group"),
                                                  ("activation", "group"), ("apoz", "group"),
                                                  ("taylor", "group")])
def test_each_criterion_ranks_a_dead_channel_lowest(criterion, over):
    data = load_digits()
    x, y = data.train.tensors[0][:128], data.train.tensors[1][:128]
    torch.manual_seed(0)
    mlp = create_model("lenet300", in_size=8)
    with torch.no_grad():
        mlp[2].weight[7] = 0
        mlp[2].bias[7] = 0
        mlp[4].weight[:, 7] = 0  # dead on both sides, so the group score sees it too
    s = _scores(mlp, x, y, criterion, "2", over)
    assert s[7] == s.min() and s[7] < s.median()

    res = create_model("resnet_small", in_size=8)
    res.eval()
    with torch.no_grad():
        res.layers[0].conv1.weight[3] = 0
        res.layers[0].bn1.weight[3] = 0
        res.layers[0].bn1.bias[3] = 0
        res.layers[0].conv2.weight[:, 3] = 0
    s = _scores(res, x, y, criterion, "layers.0.conv1", over)
    assert s[3] == s.min() and s[3] < s.median()


def test_custom_importance_plugs_in():
    @register_importance("last-first")
    def last_first(model, groups, batches, *, over, graph):
        return [torch.arange(g.size, dtype=torch.float64) for g in groups]

    try:
        model = create_model("lenet300", in_size=8)
        w = model[2].weight.detach().clone()
        prune_channels(model, ChannelConfig(ratio=0.5, importance="last-first"),
                       example_inputs=torch.rand(2, 1, 8, 8))
        assert torch.equal(model[2].weight, w[150:])  # the highest-scored (last) neurons survive
    finally:
        _IMPORTANCE.pop("last-first", None)


def test_save_load_rebuilds_the_smaller_architecture(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet_small", in_size=8)
    x = torch.rand(4, 1, 8, 8)
    prune_channels(model, ChannelConfig(ratio=0.5, importance="activation", hidden=True), example_inputs=x)
    path = deepshrink.save(model, tmp_path / "small.safetensors")
    again = deepshrink.load(path)
    assert type(again) is type(model)
    assert again.layers[2].conv1.out_channels == 32 and again.fc.in_features == 32
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))
    full = create_model("resnet_small", in_size=8)
    assert path.stat().st_size < 0.35 * deepshrink.save(full, tmp_path / "full.safetensors").stat().st_size


def test_prune_verb_dispatches_channel_config():
    from deepshrink.pruning import prune

    model = prune(create_model("lenet300", in_size=8), ChannelConfig(ratio=0.5),
                  example_inputs=torch.rand(2, 1, 8, 8))
    assert model[2].out_features == 150


def test_cli_channel_pruning_with_hidden_size(tmp_path):
    from typer.testing import CliRunner

    from deepshrink.cli import app

    base = deepshrink.save(create_model("resnet_small", in_size=8), tmp_path / "base.safetensors")
    out = tmp_path / "small.safetensors"
    r = CliRunner().invoke(app, ["prune", str(base), "-o", str(out), "--method", "channel", "--ratio", "0.5",
                                 "--hidden", "--input-shape", "1,8,8", "--json"])
    assert r.exit_code == 0, r.output
    again = deepshrink.load(out)
    assert again.fc.in_features == 32 and again.stem[0].out_channels == 8
