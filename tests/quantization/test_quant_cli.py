"""`deepshrink quantize` end to end on the embedded digits data."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from deepshrink import load, save
from deepshrink.cli import app
from deepshrink.data import load_digits
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, train

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    data = load_digits()
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    train(m, data, TrainConfig(epochs=4, batch_size=64, lr=2e-3, progress=False))
    path = tmp_path_factory.mktemp("q") / "lenet300.safetensors"
    save(m, path, extra={"dataset": "digits"})
    return path


def test_quantize_static_onnx_json(ckpt) -> None:
    out = ckpt.parent / "int8.onnx"
    before = ckpt.read_bytes()
    r = runner.invoke(app, ["quantize", str(ckpt), "-o", str(out), "--mode", "static", "--bits", "8",
                            "--calib", "digits", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["output_bytes"] == out.stat().st_size and res["size_ratio"] > 3.3
    assert res["drop_pt"] < 2.0 and res["config"]["mode"] == "static"
    assert ckpt.read_bytes() == before  # the input is untouched


def test_quantize_weight_only_safetensors_loads(ckpt) -> None:
    out = ckpt.parent / "w3.safetensors"
    r = runner.invoke(app, ["quantize", str(ckpt), "-o", str(out), "--mode", "weight-only", "--bits", "3",
                            "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["size_ratio"] > 6  # 3-bit codes + per-channel scales vs fp32
    model = load(out)
    assert model[2].spec.bits == 3


def test_quantize_errors(ckpt) -> None:
    r = runner.invoke(app, ["quantize", str(ckpt), "-o", str(ckpt)])
    assert r.exit_code == 2 and "overwrite the input" in r.output
    r = runner.invoke(app, ["quantize", str(ckpt), "-o", str(ckpt.parent / "x.onnx"), "--mode", "int3"])
    assert r.exit_code == 2 and "PTQConfig.mode" in r.output
    r = runner.invoke(app, ["quantize", str(ckpt), "-o", str(ckpt.parent / "x.onnx"), "--bits", "9"])
    assert r.exit_code == 2 and "PTQConfig.bits" in r.output
    r = runner.invoke(app, ["quantize", str(ckpt), "-o", str(ckpt.parent / "x.pt")])
    assert r.exit_code == 2 and ".onnx or .safetensors" in r.output
