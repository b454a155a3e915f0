"""The low-rank demo stage: a third of the parameters, accuracy kept within reason, reloadable."""

from __future__ import annotations

import torch

import deepshrink
from deepshrink.demo import redesign as redesign_stage
from deepshrink.demo import run_demo
from deepshrink.redesign import common


def test_redesign_demo_stage(tmp_path, monkeypatch):
    # The per-layer speed check times tiny digits layers, whose verdict flips on a loaded machine
    # (a layer measured "not faster" is kept whole and the size assertion below then fails). This
    # test is about the stage's sizes and accuracy; the speed check has its own tests.
    monkeypatch.setattr(common, "speed_ratio", lambda old, new, x, **kw: 2.0)
    table = run_demo(tmp_path, quick=True, progress=False, stages=[redesign_stage.demo_stage])
    base, row = table.rows
    assert row["stage"].startswith("low-rank (1/3 params")
    assert row["bytes"] < 0.4 * base["bytes"]
    assert row["MACs"] < 0.4 * base["MACs"]
    assert row["top1"] > base["top1"] - 0.05  # digits test split: 360 images, 5 pt = 18 images
    model = deepshrink.load(tmp_path / "lowrank.safetensors")
    assert isinstance(model[2], torch.nn.Sequential)
