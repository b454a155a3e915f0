"""Lottery-ticket rewinding: survivors return to their snapshot values exactly."""

from __future__ import annotations

import pytest
import torch

from deepshrink.data import load_digits
from deepshrink.models import create_model
from deepshrink.pruning import UnstructuredConfig, get_masks, lottery_ticket, prune, rewind, snapshot
from deepshrink.train import TrainConfig, train


def test_rewind_restores_init_for_survivors() -> None:
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    init = snapshot(m)
    train(m, load_digits(), TrainConfig(epochs=1, progress=False, max_steps=10))
    prune(m, UnstructuredConfig(ratio=0.7))
    rewind(m, init)
    for n, p in m.named_parameters():
        mask = get_masks(m).get(n)
        if mask is None:
            assert torch.equal(p, init[n]), n  # biases: back to init
        else:
            assert torch.equal(p[mask], init[n][mask]), n
            assert torch.count_nonzero(p[~mask]) == 0, n


def test_lottery_ticket_rounds_with_early_rewind() -> None:
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    data = load_digits()
    _, hist = lottery_ticket(m, UnstructuredConfig(ratio=0.75), data,
                             TrainConfig(epochs=1, progress=False), rounds=2, rewind_steps=3)
    assert [h.round for h in hist] == [0, 1, 2]
    assert hist[0].sparsity == 0.0
    assert hist[1].sparsity == pytest.approx(0.5, abs=1e-4)
    assert hist[2].sparsity == pytest.approx(0.75, abs=1e-4)
    assert hist[-1].val_top1 > 0.3
    assert int((m[2].weight == 0).sum()) == round(0.75 * m[2].weight.numel())



def test_random_reinit_control_keeps_mask_changes_weights() -> None:
    from deepshrink.pruning.lottery import random_reinit_control

    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    prune(m, UnstructuredConfig(ratio=0.8))
    ctrl = random_reinit_control(m, seed=1)
    for n, mask in get_masks(m).items():
        assert torch.equal(get_masks(ctrl)[n], mask)
        p, q = dict(m.named_parameters())[n], dict(ctrl.named_parameters())[n]
        assert torch.count_nonzero(q[~mask]) == 0
        assert not torch.equal(p[mask], q[mask])
