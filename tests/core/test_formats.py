"""Formats in: transformers save_pretrained folders, torch.save state_dicts and ONNX files load
with deepshrink.load, safely; out: save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deepshrink
from deepshrink.errors import FormatError, ModelError

transformers = pytest.importorskip("transformers")


def tiny_bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_pretrained_folder_loads_and_saves_rebuildably(tmp_path: Path) -> None:
    model = tiny_bert()
    model.save_pretrained(tmp_path / "bert")
    ids = {"input_ids": torch.randint(0, 64, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    loaded = deepshrink.load(tmp_path / "bert")
    assert torch.equal(loaded(**ids).logits, model(**ids).logits)
    deepshrink.save(loaded, tmp_path / "bert.safetensors")
    again = deepshrink.load(tmp_path / "bert.safetensors")
    assert torch.equal(again(**ids).logits, model(**ids).logits)
    from deepshrink.models.hf import save_pretrained_dir

    save_pretrained_dir(again, tmp_path / "out")
    assert torch.equal(deepshrink.load(tmp_path / "out")(**ids).logits, model(**ids).logits)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(auto_map={"AutoModel": "evil.Model"}), "remote code"),
    (lambda c: c.update(architectures=["os"]), "no model class 'os'"),
    (lambda c: c.pop("architectures"), "architectures"),
])
def test_hostile_pretrained_folders_are_refused(tmp_path: Path, mutate, message: str) -> None:
    tiny_bert().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    mutate(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=message):
        deepshrink.load(tmp_path)


def test_pickled_bin_weights_are_not_read(tmp_path: Path) -> None:
    tiny_bert().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FormatError, match="pickled"):
        deepshrink.load(tmp_path)


def test_state_dict_file_needs_a_model_and_loads_into_it(tmp_path: Path) -> None:
    src = deepshrink.create_model("lenet300", in_size=8)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match="state_dict file.*--arch"):
        deepshrink.load(tmp_path / "w.pt")
    dst = deepshrink.load(tmp_path / "w.pt", model=deepshrink.create_model("lenet300", in_size=8))
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(dst(x), src(x))
    with pytest.raises(ModelError, match="do not match"):
        deepshrink.load(tmp_path / "w.pt", model=deepshrink.create_model("lenet300", in_size=28))


class Evil:
    def __reduce__(self):  # a pickle that would run code when loaded without weights_only
        return (print, ("PWNED",))


def test_state_dict_with_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="weights-only"):
        deepshrink.load(tmp_path / "evil.pt", model=torch.nn.Linear(1, 1))
    assert "PWNED" not in capsys.readouterr().out


def test_onnx_file_loads_as_a_runnable_module(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = deepshrink.create_model("lenet300", in_size=8).eval()
    x = torch.rand(4, 1, 8, 8)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), input_names=["x"], dynamo=False,
                      dynamic_axes={"x": {0: "n"}})
    loaded = deepshrink.load(tmp_path / "m.onnx")
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    n = sum(p.numel() for p in model.parameters())
    assert n <= loaded.onnx_params < n + 16  # the weights plus a few graph constants (shapes)
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(FormatError):
        deepshrink.load(tmp_path / "bad.onnx")
