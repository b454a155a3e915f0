"""ONNX Runtime forms (stage files + runner, If graph), int8 composition, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import deepshrink as ds
from deepshrink.cli import app
from deepshrink.early_exit import ExitConfig, add_exits
from deepshrink.errors import FormatError, ModelError

pytest.importorskip("onnxruntime")
from deepshrink.early_exit.onnx import OrtExitModel, export_exits_onnx


def _gap_thresholds(multi, x):
    with torch.no_grad():
        scores = [torch.softmax(z, -1).max(-1).values.sort().values for z in multi.all_exits(x)[:-1]]
    out = []
    for s in scores:  # halfway across the widest gap in the middle: no float ties at the threshold
        n = len(s)
        i = int(torch.argmax(s[n // 4 + 1: 3 * n // 4] - s[n // 4: 3 * n // 4 - 1])) + n // 4
        out.append(float((s[i] + s[i + 1]) / 2))
    return out


@pytest.mark.parametrize("name", ["lenet5", "resnet_small"])
def test_onnx_segments_and_if_graph_match_torch(kit, tmp_path, name):
    model, inputs, _ = kit.make(name)
    x = inputs(24)
    multi = add_exits(model, ExitConfig(pool=3), example_inputs=x).eval()  # pool 3: not a divisor
    for head in multi.heads:
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.3)
    multi.set_policy(_gap_thresholds(multi, x))
    export_exits_onnx(multi, tmp_path, x)
    with torch.no_grad():
        ref = multi.run(x)
    assert len(set(ref.exits.tolist())) == 3  # every exit taken by someone
    seg = OrtExitModel(tmp_path)(x)
    assert torch.allclose(seg, ref.logits, atol=1e-4)
    graph = OrtExitModel(tmp_path, mode="if")
    for i in range(len(x)):  # batch 1: the If graph is exactly the per-sample policy
        assert torch.allclose(graph(x[i:i + 1]), ref.logits[i:i + 1], atol=1e-4)
    multi.never_exit()
    export_exits_onnx(multi, tmp_path / "never", x)
    with torch.no_grad():
        assert torch.allclose(OrtExitModel(tmp_path / "never", mode="if")(x), model(x), atol=1e-4)


def test_int8_composes_with_exits(kit, tmp_path):
    from deepshrink.quantization import PTQConfig, quantize

    model, inputs, _ = kit.make("lenet5")
    x = inputs(64)
    multi = add_exits(model, ExitConfig(), example_inputs=x).eval()
    multi.set_policy(_gap_thresholds(multi, x))
    with multi.all_heads():  # every layer, heads included, sees calibration data
        q = quantize(multi, PTQConfig(mode="static", bits=8), calibration=[x])
    with torch.no_grad():
        ref, got = multi.run(x), q.run(x)
    assert (ref.exits == got.exits).float().mean() > 0.9
    assert torch.allclose(got.logits, ref.logits, atol=0.1)
    path = ds.save(q, tmp_path / "q.safetensors")
    back = ds.load(path)  # early_exit edit, then the quantize edit, replayed in order
    assert back.thresholds == q.thresholds
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    export_exits_onnx(q, tmp_path / "onnx", x)
    ops = {n.op_type for n in __import__("onnx").load(str(tmp_path / "onnx" / "stage0.onnx")).graph.node}
    assert ops & {"QuantizeLinear", "MatMulIntegerToFloat", "ConvInteger", "QLinearConv"}
    assert torch.allclose(OrtExitModel(tmp_path / "onnx")(x), got.logits, atol=0.05)
    graph = OrtExitModel(tmp_path / "onnx", mode="if")  # int8 QDQ inside If branches: no ORT abort
    for i in range(8):
        assert torch.allclose(graph(x[i:i + 1]), got.logits[i:i + 1], atol=0.05)


def test_onnx_refuses_bad_manifests_and_uncuttable_models(kit, tmp_path):
    model, inputs, kw = kit.make("bert")
    multi = add_exits(model, ExitConfig(**kw), example_inputs=inputs(2))
    with pytest.raises(ModelError):
        export_exits_onnx(multi, tmp_path, inputs(2)["input_ids"])
    (tmp_path / "exits.json").write_text(json.dumps({"format": "deepshrink-early-exit-onnx", "version": 1,
                                                    "stages": ["../../etc/passwd"], "thresholds": [],
                                                    "criterion": "confidence"}))
    with pytest.raises(FormatError, match="stages"):
        OrtExitModel(tmp_path)


def test_cli_early_exit_evaluate_info(tmp_path):
    torch.manual_seed(0)
    runner = CliRunner()
    base = tmp_path / "base.safetensors"
    r = runner.invoke(app, ["train", "-m", "lenet300", "-o", str(base), "--epochs", "10", "--json"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "exits.safetensors"
    r = runner.invoke(app, ["early-exit", str(base), "-o", str(out), "--budget", "2", "--epochs", "15",
                            "--lr", "0.01",
                            "--hidden", "16", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["test"]["points"] == ["3", "5"] and len(res["test"]["shares"]) == 3
    assert len(res["calibration"]["curve"]) > 1 and res["test"]["mean_macs"] < res["test"]["full_macs"]
    r = runner.invoke(app, ["evaluate", str(out), "--json"])
    ev = json.loads(r.stdout)
    assert ev["exits"]["shares"] == pytest.approx(res["test"]["shares"])
    assert ev["exits"]["mean_macs"] == pytest.approx(res["test"]["mean_macs"])
    r = runner.invoke(app, ["info", str(out), "--input-shape", "1,8,8"])
    assert r.exit_code == 0, r.output
    assert "recorded" in r.stdout and "(final)" in r.stdout and "fewer" in r.stdout
    r = runner.invoke(app, ["early-exit", str(base), "-o", str(base)])
    assert r.exit_code == 2 and "input model file" in r.output
    r = runner.invoke(app, ["early-exit", str(base), "-o", str(out), "--head", "huge"])
    assert r.exit_code == 2 and "ExitConfig.head" in r.output
