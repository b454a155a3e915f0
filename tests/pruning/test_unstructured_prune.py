"""Magnitude, global and threshold pruning: exact counts and the |w| < T semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.errors import ConfigError, ModelError
from deepshrink.models import create_model
from deepshrink.pruning import UnstructuredConfig, get_masks, prune


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("lenet300", in_size=8)


def _zeros(m: nn.Module, name: str) -> int:
    return int((m.get_submodule(name).weight == 0).sum())


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.77, 0.95])
def test_layer_ratio_is_exact(ratio: float) -> None:
    m = prune(_model(), UnstructuredConfig(ratio=ratio))
    for name in ("2", "4", "6"):
        w = m.get_submodule(name).weight
        assert _zeros(m, name) == round(ratio * w.numel())
        # the removed ones are the smallest: every kept |w| >= every removed original |w|
    masks = get_masks(m)
    assert set(masks) == {"2.weight", "4.weight", "6.weight"}


def test_layer_ratio_removes_the_smallest() -> None:
    m = _model()
    orig = m[4].weight.detach().clone()
    prune(m, UnstructuredConfig(ratio=0.6))
    kept = get_masks(m)["4.weight"]
    assert orig[kept].abs().min() >= orig[~kept].abs().max()


def test_global_ratio_is_exact_and_pooled() -> None:
    m = _model()
    orig = {n: m.get_submodule(n).weight.detach().clone() for n in ("2", "4", "6")}
    prune(m, UnstructuredConfig(ratio=0.8, scope="global", max_layer_ratio=1.0))
    total = sum(w.numel() for w in orig.values())
    zeros = sum(_zeros(m, n) for n in orig)
    assert zeros == round(0.8 * total)
    # one threshold across layers: max removed |w| <= min kept |w| over all layers pooled
    masks = get_masks(m)
    removed = torch.cat([orig[n][~masks[f"{n}.weight"]].abs() for n in orig])
    kept = torch.cat([orig[n][masks[f"{n}.weight"]].abs() for n in orig])
    assert removed.max() <= kept.min()
    per_layer = {n: _zeros(m, n) / orig[n].numel() for n in orig}
    assert len({round(v, 3) for v in per_layer.values()}) > 1  # global: layers differ


def test_global_caps_layers_and_still_hits_total() -> None:
    m = _model()  # untrained: layer "4" has the smallest weights and would be emptied
    prune(m, UnstructuredConfig(ratio=0.9, scope="global", max_layer_ratio=0.95))
    assert _zeros(m, "4") == int(0.95 * 30000)
    assert sum(_zeros(m, n) for n in ("2", "4", "6")) == round(0.9 * 50200)
    with pytest.raises(ConfigError, match="max_layer_ratio"):
        UnstructuredConfig(ratio=0.97, scope="global", max_layer_ratio=0.95)


def test_threshold_semantics_strictly_below() -> None:
    m = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[0.1, -0.2, 0.3, -0.05], [0.2, 0.25, -0.3, 0.0]]))
    prune(m, UnstructuredConfig(method="threshold", threshold=0.2))
    expect = torch.tensor([[0.0, -0.2, 0.3, 0.0], [0.2, 0.25, -0.3, 0.0]])
    assert torch.equal(m[0].weight.detach(), expect)  # |w| == T is kept, |w| < T removed


def test_quality_threshold_is_q_times_std() -> None:
    m = _model()
    w = m[2].weight.detach().clone()
    prune(m, UnstructuredConfig(method="quality", quality=0.5))
    t = 0.5 * float(w.std())
    assert torch.equal(get_masks(m)["2.weight"], w.abs() >= t)


def test_overrides_by_name_and_regex_and_skip_last() -> None:
    m = prune(_model(), UnstructuredConfig(ratio=0.5, overrides={"2": 0.9, r"[46]": 0.2}, skip_last=True))
    assert _zeros(m, "2") == round(0.9 * 64 * 300)
    assert _zeros(m, "4") == round(0.2 * 300 * 100)
    assert _zeros(m, "6") == 0  # skipped as the last layer
    assert "6.weight" not in get_masks(m)


def test_global_with_override_keeps_override_out_of_pool() -> None:
    m = prune(_model(), UnstructuredConfig(ratio=0.9, scope="global", overrides={"6": 0.1}))
    assert _zeros(m, "6") == 100
    assert _zeros(m, "2") + _zeros(m, "4") == round(0.9 * (64 * 300 + 300 * 100))


def test_repeated_pruning_never_revives() -> None:
    m = _model()
    prune(m, UnstructuredConfig(ratio=0.5))
    first = get_masks(m)["4.weight"].clone()
    with torch.no_grad():  # make pruned positions look "important" if they were not masked
        m[4].weight.add_(0.0)
    prune(m, UnstructuredConfig(ratio=0.7))
    second = get_masks(m)["4.weight"]
    assert not (second & ~first).any()
    assert _zeros(m, "4") == round(0.7 * 30000)


def test_no_prunable_layers_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="no layers of types"):
        prune(nn.Sequential(nn.ReLU()), UnstructuredConfig())


def test_prune_rejects_other_configs() -> None:
    from deepshrink.train import TrainConfig

    with pytest.raises(ConfigError, match="expected UnstructuredConfig or ChannelConfig"):
        prune(_model(), TrainConfig())
