import pytest
import torch

import deepshrink as ds
from deepshrink.data import load_digits
from deepshrink.train import Callback, TrainConfig, evaluate, train


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _run(digits, seed):
    torch.manual_seed(seed)
    m = ds.create_model("mlp", in_size=8, hidden=32)
    res = train(m, digits, TrainConfig(epochs=2, batch_size=64, seed=seed, progress=False,
                                       augment="shift"))
    return m, res


def test_seeded_training_is_reproducible(digits):
    a, ra = _run(digits, 3)
    b, rb = _run(digits, 3)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert ra.history == rb.history
    c, _ = _run(digits, 4)
    assert not torch.equal(a[2].weight, c[2].weight)


def test_training_reaches_accuracy_floor_on_held_out_digits(digits):
    torch.manual_seed(0)
    m = ds.create_model("lenet300", in_size=8)
    res = train(m, digits, TrainConfig(epochs=15, batch_size=64, lr=2e-3, progress=False, keep_best=True))
    test = evaluate(m, digits.loader("test", 256))
    assert test["n"] == len(digits.test)
    assert test["top1"] >= 0.93
    assert test["top5"] >= test["top1"]
    assert res.best_val_top1 is not None and len(res.history) == 15


def test_splits_are_disjoint(digits):
    def rows(ds_):
        return {bytes(r.numpy().tobytes()) for r in ds_.tensors[0]}

    tr, va, te = rows(digits.train), rows(digits.val), rows(digits.test)
    # the digits set has a few duplicate images; disjointness holds up to those
    assert len(tr & te) <= 3 and len(tr & va) <= 3


def test_callbacks_hooks_in_order_and_loss_fn(digits):
    calls = []

    class Rec(Callback):
        def on_train_begin(self, s): calls.append("begin")
        def on_loss(self, s, loss):
            calls.append("loss")
            return loss * 0.0 + loss  # a callback may rewrite the loss
        def after_backward(self, s):
            calls.append("bwd")
            assert all(p.grad is not None for p in s.model.parameters())
        def on_step_end(self, s): calls.append("step")
        def on_epoch_end(self, s, m): calls.append(("epoch", round(m["epoch"])))
        def on_train_end(self, s): calls.append("end")

    seen = {}

    def loss_fn(out, y, batch):
        seen["n"] = len(batch)
        return {"loss": torch.nn.functional.cross_entropy(out, y)}

    m = ds.create_model("mlp", in_size=8, hidden=8)
    res = train(m, digits, TrainConfig(epochs=1, max_steps=3, progress=False), callbacks=[Rec()],
                loss_fn=loss_fn)
    assert res.steps == 3 and seen["n"] == 2
    assert calls == ["begin"] + ["loss", "bwd", "step"] * 3 + [("epoch", 1), "end"]


def test_evaluate_accepts_any_callable(digits):
    m = ds.create_model("mlp", in_size=8)
    loader = digits.loader("test", 100)
    a = evaluate(m, loader)
    b = evaluate(lambda x: m(x).detach(), loader)
    assert a == b


def test_checkpoint_each_epoch_rebuilds_model(digits, tmp_path):
    path = tmp_path / "ck.safetensors"
    m = ds.create_model("mlp", in_size=8, hidden=16)
    train(m, digits, TrainConfig(epochs=2, progress=False, checkpoint=str(path)))
    meta = ds.read_metadata(path)
    assert meta["extra"]["epoch"] == 2 and meta["spec"]["name"] == "mlp"
    x = digits.test.tensors[0][:5]
    assert torch.equal(ds.load(path)(x), m(x))
