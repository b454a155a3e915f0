"""Structured pruning over every architecture: `transformers` models (tiny configs, random init),
the registry's models and toy graphs. At ratio 0.5, with and without hidden-size pruning: the
forward runs, the output shapes are kept, parameters really fall, and save -> load rebuilds a
model whose outputs are identical (torch.equal: the same weights in the same shapes)."""

from __future__ import annotations

import pytest
import torch

import deepshrink
from deepshrink.modeling import output_tensor
from deepshrink.models import create_model, list_models
from deepshrink.pruning import ChannelConfig, prune_channels

pytest.importorskip("transformers")


def _ids(vocab: int = 100, offset: int = 0):
    return lambda: torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0)) + offset


def _img(size: int = 32):
    return lambda: torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))


TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "vocab_size": 100, "max_position_embeddings": 40}
HF = {
    "bert": ("BertForSequenceClassification", {"model_type": "bert", **TEXT}, _ids()),
    "roberta": ("RobertaForSequenceClassification", {"model_type": "roberta", **TEXT}, _ids(97, 3)),
    "distilbert": ("DistilBertForSequenceClassification",
                   {"model_type": "distilbert", "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64,
                    "vocab_size": 100, "max_position_embeddings": 32}, _ids()),
    "gpt2": ("GPT2LMHeadModel", {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4,
                                 "vocab_size": 100, "n_positions": 32, "use_cache": False,
                                 "bos_token_id": 0, "eos_token_id": 0}, _ids()),
    "llama-gqa": ("LlamaForCausalLM", {"model_type": "llama", **TEXT, "num_key_value_heads": 2,
                                       "use_cache": False}, _ids()),
    "vit": ("ViTForImageClassification", {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
                                          "num_attention_heads": 4, "intermediate_size": 64,
                                          "image_size": 32, "patch_size": 8, "num_labels": 10}, _img()),
    "swin": ("SwinForImageClassification", {"model_type": "swin", "embed_dim": 16, "depths": [1, 1],
                                            "num_heads": [2, 4], "window_size": 4, "image_size": 32,
                                            "patch_size": 4, "num_labels": 10}, _img()),
    "convnext": ("ConvNextForImageClassification", {"model_type": "convnext", "hidden_sizes": [16, 32],
                                                    "depths": [1, 1], "num_stages": 2, "num_labels": 10},
                 _img()),
    "mobilenetv2": ("MobileNetV2ForImageClassification",
                    {"model_type": "mobilenet_v2", "depth_multiplier": 0.35, "image_size": 16,
                     "num_labels": 10}, _img(16)),
    "resnet": ("ResNetForImageClassification", {"model_type": "resnet", "embedding_size": 16,
                                                "hidden_sizes": [16, 32], "depths": [1, 1],
                                                "layer_type": "basic", "num_labels": 10}, _img()),
}
REGISTRY_INPUTS = {"lenet5": (1, 28, 28), "resnet_small": (1, 8, 8)}


def _check(model, x, hidden: bool, tmp_path, logits: bool) -> dict:
    model.eval()
    with torch.no_grad():
        before = output_tensor(model(x))
    res = prune_channels(model, ChannelConfig(ratio=0.5, hidden=hidden), example_inputs=x)
    with torch.no_grad():
        after = output_tensor(model(x))
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert res.params[1] < 0.8 * res.params[0], res.params
    path = deepshrink.save(model, tmp_path / f"pruned-{hidden}.safetensors")
    again = deepshrink.load(path)
    with torch.no_grad():
        assert torch.equal(output_tensor(again(x)), after)
    return {"kinds": {r["kind"] for r in res.pruned}, "config": res.edit["config"]}


@pytest.mark.parametrize("hidden", [False, True], ids=["heads-ffn-channels", "hidden-too"])
@pytest.mark.parametrize("name", list(HF))
def test_transformers_architectures(name, hidden, tmp_path):
    arch, cfg, make = HF[name]
    model = create_model("hf", arch=arch, config=cfg, seed=0)
    out = _check(model, make(), hidden, tmp_path, logits=True)
    assert ("hidden" in out["kinds"]) == hidden
    if "num_attention_heads" in cfg or "n_head" in cfg or "n_heads" in cfg:
        assert "head" in out["kinds"]
        assert out["config"].get("num_attention_heads") == 2  # the config follows the cut
    if hidden and name not in ("swin", "convnext", "mobilenetv2", "resnet"):
        assert out["config"]["hidden_size"] == 16
    if name in ("bert", "roberta", "llama-gqa"):
        assert out["config"]["intermediate_size"] == 32


def test_llama_gqa_keeps_kv_groups_whole():
    arch, cfg, make = HF["llama-gqa"]
    model = create_model("hf", arch=arch, config=cfg, seed=0)
    prune_channels(model, ChannelConfig(ratio=0.5), example_inputs=make())
    attn = model.model.layers[0].self_attn
    # 4 query heads sharing 2 kv heads: one kv head and its 2 query heads go together.
    assert attn.q_proj.out_features == 2 * 8 and attn.k_proj.out_features == attn.v_proj.out_features == 8
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2


@pytest.mark.parametrize("name", sorted(REGISTRY_INPUTS))
@pytest.mark.parametrize("hidden", [False, True], ids=["channels", "hidden-too"])
def test_registry_models(name, hidden, tmp_path):
    shape = REGISTRY_INPUTS[name]
    model = create_model(name, in_size=shape[-1])
    _check(model, torch.rand(2, *shape), hidden, tmp_path, logits=False)


def test_every_registered_model_prunes():
    for name in list_models():
        if name == "hf":
            continue
        model = create_model(name, in_size=28)
        res = prune_channels(model, ChannelConfig(ratio=0.5), example_inputs=torch.rand(2, 1, 28, 28))
        assert res.params[1] < res.params[0], name


def test_example_inputs_and_calibration_as_tensor_tuple_or_dict():
    arch, cfg, make = HF["bert"]
    ids = make()
    mask = torch.ones_like(ids)
    forms = [ids, (ids, mask), {"input_ids": ids, "attention_mask": mask}]
    widths = set()
    for form in forms:
        model = create_model("hf", arch=arch, config=cfg, seed=0)
        calib = [form, form]  # a list of batches in the same form
        prune_channels(model, ChannelConfig(ratio=0.5, importance="activation"), example_inputs=form,
                       calibration=calib)
        widths.add(model.bert.encoder.layer[0].intermediate.dense.out_features)
    assert widths == {32}
