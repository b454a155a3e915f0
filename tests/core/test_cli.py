import json

from typer.testing import CliRunner

from deepshrink.cli import app

runner = CliRunner()


def test_help_everywhere():
    for cmd in ([], ["train"], ["evaluate"], ["info"], ["demo"]):
        r = runner.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output


def test_train_evaluate_info_json(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["train", "-m", "mlp", "-d", "digits", "-o", str(ckpt), "--epochs", "10",
                            "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["test"]["top1"] > 0.8 and len(res["history"]) == 10 and ckpt.exists()

    r = runner.invoke(app, ["evaluate", str(ckpt), "--json"])
    ev = json.loads(r.stdout)
    assert abs(ev["top1"] - res["test"]["top1"]) < 1e-9 and ev["n"] == 360

    r = runner.invoke(app, ["info", str(ckpt), "--input-shape", "1,8,8", "--json"])
    info = json.loads(r.stdout)
    assert info["params"] == 64 * 128 + 128 + 128 * 10 + 10
    assert info["bytes"] == ckpt.stat().st_size and info["macs"] == 64 * 128 + 128 * 10
    assert [layer["name"] for layer in info["layers"]] == ["2", "4"]


def test_errors_are_one_line_with_hint(tmp_path):
    r = runner.invoke(app, ["train", "-m", "nope", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2
    assert "error: unknown model 'nope'" in r.output and "hint:" in r.output
    r = runner.invoke(app, ["evaluate", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "no such file" in r.output
    r = runner.invoke(app, ["train", "-m", "mlp", "-o", str(tmp_path / "x"), "--model-args", "[1]"])
    assert r.exit_code == 2 and "--model-args must be a JSON object" in r.output


def test_demo_runs_the_whole_pipeline(tmp_path):
    r = runner.invoke(app, ["demo", "--quick", "--threads", "1", "-o", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    stages = [row["stage"] for row in rows]
    assert stages[0] == "baseline (fp32)" and len(stages) >= 7
    for key in ("pruned (unstructured", "pruned (channels", ".dsz", "distilled", "int8", "4-bit"):
        assert any(key in s for s in stages), key
    base = rows[0]
    assert base["top1"] >= 0.9
    assert base["bytes"] == (tmp_path / "baseline.safetensors").stat().st_size
    for row in rows[1:]:
        assert row["bytes"] < base["bytes"], row["stage"]  # every technique makes the file smaller
        assert row["drop_pt"] <= 5.0, row["stage"]
        # a ratio whose spread overlaps 1.0 is shown as noise, never as a misleading number
        assert row["speedup@b1"] == "~1 (noise)" or row["speedup@b1"] > 0
        assert row["ms@b256"] > 0
    assert (tmp_path / "demo.json").exists()
