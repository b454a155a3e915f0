"""One calling contract across families, tried the way a `transformers` user would: a plain
encoder (no logits, only last_hidden_state) fed tokenizer-style dicts goes through prune ->
quantize -> ONNX -> ONNX Runtime, and a from_pretrained model saved with deepshrink.save reloads
identically after pruning and after quantization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deepshrink
from deepshrink.pruning import ChannelConfig, prune
from deepshrink.quantization import PTQConfig, export_onnx, quantize

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


def encoder() -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def batch(n: int = 4, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 96, (n, seq), generator=g),
            "attention_mask": torch.ones(n, seq, dtype=torch.long)}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


def test_plain_encoder_prune_quantize_export_run(tmp_path: Path) -> None:
    model = encoder()
    before = sum(p.numel() for p in model.parameters())
    prune(model, ChannelConfig(ratio=0.5), example_inputs=batch(),
          calibration=[batch(seed=s) for s in (1, 2)])
    assert sum(p.numel() for p in model.parameters()) < 0.8 * before
    ref = model(**batch(seed=3)).last_hidden_state
    quantize(model, PTQConfig(), calibration=[batch(seed=s) for s in (4, 5)])
    export_onnx(model, tmp_path / "enc.onnx", batch(seed=3))
    ort_out = deepshrink.load(tmp_path / "enc.onnx")(**batch(seed=3))
    assert ort_out.shape == ref.shape
    assert cosine(ort_out, ref) > 0.98  # int8 of a random-init encoder vs its float self


def test_from_pretrained_saved_reloads_after_prune_and_quantize(tmp_path: Path) -> None:
    encoder().save_pretrained(tmp_path / "hub")
    model = transformers.BertModel.from_pretrained(tmp_path / "hub").eval()
    prune(model, ChannelConfig(ratio=0.5), example_inputs=batch())
    deepshrink.save(model, tmp_path / "pruned.safetensors")
    x = batch(seed=7)
    assert torch.equal(deepshrink.load(tmp_path / "pruned.safetensors")(**x).last_hidden_state,
                       model(**x).last_hidden_state)
    quantize(model, PTQConfig(), calibration=batch(8, seed=8))
    deepshrink.save(model, tmp_path / "int8.safetensors")
    torch.testing.assert_close(deepshrink.load(tmp_path / "int8.safetensors")(**x).last_hidden_state,
                               model(**x).last_hidden_state, rtol=0, atol=0)
