import torch
from torch import nn

import deepshrink as ds
from deepshrink.measure import (
    compare_latency,
    count_macs,
    count_params,
    file_bytes,
    fp32_safetensors_bytes,
    layer_stats,
    measure_latency,
    measure_model,
)


def test_lenet5_macs_match_hand_count():
    m = ds.create_model("lenet5")
    # conv1: 24*24 outputs x 20 filters x 5*5*1; conv2: 8*8 x 50 x 5*5*20; fc 800*500; fc 500*10
    hand = 24 * 24 * 20 * 25 + 8 * 8 * 50 * 25 * 20 + 800 * 500 + 500 * 10
    total, per = count_macs(m, torch.rand(1, 1, 28, 28))
    assert hand == 2_293_000
    assert total == hand
    assert per["1"] == 288_000 and per["3"] == 1_600_000
    assert count_macs(m, torch.rand(4, 1, 28, 28))[0] == 4 * hand


def test_macs_count_batchnorm_and_attention():
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    total, _ = count_macs(bn, torch.rand(1, 1, 6, 6))
    assert total == 4 * 4 * 4 * 9 + 4 * 4 * 4

    class Attn(nn.Module):
        def forward(self, q):
            return nn.functional.scaled_dot_product_attention(q, q, q)

    # (B=1, H=2, L=5, D=8): QK^T 2*5*5*8 MACs and AV 2*5*5*8 MACs
    total, _ = count_macs(Attn(), torch.rand(1, 2, 5, 8))
    assert total == 2 * (2 * 5 * 5 * 8)


def test_params_and_sparsity():
    m = ds.create_model("lenet300")
    total, nonzero = count_params(m)
    assert total == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert nonzero == total
    with torch.no_grad():
        m[2].weight[:, :392] = 0
    total2, nonzero2 = count_params(m)
    assert total2 == total and nonzero2 == total - 300 * 392
    rows = {r.name: r for r in layer_stats(m)}
    assert abs(rows["2"].sparsity - 0.5) < 1e-9 and rows["4"].sparsity == 0.0


def test_serialized_bytes_equal_file_size(tmp_path):
    m = ds.create_model("lenet5")
    p = ds.save(m, tmp_path / "m.safetensors")
    assert file_bytes(p) == p.stat().st_size
    # the fp32 baseline helper writes the same layout (weights + small header)
    n_floats = sum(t.numel() for t in m.state_dict().values())
    b = fp32_safetensors_bytes(m)
    assert 4 * n_floats < b < 4 * n_floats + 4096
    rep = measure_model(m, torch.rand(1, 1, 28, 28), file=p, latency_batches=())
    assert rep.bytes == p.stat().st_size and rep.macs == 2_293_000


def test_latency_fields_and_compare():
    m = ds.create_model("mlp", in_size=8)
    lat = measure_latency(m, torch.rand(4, 1, 8, 8), warmup=2, repeats=5, min_time_s=0.0)
    assert lat.batch == 4 and lat.repeats >= 5 and lat.threads == torch.get_num_threads()
    assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms
    res = compare_latency({"a": m, "b": m}, torch.rand(1, 1, 8, 8), rounds=1, repeats=3, min_time_s=0.0)
    assert set(res) == {"a", "b"}


def test_report_renders_table_and_json():
    import json

    m = ds.create_model("lenet300", in_size=8)
    rep = measure_model(m, torch.rand(1, 1, 8, 8), name="x", latency_batches=(1,),
                        latency_kw={"repeats": 3, "min_time_s": 0.0})
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["params"] == rep.params and "1" in d["latency"] and len(d["layers"]) == 3
    t = rep.layer_table()
    assert [r["layer"] for r in t.rows] == ["2", "4", "6"]
    assert json.loads(t.to_json())["rows"][0]["params"] == 64 * 300


def test_modules_can_report_macs_the_counter_cannot_see():
    class Sparse(nn.Module):
        def forward(self, x):
            return x[:, :3] * 2  # elementwise: invisible to the FLOP counter

        def count_macs(self, output):
            return 7 * output.shape[0]

    total, per = count_macs(nn.Sequential(nn.Linear(5, 4), Sparse()), torch.rand(2, 5))
    assert per["1"] == 14 and total == 2 * 5 * 4 + 14


def test_measure_model_takes_tuple_and_dict_inputs() -> None:
    """A model called with keyword tensors (tokenizer output) or positional tensors is measured
    like one called with a single tensor: same MACs, one latency entry per batch size."""
    from deepshrink.measure import measure_model

    class Kw(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids) * attention_mask[..., None]
            return {"last_hidden_state": self.fc(h)}

    m = Kw()
    ids = torch.randint(0, 50, (3, 7))
    d = measure_model(m, {"input_ids": ids, "attention_mask": torch.ones(3, 7)}, latency_batches=(2,),
                      latency_kw={"repeats": 2, "warmup": 0, "min_time_s": 0})
    t = measure_model(m, (ids, torch.ones(3, 7)), latency_batches=(2,),
                      latency_kw={"repeats": 2, "warmup": 0, "min_time_s": 0})
    assert d.macs == t.macs == 7 * 16 * 4  # one row: 7 tokens through the 16->4 projection
    assert d.latency[2].batch == t.latency[2].batch == 2


def test_speedup_carries_its_spread_and_flags_overlap() -> None:
    from deepshrink.measure import Latency, speedup

    def lat(p10: float, med: float, p90: float) -> Latency:
        return Latency(batch=1, median_ms=med, p10_ms=p10, p90_ms=p90, mean_ms=med, stdev_ms=0.0,
                       repeats=10, threads=1)

    clear = speedup(lat(9, 10, 11), lat(4, 5, 6))
    assert clear.ratio == 2.0 and clear.low == 1.5 and clear.high == 11 / 4
    assert not clear.overlaps_one and "overlaps" not in str(clear)
    noisy = speedup(lat(5, 10, 20), lat(8, 9, 12))
    assert noisy.overlaps_one and "overlaps 1.0" in str(noisy)


def test_size_change_never_says_smaller_for_a_larger_file() -> None:
    from deepshrink.measure import size_change

    assert size_change(400, 100) == "4.00x smaller"
    assert size_change(100, 125) == "1.25x larger"
