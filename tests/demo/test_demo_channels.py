"""The channel-pruning demo stage: smaller file, smaller layers, accuracy kept within reason."""

from __future__ import annotations

import deepshrink
from deepshrink.demo import channels, run_demo


def test_structured_demo_stage(tmp_path):
    table = run_demo(tmp_path, quick=True, progress=False,
                     stages=[channels.demo_stage])
    base, row = table.rows
    assert row["stage"].startswith("pruned (channels 50%: 150-50 neurons)")
    assert row["bytes"] < 0.4 * base["bytes"]  # 17.8k of 50.6k parameters, stored dense
    assert row["MACs"] < 0.4 * base["MACs"]
    assert row["top1"] > base["top1"] - 0.05  # digits test split: 360 images, 5 pt = 18 images
    model = deepshrink.load(tmp_path / "pruned-channels.safetensors")
    assert [model[i].out_features for i in (2, 4, 6)] == [150, 50, 10]
