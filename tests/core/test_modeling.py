"""deepshrink.modeling: the one input/output normaliser every family calls through."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepshrink.errors import DataError, ModelError
from deepshrink.modeling import (
    as_inputs,
    batch_size,
    calibration_batches,
    call,
    eval_mode,
    forward,
    input_batches,
    output_tensor,
    select,
    set_submodule,
    split_batch,
)


class KwModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask=None):
        h = self.drop(self.emb(input_ids))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return {"last_hidden_state": h}


class TwoArg(nn.Module):
    def forward(self, a, b):
        return (a + b, a - b)


def test_call_dispatches_on_form():
    ids = torch.randint(0, 10, (3, 5))
    out = call(KwModel().eval(), {"input_ids": ids, "attention_mask": torch.ones(3, 5)})
    assert out["last_hidden_state"].shape == (3, 5, 4)
    a, b = torch.ones(2, 2), torch.full((2, 2), 2.0)
    assert torch.equal(call(TwoArg(), (a, b))[0], a + b)
    assert torch.equal(call(nn.Identity(), a), a)


def test_output_tensor_reads_logits_hidden_and_named():
    t = torch.randn(2, 3)
    assert output_tensor(t) is t
    assert output_tensor({"last_hidden_state": t}) is t
    assert output_tensor({"logits": t, "last_hidden_state": torch.zeros(1)}) is t
    assert output_tensor((t, torch.zeros(1))) is t
    assert output_tensor({"pooler_output": t}, "pooler_output") is t
    assert output_tensor((torch.zeros(1), t), "1") is t
    with pytest.raises(ModelError, match="no tensor named 'nope'"):
        output_tensor({"a": t}, "nope")
    with pytest.raises(ModelError, match="cannot find the output tensor"):
        output_tensor({"pooler_output": t})


def test_eval_mode_restores_each_flag_and_forward_is_deterministic():
    m = KwModel().train()
    m.emb.eval()  # partly frozen on purpose
    ids = torch.randint(0, 10, (4, 6))
    with eval_mode(m):
        assert not m.training and not m.drop.training
    assert m.training and m.drop.training and not m.emb.training
    a, b = forward(m, {"input_ids": ids}), forward(m, {"input_ids": ids})
    assert torch.equal(a, b)  # dropout was off
    assert not a.requires_grad


def test_as_inputs_rejects_wrong_types_with_a_named_error():
    with pytest.raises(DataError, match="example_inputs must be a tensor"):
        as_inputs(3)
    with pytest.raises(DataError, match="not tensors"):
        as_inputs({"input_ids": [1, 2, 3]})
    with pytest.raises(DataError, match="empty list"):
        as_inputs([])
    x = torch.zeros(2, 3)
    assert as_inputs([x, x]) is x  # a list is a list of batches: the first one


def test_split_batch_recognises_pairs():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert split_batch((x, y))[1] is y
    # two float tensors are positional inputs, not an (inputs, target) pair
    inp, tgt = split_batch((x, x))
    assert tgt is None and isinstance(inp, tuple)
    inp, tgt = split_batch({"input_ids": x, "labels": y})
    assert tgt is y and set(inp) == {"input_ids"}


def test_calibration_from_every_source_form():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    assert [b.shape[0] for b in calibration_batches(loader, 5)] == [4, 4, 2]
    assert len(calibration_batches(loader, 2)) == 2
    assert [t is not None for _, t in input_batches(loader, 5)] == [True] * 3
    assert [b.shape[0] for b in calibration_batches(x, 9, batch_size_hint=3)] == [3, 3, 3, 1]
    d = {"input_ids": torch.zeros(5, 2, dtype=torch.long), "attention_mask": torch.ones(5, 2)}
    parts = calibration_batches(d, 9, batch_size_hint=2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
    assert len(calibration_batches([d, d], 9)) == 2
    assert calibration_batches(iter([(x, y)]), 3)[0] is x
    assert calibration_batches(None, 3) == []
    with pytest.raises(DataError, match="yielded no batches"):
        calibration_batches([], 3)
    with pytest.raises(DataError, match="must be a DataLoader"):
        calibration_batches(3.0, 3)


def test_select_and_batch_size():
    d = {"a": torch.arange(6).reshape(3, 2), "b": None}
    assert batch_size(d) == 3
    assert select(d, torch.tensor([True, False, True]))["a"].shape == (2, 2)
    assert select((torch.arange(3),), slice(0, 1))[0].tolist() == [0]


def test_set_submodule_replaces_and_names_missing():
    m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    old = set_submodule(m, "1.0", nn.Tanh())
    assert isinstance(old, nn.ReLU) and isinstance(m[1][0], nn.Tanh)
    with pytest.raises(ModelError, match="no submodule 'x.y'"):
        set_submodule(m, "x.y", nn.Tanh())
