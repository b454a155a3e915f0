"""Compact sparse files: bytes fall with sparsity, deepshrink.load gives identical outputs."""

from __future__ import annotations

import pytest
import torch

import deepshrink
from deepshrink.measure import count_params, file_bytes
from deepshrink.models import create_model
from deepshrink.pruning import PackedLayer, UnstructuredConfig, prune, save_sparse, to_dense_layers
from deepshrink.pruning.sparse import decode_relative, encode_relative


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 0.9995, 1.0])
def test_relative_index_round_trip(sparsity: float) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 300, generator=gen)
    w[torch.rand(w.shape, generator=gen) < sparsity] = 0.0
    values, gaps = encode_relative(w)
    assert gaps.dtype == torch.uint8 and values.dtype == torch.float32
    assert torch.equal(decode_relative(values, gaps, w.shape), w)
    nnz = int(torch.count_nonzero(w))
    assert len(values) >= nnz and int(torch.count_nonzero(values)) == nnz


def test_long_gaps_use_fillers() -> None:
    w = torch.zeros(1, 1000)
    w[0, 0], w[0, 600], w[0, 999] = 1.0, 2.0, 3.0
    values, gaps = encode_relative(w)
    # 0 (gap 1), then 600: 255 + 255 + 90, then 999: 255 + 144
    assert gaps.tolist() == [1, 255, 255, 90, 255, 144]
    assert values.tolist() == [1.0, 0.0, 0.0, 2.0, 0.0, 3.0]
    assert torch.equal(decode_relative(values, gaps, w.shape), w)


def test_bytes_fall_with_sparsity_and_reload_identical(tmp_path) -> None:
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sizes = []
    for ratio in (0.5, 0.8, 0.95):
        torch.manual_seed(0)
        m = create_model("lenet300", in_size=8)
        prune(m, UnstructuredConfig(ratio=ratio))
        path = save_sparse(m, tmp_path / f"s{ratio}.safetensors")
        dense = deepshrink.save(m, tmp_path / f"d{ratio}.safetensors")
        sizes.append(file_bytes(path))
        assert file_bytes(path) < file_bytes(dense)
        back = deepshrink.load(path)
        assert isinstance(back[2], PackedLayer)
        assert torch.equal(back(x), m(x))
        assert count_params(back) == count_params(m)
        # the saved model is untouched, and the loaded one unpacks to ordinary layers
        assert isinstance(m[2], torch.nn.Linear)
        plain = to_dense_layers(back)
        assert isinstance(plain[2], torch.nn.Linear) and torch.equal(plain(x), m(x))
        assert all(e["kind"] != "packed_sparse" for e in plain.deepshrink_spec.edits)
    assert sizes[0] > sizes[1] > sizes[2]
    # ~5 bytes per kept weight: at 95% the weights shrink close to 20x vs 4 bytes dense
    assert sizes[2] < 0.15 * file_bytes(tmp_path / "d0.95.safetensors")


def test_conv_layers_pack_and_reload(tmp_path) -> None:
    torch.manual_seed(0)
    m = create_model("lenet5", in_size=16)
    prune(m, UnstructuredConfig(ratio=0.9))
    path = save_sparse(m, tmp_path / "c.safetensors")
    back = deepshrink.load(path)
    x = torch.rand(4, 1, 16, 16)
    assert isinstance(back[1], PackedLayer) and back[1].op == "conv2d"
    assert torch.equal(back(x), m(x))
    # a re-save of the loaded (packed) model loads again
    again = deepshrink.load(deepshrink.save(back, tmp_path / "again.safetensors"))
    assert torch.equal(again(x), m(x))


def test_dense_layers_stay_dense(tmp_path) -> None:
    m = create_model("lenet300", in_size=8)  # no zeros: packing would grow the file
    back = deepshrink.load(save_sparse(m, tmp_path / "d.safetensors"))
    assert not any(isinstance(mod, PackedLayer) for mod in back.modules())


def test_save_sparse_never_overwrites_input(tmp_path) -> None:
    m = create_model("mlp", in_size=8)
    src = deepshrink.save(m, tmp_path / "in.safetensors")
    with pytest.raises(deepshrink.DeepShrinkError, match="refusing to overwrite"):
        save_sparse(m, src, protect=(src,))


def test_packed_layer_follows_loaded_state(tmp_path) -> None:
    torch.manual_seed(0)
    a, b = create_model("lenet300", in_size=8), create_model("lenet300", in_size=8)
    for m in (a, b):
        prune(m, UnstructuredConfig(ratio=0.9))
    pa = deepshrink.load(save_sparse(a, tmp_path / "a.safetensors"))
    pb = deepshrink.load(save_sparse(b, tmp_path / "b.safetensors"))
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(pa(x), a(x))  # decoded weight now cached
    pa.load_state_dict(pb.state_dict())  # same entry counts: both at exactly 90 % per layer
    assert torch.equal(pa(x), b(x))  # the cache was dropped on load
    with torch.no_grad():
        pa[6].weight_values.mul_(2.0)
    pa[6].refresh()
    assert torch.equal(pa[6].derived(), 2 * b[6].weight.detach())
