"""`deepshrink distill` end to end on digits, and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deepshrink import load, read_metadata, save
from deepshrink.cli import app
from deepshrink.data import load_digits
from deepshrink.distill import transfer_loader
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, evaluate, train


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_digits()
        torch.manual_seed(0)
        t = create_model("lenet300", in_size=8)
        cfg = TrainConfig(epochs=8, lr=2e-3, batch_size=64, progress=False)
        train(t, transfer_loader(data.train, 64), cfg)
    finally:
        torch.set_num_threads(n)
    return save(t, tmp_path_factory.mktemp("kd") / "teacher.safetensors")


def test_cli_distill_single_and_ensemble(teacher_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "student.safetensors"
    res = CliRunner().invoke(app, [
        "distill", "--teacher", str(teacher_file), "--teacher", str(teacher_file),
        "--student", "mlp", "--student-args", '{"hidden": 16}', "-o", str(out),
        "--temperature", "3", "--alpha", "0.8", "--combine", "probs", "--weights", "1,1",
        "--epochs", "25", "--lr", "0.004", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["kd_config"]["temperature"] == 3.0 and payload["kd_config"]["weights"] == [1.0, 1.0]
    assert set(payload["teacher_test_top1"]) == {str(teacher_file), "ensemble"}
    student = load(out)
    assert student[2].out_features == 16
    acc = evaluate(student, load_digits().loader("test", 512))["top1"]
    assert acc == pytest.approx(payload["student_test"]["top1"])
    assert acc > 0.85 and acc > payload["student_before_top1"] + 0.3
    assert read_metadata(out)["extra"]["distill"]["alpha"] == 0.8


def test_cli_student_from_file_and_bad_alpha(teacher_file: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    student_file = save(create_model("mlp", in_size=8, hidden=8), tmp_path / "s.safetensors")
    out = tmp_path / "o.safetensors"
    ok = CliRunner().invoke(app, ["distill", "-t", str(teacher_file), "-s", str(student_file),
                                  "-o", str(out), "--epochs", "1"])
    assert ok.exit_code == 0, ok.output
    assert load(out)[2].out_features == 8
    bad = CliRunner().invoke(app, ["distill", "-t", str(teacher_file), "-s", "mlp", "-o", str(out),
                                   "--alpha", "1.5"])
    assert bad.exit_code == 2 and "KDConfig.alpha" in bad.output
    bad_hint = CliRunner().invoke(app, ["distill", "-t", str(teacher_file), "-s", "mlp", "-o", str(out),
                                        "--hint", "3"])
    assert bad_hint.exit_code == 2 and "--hint" in bad_hint.output
    clobber = CliRunner().invoke(app, ["distill", "-t", str(teacher_file), "-s", str(student_file),
                                       "-o", str(student_file)])
    assert clobber.exit_code == 2 and "input model files" in clobber.output
