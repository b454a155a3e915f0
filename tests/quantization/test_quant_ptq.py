"""PTQ: modes, per-channel vs per-tensor, packed files, reload, mixed precision, conv and BERT."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from deepshrink import load, save
from deepshrink.errors import DataError
from deepshrink.models import create_model
from deepshrink.quantization import PTQConfig, QuantizedLayer, quantize, quantized_layers, weight_bytes
from deepshrink.quantization.packing import packed_nbytes
from deepshrink.train import evaluate


def _top1(model, digits) -> float:
    return evaluate(model, digits.loader("test", 512))["top1"]


@pytest.mark.parametrize("mode", ["weight-only", "dynamic", "static"])
def test_int8_modes_keep_accuracy(trained, digits, mode: str) -> None:
    base = _top1(trained, digits)
    q = quantize(copy.deepcopy(trained), PTQConfig(mode=mode), calibration=digits)
    assert len(quantized_layers(q)) == 3
    assert all(m.mode == mode for m in quantized_layers(q).values())
    assert _top1(q, digits) >= base - 0.02  # int8 on a 92 % digits model: within 2 points
    x = digits.test.tensors[0][:64]
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(q(x).flatten(), trained(x).flatten(), dim=0)
    assert cos > 0.999


def test_per_channel_beats_per_tensor_on_skewed_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16, bias=False))
    with torch.no_grad():  # channel magnitudes spanning 1000x: per-tensor wipes out the small ones
        model[0].weight.mul_(torch.logspace(-3, 0, 16)[:, None])
    x = torch.randn(256, 32)
    with torch.no_grad():
        ref = model(x)
    errs = {}
    for gran in ("tensor", "channel"):
        q = quantize(copy.deepcopy(model), PTQConfig(mode="weight-only", bits=4, granularity=gran,
                                                     weight_range="minmax"))
        with torch.no_grad():
            # mean relative error per output channel: every channel matters, not just the big ones
            errs[gran] = float(((q(x) - ref).norm(dim=0) / ref.norm(dim=0)).mean())
    assert errs["channel"] < 0.2 and errs["tensor"] > 0.3 and errs["channel"] < errs["tensor"] / 5


@pytest.mark.parametrize("bits, gran", [(8, "channel"), (4, "group"), (3, "channel"), (2, "tensor"),
                                        (1, "channel")])
def test_packed_file_bytes_and_reload(trained, digits, tmp_path: Path, bits: int, gran: str) -> None:
    q = quantize(copy.deepcopy(trained), PTQConfig(mode="weight-only", bits=bits, granularity=gran,
                                                   group_size=32))
    for name, layer in quantized_layers(q).items():
        n = layer.dense_weight().numel()
        if gran == "group":
            per = n // layer.shape[0]
            n = layer.shape[0] * -(-per // 32) * 32
        assert layer.packed.numel() == packed_nbytes(n, bits), name
    path = tmp_path / "q.safetensors"
    save(q, path)
    fp32 = tmp_path / "fp32.safetensors"
    save(trained, fp32)
    # The file holds the packed codes: it shrinks with the bit width (plus fixed metadata).
    wb = weight_bytes(q)
    assert path.stat().st_size < fp32.stat().st_size * (bits / 32) + wb * 0.5 + 8192
    back = load(path)
    x = digits.test.tensors[0][:32]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert isinstance(back[2], QuantizedLayer) and back[2].spec.bits == bits


def test_static_needs_calibration(trained) -> None:
    with pytest.raises(DataError):
        quantize(copy.deepcopy(trained), PTQConfig(mode="static"), calibration=None)


def test_mixed_precision_meets_target(trained, digits) -> None:
    q = quantize(copy.deepcopy(trained), PTQConfig(mode="weight-only", target_bits=4.0,
                                                   candidate_bits=(2, 4, 8)), calibration=digits)
    layers = quantized_layers(q)
    sizes = {n: m.dense_weight().numel() for n, m in layers.items()}
    avg = sum(m.spec.bits * sizes[n] for n, m in layers.items()) / sum(sizes.values())
    assert avg <= 4.0 + 1e-9
    assert len({m.spec.bits for m in layers.values()}) >= 1
    assert _top1(q, digits) >= _top1(trained, digits) - 0.05


def test_skip_and_layer_bits(trained) -> None:
    q = quantize(copy.deepcopy(trained), PTQConfig(mode="weight-only", bits=4, overrides={"6": 8},
                                                   ignore=("2",)))
    layers = quantized_layers(q)
    assert set(layers) == {"4", "6"} and layers["6"].spec.bits == 8 and layers["4"].spec.bits == 4
    assert isinstance(q[2], nn.Linear)


def test_conv1d_and_conv2d() -> None:
    torch.manual_seed(0)
    m2 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    m1 = nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 4, 3, dilation=2))
    for m, x in ((m2, torch.rand(16, 3, 12, 12)), (m1, torch.rand(16, 3, 30))):
        with torch.no_grad():
            ref = m(x)
        for mode in ("weight-only", "dynamic", "static"):
            q = quantize(copy.deepcopy(m), PTQConfig(mode=mode), calibration=x)
            with torch.no_grad():
                out = q(x)
            assert out.shape == ref.shape
            rel = float((out - ref).norm() / ref.norm())
            assert rel < 0.03, (mode, rel)


def test_bert_linear_layers(tmp_path: Path) -> None:
    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 32, "num_labels": 3}
    model = create_model("hf", arch="BertForSequenceClassification", config=cfg, seed=0)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert any(n.endswith(("query", "q_proj")) for n in names)
    ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    q = quantize(copy.deepcopy(model), PTQConfig(mode="static"), calibration=ids)
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert set(quantized_layers(q)) == set(names) | embeddings  # embeddings: most of the bytes
    with torch.no_grad():
        out = q(ids).logits
    assert float(nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)) > 0.99
    path = tmp_path / "bert-int8.safetensors"
    save(q, path)
    with torch.no_grad():
        assert torch.allclose(load(path)(ids).logits, out, atol=1e-6)


def test_choose_bits_minimises_sensitivity_within_budget() -> None:
    from deepshrink.quantization.mixed import choose_bits

    sens = {"a": {2: 10.0, 4: 1.0, 8: 0.0}, "b": {2: 100.0, 4: 5.0, 8: 0.0}}
    sizes = {"a": 100, "b": 10}
    assert choose_bits(sens, sizes, 4.0) == {"a": 4, "b": 4}  # 440 bits; a2+b8 would cost 10
    assert choose_bits(sens, sizes, 2.6) == {"a": 2, "b": 8}  # 280 bits of 286 allowed
    # many layers: the greedy path still respects the budget
    big = {f"l{i}": {2: float(i), 4: i / 4, 8: 0.0} for i in range(12)}
    sizes_big = {n: 10 + i for i, n in enumerate(big)}
    bits = choose_bits(big, sizes_big, 3.0)
    avg = sum(bits[n] * sizes_big[n] for n in big) / sum(sizes_big.values())
    assert avg <= 3.0 and max(bits.values()) > 2
