"""SparseLinear matches the dense masked layer; conversion swaps only past the crossover."""

from __future__ import annotations

import copy

import pytest
import torch

from deepshrink.measure import count_params, layer_stats
from deepshrink.models import create_model
from deepshrink.pruning import SparseLinear, UnstructuredConfig, measure_crossover, prune, to_sparse_inference

FAST = {"rounds": 1, "repeats": 3, "warmup": 1, "min_time_s": 0.0}


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_allclose_to_dense(bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(50, 30, bias=bias)
    with torch.no_grad():
        lin.weight[torch.rand(lin.weight.shape, generator=gen) < 0.9] = 0.0
    sp = SparseLinear.from_layer(lin)
    for shape in ((1, 50), (7, 50), (2, 3, 50), (1, 1, 50)):
        x = torch.randn(*shape, generator=gen)
        # float32 sums in a different order: agree to float tolerance, not bitwise
        torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(sp.dense_weight(), lin.weight.detach())


def test_to_sparse_inference_swaps_only_sparse_enough_layers() -> None:
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    prune(m, UnstructuredConfig(ratio=0.9, overrides={"6": 0.3}))
    ref = copy.deepcopy(m)
    to_sparse_inference(m, min_sparsity=0.8)
    assert isinstance(m[2], SparseLinear) and isinstance(m[4], SparseLinear)
    assert isinstance(m[6], torch.nn.Linear)
    assert m.deepshrink_sparse_plan["6"]["swap"] is False
    x = torch.rand(9, 1, 8, 8)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert count_params(m) == count_params(ref)  # counted through dense_weight()
    assert [r.sparsity for r in layer_stats(m)] == [r.sparsity for r in layer_stats(ref)]


def test_measured_plan_and_crossover_structure() -> None:
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    prune(m, UnstructuredConfig(ratio=0.95))
    from deepshrink.pruning.sparse import sparse_inference_plan

    plan = sparse_inference_plan(m, batch_size=4, latency_kw=FAST)
    assert set(plan) == {"2", "4", "6"}
    for e in plan.values():
        assert e["swap"] == (e["sparse_ms"] < e["dense_ms"])
        assert e["sparsity"] == pytest.approx(0.95, abs=1e-3)
    c = measure_crossover([(20, 30)], batches=(1, 8), sparsities=(0.5, 0.9), latency_kw=FAST)
    assert len(c.rows) == 4
    assert set(c.crossover) == {"20x30@b1", "20x30@b8"}
    for row in c.rows:
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["sparse_ms"])
    for key, val in c.crossover.items():
        rows = [r for r in c.rows if f"@b{r['batch']}" in key]
        if val is not None:  # every tried sparsity from the crossover on was a win
            assert all(r["sparse_ms"] < r["dense_ms"] for r in rows if r["sparsity"] >= val)
