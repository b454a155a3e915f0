"""Sensitivity scan: one curve per layer, derived ratios meet their targets, model untouched."""

from __future__ import annotations

import json

import pytest
import torch

from deepshrink.data import load_digits
from deepshrink.errors import ConfigError
from deepshrink.models import create_model
from deepshrink.pruning import sensitivity_scan
from deepshrink.train import TrainConfig, train


@pytest.fixture(scope="module")
def scan():
    torch.manual_seed(0)
    data = load_digits()
    m = create_model("lenet300", in_size=8)
    train(m, data, TrainConfig(epochs=4, progress=False))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = sensitivity_scan(m, data.loader("val", 512), ratios=(0.5, 0.8, 0.95))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    return s


def test_shape_and_json(scan) -> None:
    assert list(scan.top1) == ["2", "4", "6"]
    assert all(len(v) == 3 for v in scan.top1.values())
    d = json.loads(json.dumps(scan.to_json_dict()))
    assert d["x"] == [0.5, 0.8, 0.95]
    assert [s["layer"] for s in d["series"]] == ["2", "4", "6"]
    assert len(d["series"][0]["drop_pt"]) == 3
    rows = scan.table().rows
    assert len(rows) == 3 and "drop@0.95" in rows[0]
    assert scan.params == {"2": 19200, "4": 30000, "6": 1000}


def test_ratios_for_drop_and_sparsity(scan) -> None:
    loose = scan.ratios_for_drop(100.0)
    assert loose == {"2": 0.95, "4": 0.95, "6": 0.95}
    r = scan.ratios_for_sparsity(0.7)
    assert scan.overall_sparsity(r) == pytest.approx(0.7)
    assert all(0.0 <= v < 1.0 for v in r.values())
    with pytest.raises(ConfigError, match="above what the tried ratios reach"):
        scan.ratios_for_sparsity(0.99)


def test_bad_ratios_rejected() -> None:
    m = create_model("mlp", in_size=8)
    with pytest.raises(ConfigError, match="ratios"):
        sensitivity_scan(m, load_digits().loader("val"), ratios=(0.5, 1.0))
