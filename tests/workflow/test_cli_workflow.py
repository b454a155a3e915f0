"""`deepshrink run / shrink / report` from the command line."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from deepshrink.cli import app

runner = CliRunner()

RECIPE = {"name": "cli", "stages": [
    {"stage": "prune", "config": {"ratio": 0.8}, "finetune": {"epochs": 1}},
    {"stage": "share", "config": {"bits": 4}},
    {"stage": "pack"}]}


def test_run_writes_results_and_report_and_report_regenerates(digits_model, tmp_path):
    _, model = digits_model
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--model", str(model), "--out", str(out),
                            "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [s["stage"] for s in res["stages"]] == ["original", "prune", "share", "pack"]
    assert res["stages"][-1]["bytes"] == (out / "03-pack.dsz").stat().st_size
    html = (out / "report.html").read_text()
    assert 'id="chart-size"' in html
    r = runner.invoke(app, ["report", str(out / "results.json"), "-o", str(tmp_path / "again.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again.html").read_text() == html


def test_run_rejects_a_bad_recipe_naming_stage_and_key(digits_model, tmp_path):
    _, model = digits_model
    bad = json.loads(json.dumps(RECIPE))
    bad["stages"][1]["config"]["bitz"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = runner.invoke(app, ["run", str(tmp_path / "bad.json"), "--model", str(model),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "stage 2 (share)" in r.output and "'bitz'" in r.output
    assert not (tmp_path / "o").exists()  # validated before anything ran


def test_shrink_cli(digits_model, tmp_path):
    _, model = digits_model
    out = tmp_path / "s"
    r = runner.invoke(app, ["shrink", str(model), "--max-drop", "20", "--objective", "size", "--target", "5x",
                            "--candidates", "2", "--rungs", "1", "--epochs-scale", "0.3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "search.json").read_text())
    assert res["chosen"] is not None and res["target"] == "5x"
    chosen = next(s for s in res["selected"] if s["role"] == "chosen")
    assert chosen["size_ratio"] >= 5 and "test_top1" in chosen
    assert (out / "report.html").exists()
    r = runner.invoke(app, ["shrink", str(model), "--objective", "speed", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "SearchConfig.objective" in r.output
