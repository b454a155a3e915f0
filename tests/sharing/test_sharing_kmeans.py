"""k-means weight sharing and centroid fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepshrink.data import load_digits
from deepshrink.errors import ConfigError, DeepShrinkWarning, ModelError
from deepshrink.models import create_model
from deepshrink.sharing import (
    CentroidFineTune,
    KMeansConfig,
    centroid_grads,
    get_sharing,
    kmeans_1d,
    share,
)
from deepshrink.train import TrainConfig, train


@pytest.mark.parametrize("init", ["linear", "density"])
def test_kmeans_recovers_known_clusters(init: str) -> None:
    rng = np.random.default_rng(0)
    means = np.array([-1.0, 0.2, 0.5, 2.0])
    sizes = [1500, 1500, 1500, 1500]  # density init would split a dominant cluster (a local optimum)
    labels = np.repeat(np.arange(4), sizes)
    x = means[labels] + rng.normal(0, 0.02, len(labels))
    c, idx = kmeans_1d(x, 4, init=init, seed=1)
    np.testing.assert_allclose(c, means, atol=0.005)
    assert np.array_equal(idx, labels)  # every point in its own cluster


def test_kmeans_random_init_is_seeded_lloyd_fixed_point() -> None:
    # Forgy init may put two seeds in one cluster (a local optimum; Han found linear init best),
    # so only determinism and the fixed-point property are guaranteed.
    x = np.random.default_rng(0).normal(size=5000)
    c1, i1 = kmeans_1d(x, 8, init="random", seed=3)
    c2, i2 = kmeans_1d(x, 8, init="random", seed=3)
    assert np.array_equal(c1, c2) and np.array_equal(i1, i2)
    used = np.bincount(i1, minlength=8) > 0
    np.testing.assert_allclose(c1[used], (np.bincount(i1, x, 8) / np.bincount(i1, minlength=8))[used],
                               atol=1e-9)


def test_kmeans_fewer_distinct_values_than_clusters() -> None:
    c, idx = kmeans_1d(np.array([0.5, -1.0, 0.5, 3.0]), 8)
    assert c.tolist() == [-1.0, 0.5, 3.0] and idx.tolist() == [1, 0, 1, 2]


def test_kmeans_is_fast_on_a_million_weights() -> None:
    import time

    x = np.random.default_rng(0).normal(size=1_000_000)
    t0 = time.perf_counter()
    c, idx = kmeans_1d(x, 32)
    assert time.perf_counter() - t0 < 5.0
    assert len(c) == 32 and idx.max() == 31
    # Lloyd's fixed point: every centroid is the mean of its members
    np.testing.assert_allclose(c, np.bincount(idx, x, 32) / np.bincount(idx, minlength=32), atol=1e-6)


def _pruned_lenet() -> nn.Module:
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p[p.abs() < p.abs().quantile(0.8)] = 0
    return m


def test_share_keeps_zeros_and_uses_the_codebook() -> None:
    m = _pruned_lenet()
    zeros = {n: (p == 0).clone() for n, p in m.named_parameters()}
    share(m, KMeansConfig(bits=3, bias_bits=2, overrides={"6": 4}))
    sharing = get_sharing(m)
    assert set(sharing) == {"2.weight", "2.bias", "4.weight", "4.bias", "6.weight"}  # 6.bias < min_size
    for name, p in m.named_parameters():
        if name not in sharing:
            continue
        st = sharing[name]
        assert torch.equal(st.index == -1, zeros[name]), name
        assert torch.count_nonzero(p[zeros[name]]) == 0
        assert torch.equal(p, st.weight())
        k = {"6.weight": 16, "2.bias": 4, "4.bias": 4}.get(name, 8)
        assert len(st.codebook) == k and len(torch.unique(p[~zeros[name]])) <= k


def test_share_conv_bits_and_config_round_trip() -> None:
    cfg = KMeansConfig(bits=4, conv_bits=6, init="density", ignore=("1",), overrides={"6": 4})
    assert KMeansConfig.from_json(cfg.to_json()) == cfg
    m = create_model("lenet5", in_size=16)
    share(m, cfg)
    s = get_sharing(m)
    assert "1.weight" not in s and len(s["3.weight"].codebook) == 64 and len(s["6.weight"].codebook) == 16
    with pytest.raises(ConfigError, match="init"):
        KMeansConfig(init="kmeans++")
    with pytest.raises(ModelError):
        share(create_model("lenet300", in_size=8), KMeansConfig(ignore=(".*",)))


def test_share_speaks_the_module_name_vocabulary() -> None:
    """``ignore``/``overrides`` name modules by regex (full match), as every other config does."""
    m = create_model("lenet300", in_size=8)
    share(m, KMeansConfig(bits=3, overrides={"[46]": 2}, ignore=("2",)))
    s = get_sharing(m)
    assert "2.weight" not in s and "2.bias" not in s  # ignored module: weight and bias stay float
    assert len(s["4.weight"].codebook) == 4 and len(s["4.bias"].codebook) == 32
    with pytest.warns(DeepShrinkWarning, match="nope"):
        share(create_model("lenet300", in_size=8), KMeansConfig(overrides={"nope": 2}))
    with pytest.raises(ConfigError, match="ignore"):
        KMeansConfig(ignore=("(",))


def test_centroid_gradient_is_the_per_cluster_sum() -> None:
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, 0.0, -0.5], [0.12, -0.48, 0.9]]))
    model = nn.Sequential(lin)
    share(model, KMeansConfig(bits=2, min_size=1))
    st = get_sharing(model)["0.weight"]
    assert st.index[0, 1] == -1  # the pruned weight
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    model(x).pow(2).sum().backward()
    g = lin.weight.grad
    hand = torch.zeros(len(st.codebook))
    for i in range(2):
        for j in range(3):
            if st.index[i, j] >= 0:
                hand[st.index[i, j]] += g[i, j]
    torch.testing.assert_close(centroid_grads(model)["0.weight"], hand)
    # closed form for cluster of w[0,2] = -0.5 and w[1,1] = -0.48 (same cluster with 2 bits)
    assert st.index[0, 2] == st.index[1, 1]


def test_centroid_finetune_trains_codebooks_and_keeps_zeros() -> None:
    m = _pruned_lenet()
    data = load_digits()
    share(m, KMeansConfig(bits=3))
    zeros = {n: (p == 0).clone() for n, p in m.named_parameters() if n in get_sharing(m)}
    books = {n: st.codebook.clone() for n, st in get_sharing(m).items()}
    cb = CentroidFineTune()
    train(m, data, TrainConfig(epochs=1, max_steps=15, lr=1e-2, weight_decay=1e-3, progress=False),
          callbacks=[cb])
    assert set(cb.last_grads) == set(books)
    for name, p in m.named_parameters():
        if name not in books:
            continue
        st = get_sharing(m)[name]
        assert torch.count_nonzero(p[zeros[name]]) == 0, name  # pruned weights stay zero
        assert torch.equal(p, st.weight()), name  # weights are exactly codebook[index]
        assert not torch.equal(st.codebook, books[name]), name  # the centroids moved


def test_round_codebooks_matches_a_float16_file(tmp_path) -> None:
    from deepshrink.dsz import PackConfig, pack, read_dsz
    from deepshrink.sharing import round_codebooks

    m = share(_pruned_lenet(), KMeansConfig(bits=4))
    round_codebooks(m, torch.float16)
    pack(m, tmp_path / "h.dsz", PackConfig(codebook_dtype="float16"))
    got = read_dsz(tmp_path / "h.dsz").tensors
    for name, t in m.state_dict().items():
        assert torch.equal(got[name], t), name
    assert all(torch.equal(st.codebook, st.codebook.half().float()) for st in get_sharing(m).values())
