"""The .dsz file: bit-exact pack/unpack, identical reloaded models, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deepshrink
from deepshrink.dsz import PackConfig, dsz_info, load_dsz, pack, read_dsz, unpack
from deepshrink.errors import FormatError, ModelError
from deepshrink.models import create_model
from deepshrink.sharing import KMeansConfig, get_sharing, share


def _pruned_shared(name: str = "lenet300", in_size: int = 8, bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    m = create_model(name, in_size=in_size)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p[p.abs() < p.abs().quantile(0.85)] = 0
    return share(m, KMeansConfig(bits=bits, conv_bits=bits + 2))


@pytest.mark.parametrize("cfg", [PackConfig(), PackConfig(entropy="fixed"), PackConfig(index="csr"),
                                 PackConfig(index="dense"), PackConfig(index="relative", rel_bits=2,
                                                                       order="F")])
def test_pack_unpack_bit_exact(tmp_path: Path, cfg: PackConfig) -> None:
    m = _pruned_shared()
    path = tmp_path / "m.dsz"
    rep = pack(m, path, cfg)
    assert rep.bytes == path.stat().st_size
    contents = read_dsz(path)
    for name, t in m.state_dict().items():
        assert torch.equal(contents.tensors[name], t), name  # bit-exact to the shared weights
    for name, st in get_sharing(m).items():
        assert torch.equal(contents.sharing[name].index, st.index)
        assert torch.equal(contents.sharing[name].codebook, st.codebook)
    unpack(path, tmp_path / "m.safetensors")
    flat = load_file(str(tmp_path / "m.safetensors"))
    for name, t in m.state_dict().items():
        assert torch.equal(flat[name], t), name


@pytest.mark.parametrize("name,in_size", [("lenet300", 8), ("lenet5", 16), ("resnet_small", 8)])
def test_loaded_model_gives_identical_outputs(tmp_path: Path, name: str, in_size: int) -> None:
    m = _pruned_shared(name, in_size).eval()
    path = tmp_path / "m.dsz"
    pack(m, path)
    loaded = deepshrink.load(path)  # through the registered loader
    x = torch.rand(5, 1, in_size, in_size)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    assert set(get_sharing(loaded)) == set(get_sharing(m))
    # a loaded model packs to the same bytes again
    pack(loaded, tmp_path / "again.dsz")
    assert (tmp_path / "again.dsz").read_bytes() == path.read_bytes()


def test_unshared_tensors_dtypes_and_ties(tmp_path: Path) -> None:
    m = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50, bias=False))
    m[1].weight = m[0].weight  # tied
    m.register_buffer("steps", torch.tensor([3, -7], dtype=torch.int64))
    m.register_buffer("h16", torch.randn(4, 4).half())
    m.register_buffer("bf16", torch.where(torch.rand(6, 5) < 0.7, 0.0, torch.randn(6, 5)).bfloat16())
    m.register_buffer("flags", torch.tensor([True, False, True]))
    with torch.no_grad():
        m[0].weight[::2] = 0
    path = tmp_path / "t.dsz"
    pack(m, path)
    got = read_dsz(path).tensors
    for name, t in m.state_dict().items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    info = dsz_info(path)
    assert [t["index"] for t in info["tensors"]].count("alias") == 1
    assert sum(s["length"] for s in info["sections"]) + info["manifest_bytes"] + 36 == info["bytes"]


def test_compression_beats_fp32_and_tracks_entropy(tmp_path: Path) -> None:
    m = _pruned_shared(bits=5)
    huff = pack(m, tmp_path / "h.dsz")
    fixed = pack(m, tmp_path / "f.dsz", PackConfig(entropy="fixed"))
    fp32 = sum(t.numel() * 4 for t in m.state_dict().values())
    assert huff.bytes < fixed.bytes < fp32 / 8
    ent = huff.entropy_summary()
    assert 1.0 <= ent["payload_over_entropy"] < 1.03


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _pruned_shared()
    path = tmp_path / "m.dsz"
    pack(m, path)
    before = path.read_bytes()

    def broken_write(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])  # half written, then the disk "fails"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", broken_write)
    with pytest.raises(OSError):
        pack(m, path)
    with pytest.raises(OSError):
        pack(m, tmp_path / "new.dsz")
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is untouched
    assert not (tmp_path / "new.dsz").exists()
    assert sorted(os.listdir(tmp_path)) == ["m.dsz"]  # no temporary left behind


def test_refuses_to_import_modules_named_by_a_file(tmp_path: Path) -> None:
    m = _pruned_shared()
    object.__setattr__(m, "deepshrink_spec", deepshrink.models.ModelSpec("not_imported_mod_x:build", {}))
    pack(m, tmp_path / "evil.dsz")
    with pytest.raises(FormatError, match="not a registered model"):
        load_dsz(tmp_path / "evil.dsz")


def test_wrong_architecture_and_garbage(tmp_path: Path) -> None:
    pack(_pruned_shared(), tmp_path / "m.dsz")
    with pytest.raises(ModelError, match="do not match"):
        load_dsz(tmp_path / "m.dsz", model=create_model("lenet300", in_size=28))
    (tmp_path / "g.dsz").write_bytes(b"\x89DSZ\r\n\x1a\n" + b"\0" * 10)
    with pytest.raises(FormatError, match="truncated"):
        deepshrink.load(tmp_path / "g.dsz")


def test_structural_edits_travel_with_the_file(tmp_path: Path) -> None:
    from deepshrink.pruning import ChannelConfig, prune

    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    prune(m, ChannelConfig(ratio=0.5), example_inputs=torch.rand(2, 1, 8, 8))
    assert deepshrink.models.get_spec(m).edits  # the smaller architecture is an edit
    share(m, KMeansConfig(bits=4))
    pack(m, tmp_path / "c.dsz")
    loaded = deepshrink.load(tmp_path / "c.dsz")
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), m.eval()(x))
    assert dsz_info(tmp_path / "c.dsz")["spec"]["edits"] == deepshrink.models.get_spec(m).edits
