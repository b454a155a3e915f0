"""Exits on several architectures: exact equality with the original when no sample exits,
head k's output when every sample leaves at k, real skipping, and MACs of the layers run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.early_exit import ExitConfig, add_exits, exit_costs, suggest_points
from deepshrink.errors import ModelError
from deepshrink.measure import count_macs
from deepshrink.modeling import call, output_tensor, select

ARCHS = ["mlp", "lenet300", "lenet5", "vgg_small", "resnet_small", "user", "bert"]


@pytest.fixture
def build(kit):
    return lambda name: _multi(kit, name)


def _multi(kit, name: str):
    model, inputs, kw = kit.make(name)
    multi = add_exits(model, ExitConfig(**kw), example_inputs=inputs(2)).eval()
    for head in multi.heads:  # untrained heads with some spread of confidences
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return model, multi, inputs


def _ref(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(call(model, x))


@pytest.mark.parametrize("name", ARCHS)
def test_never_exit_is_the_original_exactly(build, name):
    model, multi, inputs = build(name)
    x = inputs(6)
    expected = _ref(model, x)
    multi.never_exit()
    with torch.no_grad():
        run = multi.run(x)
    assert torch.equal(run.logits, expected)
    assert (run.exits == multi.num_exits).all()
    assert len(multi.points) >= 1


@pytest.mark.parametrize("name", ARCHS)
def test_always_exit_at_k_gives_head_k(build, name):
    _, multi, inputs = build(name)
    x = inputs(5)
    with torch.no_grad():
        heads = multi.all_exits(x)
        for k in range(multi.num_exits):
            multi.always_exit_at(k)
            run = multi.run(x)
            assert torch.allclose(run.logits, heads[k], atol=1e-6)
            assert (run.exits == k).all()
    assert not torch.allclose(heads[0], heads[-1])  # the test would notice a wrong head


def _widest_gap(scores: torch.Tensor) -> float:
    """A threshold in the middle half of the scores, halfway across the widest gap between two
    of them (so float noise between batch sizes cannot flip a sample)."""
    s = scores.sort().values
    i = int(torch.argmax(s[4:9] - s[3:8])) + 3
    return float((s[i] + s[i + 1]) / 2)


@pytest.mark.parametrize("name", ARCHS)
def test_batch_with_mixed_exits_matches_each_sample_alone(build, name):
    """Samples that exit are removed from the batch; the rest continue (attention masks cut
    along): every sample gets the logits and exit it gets at batch 1."""
    _, multi, inputs = build(name)
    x = inputs(12)
    with torch.no_grad():
        scores = [torch.softmax(z, -1).max(-1).values for z in multi.all_exits(x)[:-1]]
        multi.set_policy([_widest_gap(s) for s in scores])
        run = multi.run(x)
        assert 0 < int((run.exits < multi.num_exits).sum()) < 12
        for i in range(12):
            one = multi.run(select(x, slice(i, i + 1)))
            assert int(one.exits[0]) == int(run.exits[i])
            assert torch.allclose(one.logits[0], run.logits[i], atol=1e-5)


def test_remaining_layers_do_not_run_after_an_exit(build):
    _, multi, inputs = build("resnet_small")
    calls = []
    multi.base.fc.register_forward_hook(lambda *a: calls.append(1))
    later = multi.base.get_submodule("layers.2")
    later.register_forward_hook(lambda *a: calls.append(2))
    multi.always_exit_at(0)
    with torch.no_grad():
        multi(inputs(1))
        multi(inputs(7))
    assert calls == []
    multi.never_exit()
    with torch.no_grad():
        multi(inputs(1))
    assert calls == [2, 1]


@pytest.mark.parametrize("name", ["lenet5", "resnet_small", "bert"])
def test_mac_counter_counts_only_the_layers_each_sample_ran(build, name):
    _, multi, inputs = build(name)
    x = inputs(10)
    with torch.no_grad():
        scores = [torch.softmax(z, -1).max(-1).values for z in multi.all_exits(x)[:-1]]
    multi.set_policy([float(s.quantile(0.7)) for s in scores])
    costs = exit_costs(multi, x)
    with torch.no_grad():
        exits = multi.run(x).exits
    per_exit = costs.per_exit(multi.thresholds)
    expected = sum(per_exit[int(e)] for e in exits)
    total, _ = count_macs(multi, x)
    assert total == expected
    assert len(set(exits.tolist())) >= 2  # a mixed batch
    assert per_exit[0] < per_exit[-1]
    if not isinstance(x, dict):  # the base model alone at batch 10: ten times one sample's backbone
        assert count_macs(multi.base, x)[0] == 10 * costs.backbone[-1]


def test_suggested_points(kit):
    make = kit.make
    assert suggest_points(make("lenet5")[0]) == ["2", "4"]  # after each pooling stage
    assert suggest_points(make("lenet300")[0]) == ["3", "5"]  # after each hidden activation
    assert suggest_points(make("resnet_small")[0]) == ["layers.0", "layers.1"]
    assert suggest_points(make("bert")[0]) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    with pytest.raises(ModelError, match="cannot suggest"):
        suggest_points(make("user")[0])


def test_head_cost_is_counted_and_heads_are_small(build):
    _, multi, inputs = build("lenet5")
    costs = exit_costs(multi, inputs(1))
    assert all(h > 0 for h in costs.heads)
    assert sum(costs.heads) < 0.1 * costs.backbone[-1]
    on = costs.per_exit([0.5, 0.5])
    off = costs.per_exit([None, None])
    assert on[-1] == off[-1] + sum(costs.heads)  # passing an active head costs its MACs


def test_bad_points_and_outputs_are_named(kit):
    model, inputs, _ = kit.make("lenet300")
    with pytest.raises(ModelError, match="no module 'nope'"):
        add_exits(model, ExitConfig(points=("nope",)), example_inputs=inputs(2))
    with pytest.raises(ModelError, match="example_inputs"):
        add_exits(model, ExitConfig())
    multi = add_exits(model, ExitConfig(), example_inputs=inputs(2))
    with pytest.raises(ModelError, match="2 exits"):
        multi.set_policy([0.5])
    with pytest.raises(ModelError, match="exit 1"):
        multi.set_policy([0.5, 1.5])


def test_images_helper_is_deterministic(kit):
    assert torch.equal(kit.images(3), kit.images(3))
