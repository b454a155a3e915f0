"""The demo's pruning stage: its row, its compact file, the hand-off to weight sharing."""

from __future__ import annotations

import torch

import deepshrink
from deepshrink.demo import run_demo, unstructured
from deepshrink.pruning import get_masks


def test_demo_stage_row_and_handoff(tmp_path) -> None:
    shared = {}  # run_demo does not return its context: capture ctx.shared through a wrapper stage

    def stage(ctx) -> None:
        unstructured.demo_stage(ctx)
        shared.update(ctx.shared)

    table = run_demo(tmp_path, quick=True, progress=False, stages=[stage])
    base, row = table.rows[0], table.rows[1]
    assert row["stage"].startswith("pruned (unstructured")
    assert row["nonzero"] < 0.15 * base["nonzero"]
    assert row["bytes"] < 0.2 * base["bytes"]
    assert row["drop_pt"] < 5.0  # 360 test images: 5 pt is 18 images
    path = tmp_path / "pruned-unstructured.safetensors"
    assert path.stat().st_size == row["bytes"]
    model = shared["pruned_unstructured"]
    masks = get_masks(model)
    assert set(masks) == {"2.weight", "4.weight", "6.weight"}
    x = torch.rand(8, 1, 8, 8)
    assert torch.equal(deepshrink.load(path)(x), model(x))
