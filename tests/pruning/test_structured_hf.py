"""Structured pruning of transformers BERT, ViT and ResNet built from tiny configs.

Reference: the ORIGINAL model with the removed heads' / neurons' / channels' contributions zeroed
(the input columns of the output projection, FFN down-projection or next conv). If the head count
were not updated the heads would silently regroup and this comparison would fail. Tolerance 1e-5
absolute in float32 (observed ~1e-7).
"""

from __future__ import annotations

import copy

import pytest
import torch

import deepshrink
from deepshrink.models import create_model
from deepshrink.pruning.structured import ChannelConfig, last_edit, prune_channels

pytest.importorskip("transformers")

ATOL = 1e-5

BERT = ("BertForSequenceClassification",
        {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 32},
        lambda: torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0)))
VIT = ("ViTForImageClassification",
       {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "image_size": 16, "patch_size": 4, "num_channels": 1, "num_labels": 3},
       lambda: torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
RESNET = ("ResNetForImageClassification",
          {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [16, 32], "depths": [1, 1],
           "layer_type": "bottleneck", "num_channels": 1, "num_labels": 3},
          lambda: torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
CASES = {"bert": BERT, "vit": VIT, "resnet": RESNET}


def shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def zeroed_contributions(original: torch.nn.Module, slices: dict[str, dict[str, list[int]]]
                         ) -> torch.nn.Module:
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for name, roles in slices.items():
            if "in" in roles:
                w = ref.get_submodule(name).weight
                drop = sorted(set(range(w.shape[1])) - set(roles["in"]))
                w[:, drop] = 0
    return ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_pruned_transformer_equals_zeroed_reference_and_reloads(case, tmp_path):
    arch, cfg, make = CASES[case]
    original = create_model("hf", arch=arch, config=cfg, seed=0)
    x = make()
    pruned = prune_channels(copy.deepcopy(original), ChannelConfig(ratio=0.5), x)
    ref = zeroed_contributions(original, last_edit(pruned)["slices"])
    with torch.no_grad():
        out, want, full = pruned(x).logits, ref(x).logits, original(x).logits
    assert out.shape == full.shape
    assert torch.allclose(out, want, atol=ATOL), (out - want).abs().max()
    assert not torch.allclose(full, want, atol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in original.parameters())

    path = deepshrink.save(pruned, tmp_path / f"{case}.safetensors")
    again = deepshrink.load(path)
    with torch.no_grad():
        assert torch.equal(again(x).logits, out)
    assert shapes(again) == shapes(pruned)


def test_bert_fields_follow_the_new_shapes():
    arch, cfg, make = BERT
    model = prune_channels(create_model("hf", arch=arch, config=cfg), ChannelConfig(ratio=0.5), make())
    assert model.config.num_attention_heads == 2 and model.config.head_dim == 8
    assert model.config.intermediate_size == 32
    for layer in model.bert.encoder.layer:
        att = layer.attention.self
        assert att.num_attention_heads == 2 and att.attention_head_size == 8 and att.all_head_size == 16
        assert att.query.out_features == att.key.out_features == att.value.out_features == 16
        assert layer.attention.output.dense.in_features == 16
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 32
        assert layer.output.dense.out_features == 32  # hidden size untouched


def test_vit_fields_and_separate_head_and_ffn_ratios():
    arch, cfg, make = VIT
    model = prune_channels(create_model("hf", arch=arch, config=cfg),
                           ChannelConfig(ratio=0.5, heads_ratio=0.25, ffn_ratio=0.75), make())
    assert model.config.num_attention_heads == 3 and model.config.head_dim == 8
    assert model.config.intermediate_size == 16
    for layer in model.vit.layers:
        assert layer.attention.num_attention_heads == 3 and layer.attention.q_proj.out_features == 24
        assert layer.mlp.fc1.out_features == 16
    # The updated config alone builds the same shapes (ViT reads config.head_dim).
    fresh = type(model)(model.config)
    assert shapes(fresh) == shapes(model)


def test_resnet_block_channels_pruned_residual_stream_kept():
    arch, cfg, make = RESNET
    model = prune_channels(create_model("hf", arch=arch, config=cfg), ChannelConfig(ratio=0.5), make())
    block = model.resnet.encoder.stages[0].layers[0]
    assert block.layer[0].convolution.out_channels == 2 and block.layer[1].convolution.in_channels == 2
    assert block.layer[2].convolution.out_channels == 16  # residual stream untouched
    assert any("residual" in s["group"] for s in model.deepshrink_channel_report["skipped"])


def test_taylor_needs_labels_and_ranks_heads():
    arch, cfg, make = BERT
    model = create_model("hf", arch=arch, config=cfg)
    x = make()
    with pytest.raises(deepshrink.ConfigError, match="labelled"):
        prune_channels(model, ChannelConfig(ratio=0.5, importance="taylor"), x, calibration=[(x,)])
    y = torch.tensor([0, 1, 0])
    pruned = prune_channels(model, ChannelConfig(ratio=0.5, importance="taylor"), x, calibration=[(x, y)])
    assert pruned.config.num_attention_heads == 2
