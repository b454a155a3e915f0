"""Distillation through the shared loop on digits: frozen teachers, caching, hints, students."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from deepshrink.data import DataBundle, load_digits
from deepshrink.distill import (
    Distiller,
    HintAdapter,
    KDConfig,
    Teacher,
    cache_teacher_outputs,
    distill,
    transfer_loader,
)
from deepshrink.errors import ConfigError, ModelError
from deepshrink.models import create_model
from deepshrink.train import Callback, TrainConfig, TrainState, train


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core machine: a second OpenMP thread only adds barrier waits
    # (measured: 10x slower under load). Restored afterwards for other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return load_digits()


@pytest.fixture(scope="module")
def teacher(data: DataBundle) -> nn.Module:
    torch.manual_seed(0)
    t = create_model("lenet300", in_size=8)
    train(t, transfer_loader(data.train, 64), TrainConfig(epochs=8, batch_size=64, lr=2e-3, progress=False))
    return t


def _student(seed: int = 1, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", in_size=8, hidden=hidden)


def _agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x).argmax(1) == b.eval()(x).argmax(1)).float().mean())


def _quick(epochs: int = 1, **kw: object) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, progress=False, **kw)


def test_gradient_does_not_reach_teacher(data: DataBundle, teacher: nn.Module) -> None:
    teacher.zero_grad(set_to_none=True)  # the fixture's own training left gradients behind
    before = copy.deepcopy(teacher.state_dict())
    teacher.train()  # the teacher must run in eval mode anyway, and be left as it was found
    student = _student()
    s_before = [p.detach().clone() for p in student.parameters()]
    distill(student, KDConfig(cache=False), teacher=teacher, data=data,
            train_config=_quick(max_steps=3))
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # not frozen in place
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert teacher.training
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters(), strict=True))
    teacher.eval()


def test_teacher_runs_in_eval_mode() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.9))
    net.train()
    x = torch.rand(32, 1, 8, 8)
    a, b = Teacher(net)(x), Teacher(net)(x)  # dropout active would make these differ
    assert torch.equal(a, b) and not a.requires_grad and net.training


def test_cached_logits_equal_live_ones(data: DataBundle, teacher: nn.Module) -> None:
    other = _student(seed=5, hidden=20)
    ens = Teacher([teacher, other])
    cached = cache_teacher_outputs(ens, data.val, batch_size=37)  # odd batch size: concat order
    x, y, logits = cached.tensors
    assert torch.equal(x, data.val.tensors[0]) and torch.equal(y, data.val.tensors[1])
    assert logits.shape == (len(y), 2, 10)
    live = ens(x)
    torch.testing.assert_close(logits, live, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, 0], teacher(x), rtol=0, atol=1e-5)


def test_distill_improves_agreement_with_teacher(data: DataBundle, teacher: nn.Module) -> None:
    x = data.test.tensors[0]
    student = _student()
    before = _agreement(student, teacher, x)
    res = distill(student, KDConfig(temperature=4.0, alpha=0.9), teacher=teacher, data=data,
                  train_config=_quick(epochs=15))
    assert res.model is student and len(res.train.history) == 15  # one row per epoch
    after = _agreement(student, teacher, x)
    assert before < 0.3 and after > 0.85, (before, after)


def test_ensemble_teacher_with_weights(data: DataBundle, teacher: nn.Module) -> None:
    weak = _student(seed=7, hidden=8)
    student = _student()
    cfg = KDConfig(combine="probs", weights=(1.0, 0.0))  # the zero-weighted random model is ignored
    distill(student, cfg, teacher=[teacher, weak], data=data, train_config=_quick(epochs=15))
    assert _agreement(student, teacher, data.test.tensors[0]) > 0.85
    with pytest.raises(ConfigError, match=r"KDConfig\.weights"):
        Distiller(student, [teacher, weak], KDConfig(weights=(1.0, 1.0, 1.0)))


def test_masked_student_keeps_its_mask(data: DataBundle, teacher: nn.Module) -> None:
    # A compressed student: half the first layer's weights masked (torch's pruning reparam).
    student = _student(hidden=32)
    prune.l1_unstructured(student[2], "weight", amount=0.5)
    mask = student[2].weight_mask.clone()
    distill(student, KDConfig(), teacher=teacher, data=data, train_config=_quick(epochs=15))
    assert int(mask.sum()) == mask.numel() // 2 and bool((student[2].weight[mask == 0] == 0).all())
    assert _agreement(student, teacher, data.test.tensors[0]) > 0.8


def test_cache_refuses_augmentation(data: DataBundle, teacher: nn.Module) -> None:
    with pytest.raises(ConfigError, match=r"TrainConfig\.augment"):
        distill(_student(), KDConfig(cache=True), teacher=teacher, data=data,
                train_config=_quick(augment="shift"))
    # live teacher: each augmented batch gets its own soft targets
    distill(_student(), KDConfig(cache=False), teacher=teacher, data=data,
            train_config=_quick(augment="shift", max_steps=2))


def test_hint_loss_decreases_and_adapter_learns(data: DataBundle, teacher: nn.Module) -> None:
    student = _student(hidden=16)
    # student "3" = hidden ReLU (16 features); teacher "5" = second hidden ReLU (100 features)
    dist = Distiller(student, teacher, KDConfig(alpha=0.5, hints={"3": "5"}, cache=False))
    hints = dist.hints
    assert hints is not None
    seen: list[tuple[float, bool]] = []

    class Probe(Callback):  # runs after the Distiller: sees the hint term and the adapter's grads
        def after_backward(self, state: TrainState) -> None:
            assert hints.adapters is not None
            seen.append((dist.last_parts["hint"], hints.adapters[0].map.weight.grad is not None))

    dist.fit(student, data, _quick(epochs=8), callbacks=[Probe()])
    assert len(seen) > 50 and all(g for _, g in seen)
    first = sum(h for h, _ in seen[:5]) / 5
    last = sum(h for h, _ in seen[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert isinstance(hints.adapters[0].map, nn.Linear) and hints.adapters[0].map.weight.shape == (100, 16)
    # the hooks are gone after training: a forward no longer records features
    student(data.val.tensors[0][:4])
    teacher(data.val.tensors[0][:4])
    assert not hints.student_tap.features and not hints.teacher_tap.features


def test_hints_with_cached_features(data: DataBundle, teacher: nn.Module) -> None:
    student = _student()
    distill(student, KDConfig(hints={"3": "5"}, cache=True), teacher=teacher, data=data,
            train_config=_quick(max_steps=3))
    cached = cache_teacher_outputs(teacher, data.val)  # logits only, no features
    with pytest.raises(ModelError, match="hint"):
        distill(student, KDConfig(hints={"3": "5"}), teacher=teacher, data=cached,
                train_config=_quick(max_steps=1))


def test_unknown_hint_module_is_named(teacher: nn.Module) -> None:
    with pytest.raises(ModelError, match="'nope'"):
        Distiller(_student(), teacher, KDConfig(hints={"nope": "5"}))


@pytest.mark.parametrize(("s_shape", "t_shape", "conv"), [
    ((4, 8, 8), (6, 4, 4), True), ((4, 8, 8), (6, 8, 8), True),
    ((16,), (6, 4, 4), False), ((4, 2, 2), (10,), False),
])
def test_hint_adapter_shapes(s_shape: tuple, t_shape: tuple, conv: bool) -> None:
    adapter = HintAdapter(s_shape, t_shape)
    out = adapter(torch.rand(3, *s_shape))
    assert out.shape == (3, *t_shape) and adapter.conv == conv
    out.sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())
