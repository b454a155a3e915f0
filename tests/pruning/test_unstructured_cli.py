"""`deepshrink prune`: iterative magnitude pruning to a compact file, errors, input protection."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import deepshrink
from deepshrink.cli import app
from deepshrink.data import load_digits
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, train

runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    train(m, load_digits(), TrainConfig(epochs=8, lr=2e-3, progress=False))
    return deepshrink.save(m, tmp_path_factory.mktemp("cli") / "base.safetensors")


def test_iterative_prune_json(base, tmp_path) -> None:
    out = tmp_path / "p.safetensors"
    r = runner.invoke(app, ["prune", str(base), "-o", str(out), "--ratio", "0.9", "--override", "6=0.5",
                            "--schedule", "iterative", "--rounds", "2", "--epochs", "2", "--spacing", "cubic",
                            "--max-drop", "5", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["nonzero"][1] == 50610 - round(0.9 * 19200) - round(0.9 * 30000) - 500
    assert res["bytes"][1] < 0.2 * res["bytes"][0]
    assert len(res["rounds"]) == 2
    assert res["rounds"][0]["layer_sparsity"]["2.weight"] == pytest.approx(0.9 * (1 - 0.5 ** 3), abs=1e-4)
    assert res["test_top1"][1] > res["test_top1"][0] - 0.1
    m = deepshrink.load(out)
    assert int(torch.count_nonzero(m[4].dense_weight())) == 3000


def test_prune_refuses_to_overwrite_input_and_bad_ratio(base, tmp_path) -> None:
    before = base.read_bytes()
    r = runner.invoke(app, ["prune", str(base), "-o", str(base), "--ratio", "0.5"])
    assert r.exit_code == 2 and "refusing to overwrite the input file" in r.output
    assert base.read_bytes() == before
    r = runner.invoke(app, ["prune", str(base), "-o", str(tmp_path / "x.safetensors"), "--ratio", "1.0"])
    assert r.exit_code == 2 and "UnstructuredConfig.ratio" in r.output
    r = runner.invoke(app, ["prune", str(base), "-o", str(tmp_path / "x.safetensors"), "--method", "nope"])
    assert r.exit_code == 2 and "--method" in r.output


def test_dense_format_threshold(base, tmp_path) -> None:
    out = tmp_path / "t.safetensors"
    r = runner.invoke(app, ["prune", str(base), "-o", str(out), "--method", "threshold",
                            "--threshold", "0.05", "--format", "dense", "--force", "--json"])
    assert r.exit_code == 0, r.output
    m, ref = deepshrink.load(out), deepshrink.load(base)
    for name in ("2", "4", "6"):
        w, w0 = m.get_submodule(name).weight, ref.get_submodule(name).weight
        assert torch.equal(w, torch.where(w0.abs() < 0.05, torch.zeros_like(w0), w0))
