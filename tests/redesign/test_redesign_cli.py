"""`deepshrink factorize` / `separable` / `info` on small models and the embedded digits data."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import deepshrink
from deepshrink.cli import app
from deepshrink.models import create_model

runner = CliRunner()


def _saved(tmp_path, name, **kw):
    torch.manual_seed(0)
    model = create_model(name, in_size=8, **kw)
    return deepshrink.save(model, tmp_path / f"{name}.safetensors")


def test_factorize_json_info_and_reload(tmp_path):
    src = _saved(tmp_path, "lenet300")
    dst = tmp_path / "lr.safetensors"
    res = runner.invoke(app, ["factorize", str(src), "-o", str(dst), "--rank", "16", "--no-speed-check",
                              "--override", "6=10", "--epochs", "1", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    by = {r["name"]: r for r in rep["layers"]}
    assert by["2"]["rank"] == [16] and by["2"]["action"] == "linear"
    assert by["6"]["action"] == "skipped" and "does not pay" in by["6"]["reason"]
    assert rep["after"]["params"] < rep["before"]["params"]
    info = runner.invoke(app, ["info", str(dst), "--input-shape", "1,8,8", "--json"])
    assert info.exit_code == 0, info.output
    rows = {r["layer"]: r for r in json.loads(info.stdout)["rewritten"]}
    assert rows["2"]["rank"] == [16] and rows["4"]["form"] == "linear" and "6" not in rows
    text = runner.invoke(app, ["info", str(dst), "--input-shape", "1,8,8"])
    assert "rewritten layers" in text.stdout
    assert deepshrink.load(dst)[2][0].out_features == 16


def test_separable_json(tmp_path):
    src = _saved(tmp_path, "vgg_small", width=8, hidden=16)
    dst = tmp_path / "sep.safetensors"
    res = runner.invoke(app, ["separable", str(src), "-o", str(dst), "--no-speed-check", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert {r["name"] for r in rep["layers"] if r["action"] == "separable"} == {"1", "4", "8", "11"}
    assert rep["after"]["macs"] < rep["before"]["macs"]
    assert deepshrink.load(dst)[4][0].groups == 8


def test_errors_are_one_line(tmp_path):
    src = _saved(tmp_path, "mlp")
    res = runner.invoke(app, ["factorize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "0"])
    assert res.exit_code == 2 and "LowRankConfig.rank" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["factorize", str(src), "-o", str(src), "--rank", "4"])
    assert res.exit_code == 2 and "input file" in res.output
    res = runner.invoke(app, ["separable", str(src), "-o", str(tmp_path / "o.safetensors"), "--between", "x"])
    assert res.exit_code == 2 and "SeparableConfig.between" in res.output
