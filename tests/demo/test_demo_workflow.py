"""The demo's workflow stage: a measured recipe run whose HTML report ends the demo."""

from __future__ import annotations

from deepshrink.demo import run_demo, workflow


def test_demo_writes_the_report_of_its_run(tmp_path):
    table = run_demo(tmp_path, quick=True, progress=False, stages=[workflow.demo_stage], threads=1)
    row = table.rows[-1]
    assert row["stage"].startswith("recipe:")
    assert row["bytes"] == (tmp_path / "recipe" / "03-pack.dsz").stat().st_size
    assert row["size_ratio"] > 10
    html = (tmp_path / "report.html").read_text()
    for part in ('id="stage-table"', 'id="demo-table"', 'id="chart-size"', 'id="chart-layer-sparsity"'):
        assert part in html
    assert (tmp_path / "recipe" / "results.json").exists()
