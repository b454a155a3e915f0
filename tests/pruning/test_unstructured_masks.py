"""Masks survive fine-tuning exactly (Adam + weight decay, AdamW, SGD momentum), and come off."""

from __future__ import annotations

import pytest
import torch

from deepshrink.data import load_digits
from deepshrink.models import create_model
from deepshrink.pruning import (
    MaskCallback,
    UnstructuredConfig,
    get_masks,
    make_permanent,
    masks_from_zeros,
    prune,
)
from deepshrink.train import TrainConfig, train


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd"])
def test_pruned_weights_stay_exactly_zero(digits, opt: str) -> None:
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    prune(m, UnstructuredConfig(ratio=0.8, overrides={"6": 0.5}))
    masks = {n: t.clone() for n, t in get_masks(m).items()}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    cfg = TrainConfig(epochs=2, batch_size=64, optimizer=opt, lr=5e-3, weight_decay=0.05,
                      keep_best=True, progress=False)
    train(m, digits, cfg, callbacks=[MaskCallback()])
    params = dict(m.named_parameters())
    for n, mask in masks.items():
        assert torch.count_nonzero(params[n][~mask]) == 0, n
        # the kept weights did train
        assert not torch.equal(params[n][mask], before[n][mask]), n
    assert torch.equal(masks_from_zeros(m)["2.weight"], masks["2.weight"])


def test_without_callback_weights_revive(digits) -> None:
    # Control: the test above would fail without MaskCallback.
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    prune(m, UnstructuredConfig(ratio=0.8))
    train(m, digits, TrainConfig(epochs=1, lr=5e-3, progress=False, max_steps=5))
    assert int((m[2].weight == 0).sum()) < round(0.8 * m[2].weight.numel())


def test_make_permanent_keeps_zeros_drops_masks() -> None:
    m = create_model("lenet300", in_size=8)
    prune(m, UnstructuredConfig(ratio=0.5))
    assert get_masks(m)
    keys = set(m.state_dict())
    make_permanent(m)
    assert get_masks(m) == {}
    assert set(m.state_dict()) == keys  # masks were never state
    assert int((m[2].weight == 0).sum()) == round(0.5 * m[2].weight.numel())


def test_explicit_masks_in_callback(digits) -> None:
    m = create_model("mlp", in_size=8, hidden=16)
    mask = torch.rand(16, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    train(m, digits, TrainConfig(epochs=1, progress=False, max_steps=4),
          callbacks=[MaskCallback({"2.weight": mask})])
    assert torch.count_nonzero(m[2].weight[~mask]) == 0
    assert torch.equal(get_masks(m)["2.weight"], mask)
