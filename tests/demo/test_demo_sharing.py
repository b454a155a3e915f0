"""The demo's Deep Compression stage: a .dsz row measured from its file."""

from pathlib import Path

from deepshrink.demo import run_demo, sharing


def test_demo_stage(tmp_path: Path) -> None:
    table = run_demo(tmp_path, quick=True, progress=False,
                     stages=[sharing.demo_stage])
    row = table.rows[-1]
    assert row["stage"].endswith("(.dsz)")
    assert row["bytes"] == (tmp_path / "model.dsz").stat().st_size
    assert row["size_ratio"] > 15 and row["drop_pt"] < 3
