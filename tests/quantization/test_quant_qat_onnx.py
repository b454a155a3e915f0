"""QAT (STE, LSQ, shared training loop, convert) and ONNX export / ONNX Runtime execution."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from deepshrink.measure import measure_latency
from deepshrink.models import create_model
from deepshrink.quantization import (
    ActFakeQuant,
    FakeQuantLayer,
    OrtModel,
    PTQConfig,
    QATConfig,
    QuantSpec,
    WeightFakeQuant,
    convert,
    export_onnx,
    prepare_qat,
    quantize,
)
from deepshrink.train import TrainConfig, evaluate, train


def test_ste_gradient_flows_through_weight_quantizer() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 16, requires_grad=True)
    wq = WeightFakeQuant(QuantSpec(bits=3), method="minmax")
    out = wq(w)
    assert len(out.detach().unique()) <= 4 * 7  # at most 7 levels per channel
    out.sum().backward()
    # STE: gradient 1 for every element inside the clipping range (min-max: all of them)
    assert torch.allclose(w.grad, torch.ones_like(w))


def test_ste_zero_gradient_when_clipped_and_lsq_scale_gets_gradient() -> None:
    x = torch.linspace(-4, 4, 64, requires_grad=True)
    aq = ActFakeQuant(bits=4, lsq=True)
    aq.observing = True
    aq(torch.linspace(-1, 1, 64))
    aq.observing = False
    aq.freeze()
    assert aq.lsq_scale is not None
    y = aq(x)
    (y * torch.linspace(1, 2, 64)).sum().backward()
    inside = (x.detach() > -0.9) & (x.detach() < 0.9)
    assert torch.all(x.grad[inside] > 0) and torch.all(x.grad[x.detach().abs() > 1.5] == 0)
    assert aq.lsq_scale.grad is not None and float(aq.lsq_scale.grad.abs()) > 0

    w = torch.randn(4, 16, requires_grad=True)
    wq = WeightFakeQuant(QuantSpec(bits=4), method="mse", lsq=True)
    wq.init_from(w)
    (wq(w) * torch.randn(4, 16)).sum().backward()
    assert wq.scale is not None and wq.scale.grad is not None and float(wq.scale.grad.abs().sum()) > 0
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


@pytest.mark.parametrize("lsq", [False, True])
def test_qat_in_shared_loop_then_convert_and_export(trained, digits, tmp_path: Path, lsq: bool) -> None:
    base = evaluate(trained, digits.loader("test", 512))["top1"]
    m = prepare_qat(copy.deepcopy(trained), QATConfig(bits=4, act_bits=8, lsq=lsq), calibration=digits)
    assert sum(isinstance(x, FakeQuantLayer) for x in m.modules()) == 3
    before = [p.detach().clone() for p in m.parameters()]
    train(m, digits, TrainConfig(epochs=2, batch_size=64, lr=5e-4, progress=False))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, m.parameters(), strict=True))
    test = digits.loader("test", 512)
    fq_top1 = evaluate(m, test)["top1"]
    assert fq_top1 >= base - 0.03  # 4-bit weights after QAT: within 3 points on digits
    x = digits.test.tensors[0]
    m.eval()
    with torch.no_grad():
        ref = m(x)
    convert(m)
    with torch.no_grad():
        assert torch.allclose(m(x), ref, atol=1e-4)  # deployable form == fake-quant model
    path = tmp_path / "qat.onnx"
    export_onnx(m, path, x[:2])
    ort = OrtModel(path)
    # ONNX Runtime's integer kernels vs the torch fake-quant model: same grid and integer sums,
    # but ORT may quantize by multiplying with 1/scale, so an input within an ulp of a rounding
    # boundary can land one level apart. Hence: mean error tiny, max error of one step's effect.
    err = (ort(x) - ref).abs()
    assert float(err.mean()) < 1e-4 and float(err.max()) < 0.05, (float(err.mean()), float(err.max()))
    assert evaluate(ort, test)["top1"] == pytest.approx(fq_top1, abs=0.003)


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
def test_onnx_export_matches_torch_and_is_small(trained, digits, tmp_path: Path, mode: str) -> None:
    q = quantize(copy.deepcopy(trained), PTQConfig(mode=mode), calibration=digits)
    x = digits.test.tensors[0]
    path = tmp_path / f"{mode}.onnx"
    export_onnx(q, path, x[:2])
    proto = onnx.load(str(path))
    kinds = {init.name: init.data_type for init in proto.graph.initializer}
    int8_elems = sum(int(torch.tensor(list(i.dims)).prod()) for i in proto.graph.initializer
                     if i.data_type == onnx.TensorProto.INT8)
    consts = [n for n in proto.graph.node if n.op_type == "Constant"]
    for n in consts:
        t = n.attribute[0].t
        if t.data_type == onnx.TensorProto.INT8:
            int8_elems += int(torch.tensor(list(t.dims)).prod())
    n_weights = 64 * 300 + 300 * 100 + 100 * 10
    assert int8_elems == n_weights + 300 + 100 + 10, kinds  # + one int8 zero point per channel
    assert path.stat().st_size < n_weights * 1.15 + 8000  # ~1 byte per weight, not 4
    ort = OrtModel(path, threads=1)
    with torch.no_grad():
        ref = q(x)
    # dynamic: ORT's u8s8 kernels on AVX2 may saturate int16 pair sums, hence the looser bound;
    # static: the smoothing Mul before QuantizeLinear may put an input an ulp across a rounding
    # boundary (one level apart), so the mean error is tight and the max one step's effect.
    err = (ort(x) - ref).abs()
    assert float(err.mean()) < {"static": 1e-4, "dynamic": 0.01, "weight-only": 0.01}[mode]
    assert float(err.max()) < 0.05, float(err.max())
    assert evaluate(ort, digits.loader("test", 512))["top1"] >= evaluate(q, digits.loader("test", 512))[
        "top1"] - 0.01
    lat = measure_latency(ort, x[:1], warmup=1, repeats=3, min_time_s=0.0)
    assert lat.median_ms > 0


def test_onnx_conv_static_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = create_model("lenet5", in_size=16)
    x = torch.rand(32, 1, 16, 16)
    with torch.no_grad():
        fp = m(x)
    for mode in ("static", "dynamic"):
        q = quantize(copy.deepcopy(m), PTQConfig(mode=mode), calibration=x)
        ort = OrtModel(export_onnx(q, None, x[:2]))
        with torch.no_grad():
            ref = q(x)
        # QLinearConv requantizes its output with its own rounding, so a few conv outputs land
        # one level apart: the ORT-vs-torch difference must be far below the quantization error.
        diff = float((ort(x) - ref).abs().mean())
        qerr = float((ref - fp).abs().mean())
        assert diff < 0.1 * qerr, (mode, diff, qerr)


def test_bert_export_runs_in_ort() -> None:
    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 64, "vocab_size": 2000, "max_position_embeddings": 32, "num_labels": 2}
    model = create_model("hf", arch="BertForSequenceClassification", config=cfg, seed=0)
    ids = torch.randint(0, 2000, (4, 16), generator=torch.Generator().manual_seed(0))
    fp32_bytes = len(export_onnx(model, None, {"input_ids": ids}, dynamic_seq=True))
    q = quantize(copy.deepcopy(model), PTQConfig(mode="static", embedding_bits=8), calibration=ids)
    data = export_onnx(q, None, {"input_ids": ids}, dynamic_seq=True)
    # int8 embedding table and Linear weights (a quarter of fp32) plus per-row scales and ~40 KB of
    # graph structure that does not shrink (with smoothing factors and a Mul node per linear)
    assert len(data) < fp32_bytes / 4 + 55_000
    ort = OrtModel(data)
    with torch.no_grad():
        ref = q(ids).logits
        fp = model(ids).logits
    assert torch.allclose(ort({"input_ids": ids}), ref, atol=1e-3)
    assert float(nn.functional.cosine_similarity(ref.flatten(), fp.flatten(), dim=0)) > 0.99
    assert ort({"input_ids": ids[:2, :8]}).shape == (2, 2)  # dynamic batch and sequence


def test_export_rejects_group_granularity(trained, digits) -> None:
    from deepshrink.errors import ModelError

    q = quantize(copy.deepcopy(trained), PTQConfig(mode="weight-only", bits=4, granularity="group"))
    with pytest.raises(ModelError, match="per-group"):
        export_onnx(q, None, digits.test.tensors[0][:2])


def test_binary_qat_layer_values() -> None:
    lin = nn.Linear(16, 4)
    m = prepare_qat(nn.Sequential(lin), QATConfig(bits=1, act_bits=None))
    convert(m)
    w = m[0].dense_weight()
    for r in range(4):
        assert len(w[r].abs().unique()) == 1
