"""Breadth: `transformers` models of every common family quantize with the defaults, keep the
attributes their own code reads, export to ONNX and run in ONNX Runtime close to fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deepshrink.models import create_model
from deepshrink.quantization import (
    OrtModel,
    PTQConfig,
    QuantizedLayer,
    export_onnx,
    quantize,
    quantized_layers,
)

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

_IMG = {"num_channels": 3, "image_size": 32}
CASES = {
    "mobilenet_v2": ("MobileNetV2Model", {"model_type": "mobilenet_v2", "depth_multiplier": 0.35,
                                          "image_size": 32}, "image"),
    "resnet": ("ResNetModel", {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16],
                               "depths": [1, 1], "layer_type": "basic"}, "image"),
    "vit": ("ViTModel", {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 8, **_IMG},
            "image"),
    "bert": ("BertModel", {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 500,
                           "max_position_embeddings": 64}, "text"),
    "distilbert": ("DistilBertModel", {"model_type": "distilbert", "dim": 32, "n_layers": 2, "n_heads": 2,
                                       "hidden_dim": 64, "vocab_size": 500,
                                       "max_position_embeddings": 64}, "text"),
    "gpt2": ("GPT2Model", {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
                           "vocab_size": 500, "n_positions": 64}, "text"),
    "llama": ("LlamaModel", {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64,
                             "vocab_size": 500, "max_position_embeddings": 64}, "text"),
}


def _inputs(kind: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(0, 500, (n, 12), generator=g)}


def _out(model_out) -> torch.Tensor:
    from deepshrink.modeling import output_tensor

    return output_tensor(model_out).float()


# MobileNetV2 has a fixed depth of 17 blocks: its TorchScript export alone takes ~15 s.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "mobilenet_v2" else n
                                  for n in CASES])
def test_hf_family_quantizes_exports_and_runs(name: str) -> None:
    arch, cfg, kind = CASES[name]
    model = create_model("hf", arch=arch, config=cfg, seed=0).eval()
    torch.manual_seed(0)
    for m in model.modules():  # HF's std-0.02 conv init makes a deep CNN's output vanish (1e-25)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    calib = [_inputs(kind, 8, s) for s in range(2)]
    x = _inputs(kind, 4, 99)
    with torch.no_grad():
        ref = _out(model(**x))
    floats = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              or type(m).__name__ == "Conv1D"}
    q = quantize(copy.deepcopy(model), PTQConfig(), calibration=calib)
    layers = quantized_layers(q)
    assert set(floats) <= set(layers), set(floats) - set(layers)
    for n, f in floats.items():  # the attributes third-party code reads survive
        ql = layers[n]
        assert tuple(ql.weight.shape) == tuple(f.weight.shape), n
        for attr in ("in_features", "out_features", "stride", "padding", "dilation", "groups",
                     "kernel_size", "in_channels", "out_channels", "nf", "nx"):
            if hasattr(f, attr):
                want = getattr(f, attr)
                want = tuple(want) if isinstance(want, (tuple, list)) else want
                assert getattr(ql, attr) == want, (n, attr)
    with torch.no_grad():
        sim = _out(q(**x))
    assert _cos(sim, ref) >= 0.99, ("torch", name, _cos(sim, ref))
    ort = OrtModel(export_onnx(q, None, _inputs(kind, 2, 5), dynamic_seq=kind == "text"))
    got = ort(x)
    assert got.shape == ref.shape
    assert _cos(got, ref) >= 0.99, ("onnxruntime", name, _cos(got, ref))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)))


def test_gpt2_conv1d_keeps_its_layout() -> None:
    """HF Conv1D stores its weight (in, out); the quantized layer shows the same view."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 16)
    q = QuantizedLayer.from_float(conv, PTQConfig().spec_for("c"), "weight-only")
    assert tuple(q.weight.shape) == (16, 24) and (q.nf, q.nx) == (24, 16)
    x = torch.randn(3, 5, 16)
    assert torch.allclose(q(x), conv(x), atol=0.02)
