import struct

import pytest
import torch
from torch import nn

import deepshrink as ds
from deepshrink.errors import DeepShrinkError, FormatError, ModelError
from deepshrink.fileio import atomic_path


@pytest.mark.parametrize("name,size", [("mlp", 8), ("lenet300", 28), ("lenet5", 28),
                                       ("resnet_small", 8), ("vgg_small", 8)])
def test_save_load_rebuilds_identical_model(tmp_path, name, size):
    torch.manual_seed(0)
    m = ds.create_model(name, in_size=size).eval()
    p = ds.save(m, tmp_path / "m.safetensors", extra={"note": "hi"})
    m2 = ds.load(p)
    x = torch.rand(2, 1, size, size)
    assert torch.equal(m(x), m2(x))
    meta = ds.read_metadata(p)
    assert meta["spec"]["name"] == name and meta["extra"] == {"note": "hi"}


def test_hf_model_round_trip_with_tied_weights(tmp_path):
    pytest.importorskip("transformers")
    cfg = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 50,
           "n_positions": 16}
    m = ds.create_model("hf", arch="GPT2LMHeadModel", config=cfg)
    p = ds.save(m, tmp_path / "g.safetensors")
    m2 = ds.load(p)
    ids = torch.randint(0, 50, (1, 5))
    assert torch.equal(m(ids).logits, m2(ids).logits)


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        ds.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a model")
    with pytest.raises(FormatError, match="unknown model file format"):
        ds.load(tmp_path / "junk.bin")
    good = ds.save(ds.create_model("mlp", in_size=8), tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[:200])
    with pytest.raises(FormatError, match="runs past the file end"):
        ds.load(tmp_path / "cut.safetensors")
    (n,) = struct.unpack("<Q", good[:8])
    (tmp_path / "short.safetensors").write_bytes(good[: 8 + n + 10])
    with pytest.raises(DeepShrinkError):
        ds.load(tmp_path / "short.safetensors")


def test_weights_without_spec_need_a_model(tmp_path):
    m = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ModelError, match="no architecture spec"):  # said at save time ...
        ds.save(m, tmp_path / "plain.safetensors")
    p = ds.save(m, tmp_path / "plain.safetensors", weights_only=True)  # ... unless asked for
    with pytest.raises(ModelError, match="no architecture spec"):
        ds.load(p)
    m2 = ds.load(p, model=nn.Sequential(nn.Linear(3, 2)))
    assert torch.equal(m2[0].weight, m[0].weight)
    with pytest.raises(ModelError, match="do not match"):
        ds.load(p, model=nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))


def test_atomic_write_keeps_old_file_on_failure_and_protects_inputs(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
    with pytest.raises(DeepShrinkError, match="refusing to overwrite the input"), \
            atomic_path(target, protect=(target,)):
        pass


def test_atomic_output_gets_normal_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "o.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "o.bin").stat().st_mode & 0o777 == 0o644


def test_load_refuses_to_import_code_named_by_a_file(tmp_path):
    import json

    from safetensors.torch import save_file

    m = nn.Sequential(nn.Linear(3, 2))
    meta = {"format": "deepshrink-checkpoint", "version": 1, "extra": {},
            "spec": {"name": "some_untrusted_module_xyz:build", "kwargs": {}, "edits": []}}
    p = tmp_path / "evil.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p),
              metadata={"deepshrink": json.dumps(meta)})
    with pytest.raises(FormatError, match="not a registered model"):
        ds.load(p)
    # even a module the program imported itself needs the caller's explicit trust
    m2 = ds.create_model("deepshrink.models.reference:mlp", in_size=4)
    p2 = ds.save(m2, tmp_path / "ok.safetensors")
    with pytest.raises(FormatError, match="trust="):
        ds.load(p2)
    assert ds.load(p2, trust=["deepshrink.models"])(torch.rand(1, 1, 4, 4)).shape == (1, 10)
