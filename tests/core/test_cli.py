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
