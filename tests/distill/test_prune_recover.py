"""prune_and_recover: pruning then distillation from the unpruned model through the shared loop,
on labelled data and on unlabelled inputs, one-shot and iterative."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deepshrink.data import load_digits
from deepshrink.distill import RecoverConfig, prune_and_recover
from deepshrink.models import create_model
from deepshrink.pruning import ChannelConfig
from deepshrink.train import TrainConfig, evaluate, train


def test_labelled_recovery_beats_the_bare_cut():
    data = load_digits()
    torch.manual_seed(0)
    model = create_model("lenet300", in_size=8)
    train(model, data, TrainConfig(epochs=2, batch_size=64, lr=2e-3, progress=False))
    val = data.loader("val", 512)
    cut = copy.deepcopy(model)
    from deepshrink.pruning import prune_channels

    prune_channels(cut, ChannelConfig(ratio=0.8), example_inputs=data.test.tensors[0][:2])
    res = prune_and_recover(model, ChannelConfig(ratio=0.8), data,
                            TrainConfig(epochs=1, batch_size=64, lr=2e-3, max_steps=15, progress=False),
                            example_inputs=data.test.tensors[0][:2], recover=RecoverConfig(rounds=2))
    # Two rounds of 1 - sqrt(0.2) each, kept counts rounded up: 300 -> 135 -> 61, 100 -> 45 -> 21.
    assert [m.out_features for m in (model[2], model[4])] == [61, 21]
    assert len(res.rounds) == 2 and res.rounds[0].params[1] > res.rounds[1].params[1]
    assert evaluate(model, val)["top1"] > evaluate(cut, val)["top1"] + 0.02
    assert "soft" in res.history[0][0] or "train_loss" in res.history[0][0]


@pytest.mark.parametrize("hidden_states", [(), ("bert.encoder.layer.0",)], ids=["logits", "hidden-states"])
def test_unlabelled_distillation_after_hidden_size_pruning(hidden_states):
    pytest.importorskip("transformers")
    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 32}
    model = create_model("hf", arch="BertForSequenceClassification", config=cfg, seed=0)
    teacher = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (8, 12), generator=g),
                "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(6)]
    x = batches[0]
    pruned = copy.deepcopy(model)
    from deepshrink.pruning import prune_channels

    prune_channels(pruned, ChannelConfig(ratio=0.5, hidden=True), example_inputs=x)
    res = prune_and_recover(model, ChannelConfig(ratio=0.5, hidden=True), batches,
                            TrainConfig(epochs=4, batch_size=8, lr=1e-3, progress=False),
                            example_inputs=x, recover=RecoverConfig(hidden_states=hidden_states))
    with torch.no_grad():
        want = teacher(**x).logits
        before = nn.functional.mse_loss(pruned(**x).logits, want)
        after = nn.functional.mse_loss(res.model(**x).logits, want)
    assert after < 0.7 * before, (before, after)
