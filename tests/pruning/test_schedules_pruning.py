"""Schedules: the Zhu & Gupta cubic, gradual pruning during training, iterative rounds."""

from __future__ import annotations

import itertools

import pytest
import torch

from deepshrink.data import load_digits
from deepshrink.errors import ConfigError
from deepshrink.models import create_model
from deepshrink.pruning import (
    GradualPruning,
    UnstructuredConfig,
    get_masks,
    iterative_prune,
    mask_sparsity,
    polynomial_sparsity,
)
from deepshrink.train import TrainConfig, train


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.mark.parametrize("t", [0, 10, 37, 100, 150, 210, 500])
def test_polynomial_matches_formula(t: int) -> None:
    s_i, s_f, t0, n, dt = 0.1, 0.9, 10, 20, 10
    got = polynomial_sparsity(t, s_i, s_f, t0, n, dt)
    tc = min(max(t, t0), t0 + n * dt)
    assert got == pytest.approx(s_f + (s_i - s_f) * (1 - (tc - t0) / (n * dt)) ** 3, abs=1e-12)


def test_polynomial_endpoints_and_monotone() -> None:
    vals = [polynomial_sparsity(t, 0.0, 0.8, 0, 10, 5) for t in range(0, 60)]
    assert vals[0] == 0.0 and vals[50] == pytest.approx(0.8) and vals[-1] == pytest.approx(0.8)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(vals))
    assert polynomial_sparsity(25, 0.0, 0.8, 0, 10, 5) == pytest.approx(0.8 * (1 - 0.5 ** 3))


def test_gradual_pruning_reaches_target_with_exact_zeros(digits) -> None:
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    cb = GradualPruning(UnstructuredConfig(ratio=0.9), begin_step=2, n=4, frequency=3)
    train(m, digits, TrainConfig(epochs=2, batch_size=64, weight_decay=0.01, progress=False),
          callbacks=[cb])
    sp = mask_sparsity(get_masks(m))
    assert sp["(all)"] == pytest.approx(0.9, abs=1e-4)
    for n, mask in get_masks(m).items():
        assert torch.count_nonzero(dict(m.named_parameters())[n][~mask]) == 0
    targets = [s for _, s in cb.log]
    assert targets[-1] == pytest.approx(0.9)
    assert [t for t, _ in cb.log] == [3 + 2, 6 + 2, 9 + 2, 12 + 2]  # every 3 steps from step 2
    assert all(a < b for a, b in itertools.pairwise(targets))


def test_gradual_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="n and frequency"):
        GradualPruning(UnstructuredConfig(ratio=0.5), n=0)
    with pytest.raises(ConfigError, match="initial"):
        GradualPruning(UnstructuredConfig(ratio=0.5), initial=0.7)


def test_iterative_rounds_reach_target(digits) -> None:
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    train(m, digits, TrainConfig(epochs=3, progress=False))
    cfg = UnstructuredConfig(ratio=0.9, overrides={"6": 0.5})
    _, hist = iterative_prune(m, cfg, digits, TrainConfig(epochs=1, progress=False), rounds=3)
    assert [h.round for h in hist] == [1, 2, 3]
    sps = [h.layer_sparsity["2.weight"] for h in hist]
    assert sps == pytest.approx([1 - 0.1 ** (1 / 3), 1 - 0.1 ** (2 / 3), 0.9], abs=1e-4)
    assert hist[-1].layer_sparsity["6.weight"] == pytest.approx(0.5)
    assert int((m[4].weight == 0).sum()) == 27000
    assert hist[-1].val_top1 > 0.5  # fine-tuned model still classifies


def test_iterative_rejects_zero_rounds(digits) -> None:
    with pytest.raises(ConfigError, match="rounds"):
        iterative_prune(create_model("mlp", in_size=8), UnstructuredConfig(), digits,
                        TrainConfig(), rounds=0)


def test_iterative_passes_loss_fn_and_callbacks(digits) -> None:
    import torch.nn.functional as F

    from deepshrink.train import Callback

    calls = {"loss": 0, "steps": 0}

    def loss_fn(out, y, batch):
        calls["loss"] += 1
        return F.cross_entropy(out, y)

    class Count(Callback):
        def on_step_end(self, state) -> None:
            calls["steps"] += 1

    m = create_model("mlp", in_size=8, hidden=16)
    ft = TrainConfig(epochs=1, max_steps=3, progress=False)
    iterative_prune(m, UnstructuredConfig(ratio=0.5), digits, ft, rounds=2, loss_fn=loss_fn,
                    callbacks=(c for c in [Count()]))
    assert calls == {"loss": 6, "steps": 6}  # a generator of callbacks still reaches both rounds
