"""Files: save -> load rebuilds both transforms; bad edits are refused by name; ONNX export;
composition with pruning, quantization, weight sharing and .dsz."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deepshrink
from deepshrink.errors import FormatError
from deepshrink.models import create_model, get_spec
from deepshrink.redesign import (
    LowRankConfig,
    SeparableConfig,
    factorize,
    rewritten_layers,
    separate,
)


def _lowrank_lenet5():
    torch.manual_seed(0)
    model = create_model("lenet5", in_size=16)
    x = torch.rand(8, 1, 16, 16)
    factorize(model, LowRankConfig(rank=6, check_speed=False), example_inputs=x)
    return model.eval(), x


def _separable_vgg():
    torch.manual_seed(0)
    model = create_model("vgg_small", in_size=16, width=8, hidden=16)
    x = torch.rand(8, 1, 16, 16)
    separate(model, SeparableConfig(check_speed=False, between="bn"), example_inputs=x)
    return model.eval(), x


@pytest.mark.parametrize("make", [_lowrank_lenet5, _separable_vgg])
def test_save_load_gives_identical_outputs(tmp_path, make):
    model, x = make()
    path = deepshrink.save(model, tmp_path / "m.safetensors")
    back = deepshrink.load(path)
    assert torch.equal(back(x), model(x))
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    # (the file's JSON has sorted keys, so compare the rows in one order)
    def rows(m):
        return sorted(rewritten_layers(get_spec(m)), key=lambda r: r["layer"])

    assert rows(back) == rows(model)


@pytest.mark.parametrize("form", ["tucker2", "cp"])
def test_tucker2_and_cp_save_load(tmp_path, form):
    model = create_model("lenet5", in_size=16)
    x = torch.rand(2, 1, 16, 16)
    factorize(model, LowRankConfig(rank=4, conv=form, targets=("conv2d",), check_speed=False),
              example_inputs=x)
    assert [r["form"] for r in rewritten_layers(get_spec(model))] == [form, form]
    back = deepshrink.load(deepshrink.save(model, tmp_path / "t.safetensors"))
    assert torch.equal(back.eval()(x), model.eval()(x))


pytestmark = pytest.mark.filterwarnings("ignore:.*tensor digest")


def _rewrite_spec(path, tmp_path, fn):
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["deepshrink"])
    fn(meta["spec"]["edits"][-1])
    # Crafted as an attacker would: no digest (a version-1 file), so the schema check is reached.
    meta.pop("digest", None)
    meta["version"] = 1
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"deepshrink": json.dumps(meta)})
    return bad


@pytest.mark.parametrize("mutate,field", [
    (lambda e: e["layers"]["3"].__setitem__("rank", [10**6]), "rank"),
    (lambda e: e["layers"]["3"].__setitem__("rank", ["6"]), "rank[0]"),
    (lambda e: e["layers"]["3"].__setitem__("form", "parafac"), "form"),
    (lambda e: e["layers"]["3"].__setitem__("shape", [1, 2, 3, 4]), "shape"),
    (lambda e: e["layers"]["3"].__setitem__("evil", "os:system"), "unknown field"),
    (lambda e: e["layers"].__setitem__("9.9", e["layers"].pop("3")), "no layer"),
    (lambda e: e.__setitem__("layers", []), "layers"),
])
def test_bad_lowrank_edit_is_a_format_error_naming_the_field(tmp_path, mutate, field):
    model, _ = _lowrank_lenet5()
    bad = _rewrite_spec(deepshrink.save(model, tmp_path / "m.safetensors"), tmp_path, mutate)
    with pytest.raises(FormatError, match=field.replace("[", r"\[").replace("]", r"\]")):
        deepshrink.load(bad)


@pytest.mark.parametrize("mutate,field", [
    (lambda e: e["layers"]["4"].__setitem__("multiplier", 0), "multiplier"),
    (lambda e: e["layers"]["4"].__setitem__("between", "gelu"), "between"),
    (lambda e: e["layers"]["4"].__setitem__("shape", [8, 8, 3]), "shape"),
])
def test_bad_separable_edit_is_a_format_error_naming_the_field(tmp_path, mutate, field):
    model, _ = _separable_vgg()
    bad = _rewrite_spec(deepshrink.save(model, tmp_path / "m.safetensors"), tmp_path, mutate)
    with pytest.raises(FormatError, match=field):
        deepshrink.load(bad)


@pytest.mark.parametrize("make", [_lowrank_lenet5, _separable_vgg])
def test_onnx_export_matches(tmp_path, make):
    pytest.importorskip("onnxruntime")
    from deepshrink.quantization import OrtModel, export_onnx

    model, x = make()
    export_onnx(model, tmp_path / "m.onnx", x[:1])
    ort = OrtModel(tmp_path / "m.onnx")
    assert torch.allclose(torch.as_tensor(ort(x)), model(x), atol=1e-4)


def test_composes_with_channel_pruning_static_int8_sharing_and_dsz(tmp_path):
    pytest.importorskip("onnxruntime")
    from deepshrink.dsz import pack
    from deepshrink.pruning import ChannelConfig, prune
    from deepshrink.quantization import OrtModel, PTQConfig, export_onnx, quantize
    from deepshrink.sharing import KMeansConfig, share

    model, x = _lowrank_lenet5()
    ref = model(x)
    # the factor layers are ordinary Linear/Conv2d, so channel pruning cuts them
    prune(model, ChannelConfig(ratio=0.25), example_inputs=x[:2])
    assert model[6][0].out_features < 6 or model[3][0].out_channels < 6
    back = deepshrink.load(deepshrink.save(model, tmp_path / "p.safetensors"))
    assert torch.equal(back(x), model(x))
    q = quantize(back, PTQConfig(mode="static", bits=8), calibration=x)
    export_onnx(q, tmp_path / "q.onnx", x[:1])
    assert torch.as_tensor(OrtModel(tmp_path / "q.onnx")(x)).shape == ref.shape
    model2, _ = _separable_vgg()
    share(model2, KMeansConfig(bits=5))
    pack(model2, tmp_path / "s.dsz")
    unpacked = deepshrink.load(tmp_path / "s.dsz")
    assert torch.allclose(unpacked(x), model2(x), atol=1e-5)


@pytest.mark.parametrize("make", [_lowrank_lenet5, _separable_vgg])
def test_replay_allocates_nothing_on_the_meta_device(make):
    """A loader may build the recorded architecture on the meta device first (to check a file
    before allocating): the replayers must only build structure, never touch weight values."""
    from deepshrink.models import build_from_spec

    model, _ = make()
    with torch.device("meta"):
        skeleton = build_from_spec(get_spec(model))
    assert all(p.is_meta for p in skeleton.parameters())
    assert [(n, p.shape) for n, p in skeleton.named_parameters()] == \
        [(n, p.shape) for n, p in model.named_parameters()]


def test_a_fresh_process_loads_a_rewritten_model(tmp_path):
    """`deepshrink.load` alone (no import of deepshrink.redesign) must know both edit kinds."""
    import subprocess
    import sys

    model, x = _lowrank_lenet5()
    separate(model, SeparableConfig(check_speed=False), example_inputs=x)
    path = deepshrink.save(model, tmp_path / "m.safetensors")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, deepshrink; m = deepshrink.load(sys.argv[1]); "
            "print(float(m(torch.load(sys.argv[2], weights_only=True)).sum()))")
    res = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-500:]
    assert float(res.stdout) == pytest.approx(float(model(x).sum()), rel=1e-6)
