"""Channel pruning on traced models: removing a channel must be exactly zeroing it.

Reference: a copy of the ORIGINAL model in which the removed channels' producers are forced to zero
(their conv filters / Linear rows and biases, and the BatchNorm weight and bias they pass through),
run in eval mode. The pruned model must match it to 1e-5 absolute (float32 sums reordered by
the smaller shapes; observed differences are ~1e-7).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.errors import ModelError
from deepshrink.models import create_model
from deepshrink.pruning.graph import build_groups
from deepshrink.pruning.structured import ChannelConfig, prune_channels

ATOL = 1e-5


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrongly sliced running_mean shows up."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def zeroed_reference(original: nn.Module, slices: dict[str, dict[str, list[int]]]) -> nn.Module:
    """The original with every removed channel's producer output forced to zero."""
    ref = copy.deepcopy(original)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, roles in slices.items():
            m = modules[name]
            for role, keep in roles.items():
                if role == "in":
                    continue  # consumers are untouched: they must see the zeros
                if isinstance(m, nn.Embedding):  # output channels are the embedding columns
                    m.weight[:, sorted(set(range(m.embedding_dim)) - set(keep))] = 0
                    continue
                drop = sorted(set(range(m.weight.shape[0])) - set(keep))
                m.weight[drop] = 0
                if m.bias is not None:
                    m.bias[drop] = 0
    return ref


class CatNet(nn.Module):
    """Two branches concatenated on the channel axis, then BatchNorm over the joint channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = F.relu(self.c(F.relu(self.bn(y))))
        return self.fc(y.mean((2, 3)))


class DepthwiseNet(nn.Module):
    """conv -> BN -> depthwise conv -> BN -> pointwise conv: one group through the depthwise conv;
    plus a grouped (groups=2) conv that must be left whole and reported."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=2)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.grouped(F.relu(self.pw(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SeqNet(nn.Module):
    """Embedding -> transpose -> Conv1d -> BatchNorm1d -> mean over time -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv1d(12, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens).transpose(1, 2)
        return self.fc(F.relu(self.bn(self.conv(x))).mean(2))


CASES = [
    ("resnet_small", lambda: create_model("resnet_small", in_size=16), (4, 1, 16, 16)),
    ("lenet5", lambda: create_model("lenet5", in_size=16), (4, 1, 16, 16)),
    ("vgg_small", lambda: create_model("vgg_small", in_size=16, width=8, hidden=32), (4, 1, 16, 16)),
    ("lenet300", lambda: create_model("lenet300", in_size=8), (4, 1, 8, 8)),
    ("concat", CatNet, (4, 1, 8, 8)),
    ("depthwise", DepthwiseNet, (4, 1, 8, 8)),
    ("embedding-conv1d", SeqNet, (4, 10)),
]


def make_input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 20, shape) if len(shape) == 2 else torch.rand(*shape)


@pytest.mark.parametrize("importance", ["l1", "activation"])
@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=[c[0] for c in CASES])
def test_pruned_equals_original_with_removed_channels_zeroed(name, make, shape, importance):
    torch.manual_seed(0)
    original = randomize_bn(make())
    x = make_input(shape)
    pruned = prune_channels(copy.deepcopy(original), ChannelConfig(ratio=0.5, importance=importance), x)
    slices = _last_slices(pruned)
    ref = zeroed_reference(original, slices)
    with torch.no_grad():
        out, want, full = pruned(x), ref(x), original(x)
    assert out.shape == full.shape
    assert torch.allclose(out, want, atol=ATOL), (out - want).abs().max()
    # The check has teeth: zeroing half of the channels changes the output.
    assert not torch.allclose(full, want, atol=1e-3)
    assert sum(p.numel() for p in pruned.parameters()) < 0.9 * sum(p.numel() for p in original.parameters())


def _last_slices(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    from deepshrink.pruning.structured import last_edit

    return last_edit(model)["slices"]


def test_output_layer_is_never_pruned_and_blocked_groups_are_reported():
    model = create_model("lenet300", in_size=8)
    x = torch.rand(2, 1, 8, 8)
    prune_channels(model, ChannelConfig(ratio=0.9), x)
    assert model[6].out_features == 10
    assert model(x).shape == (2, 10)
    skipped = model.deepshrink_channel_report["skipped"]
    assert [s["group"] for s in skipped] == ["6"]
    assert "model output" in skipped[0]["reason"]


def test_parameter_counts_fall_as_expected_for_lenet300():
    model = create_model("lenet300", in_size=8)
    prune_channels(model, ChannelConfig(ratio=0.5), torch.rand(2, 1, 8, 8))
    # 64 -> 150 -> 50 -> 10 (300 and 100 hidden neurons halved, input and output kept).
    assert [model[i].weight.shape for i in (2, 4, 6)] == [(150, 64), (50, 150), (10, 50)]
    assert sum(p.numel() for p in model.parameters()) == 64 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10


def test_flatten_to_linear_maps_channel_blocks():
    model = create_model("lenet5", in_size=16)
    x = torch.rand(2, 1, 16, 16)
    prune_channels(model, ChannelConfig(ratio=0.5), x)
    # conv2 keeps 25 of 50 channels; each is a 1x1 spatial block after the two pools at 16x16.
    assert model[3].out_channels == 25 and model[6].in_features == 25 * 1 * 1
    vgg = create_model("vgg_small", in_size=16, width=8, hidden=32)
    prune_channels(vgg, ChannelConfig(ratio=0.5), x)
    assert vgg[16].in_features == 8 * 4 * 4  # 16 channels -> 8, each a 4x4 block


def test_residual_group_is_pruned_together():
    model = create_model("resnet_small", in_size=16)
    prune_channels(model, ChannelConfig(ratio=0.5), torch.rand(2, 1, 16, 16))
    b = model.layers
    # The stem output, block 0's output and block 1's shortcut input are one residual group.
    assert model.stem[0].out_channels == b[0].conv2.out_channels == b[0].bn2.num_features == 8
    assert b[1].shortcut[0].in_channels == b[1].conv1.in_channels == 8
    assert b[2].bn2.num_features == b[2].shortcut[1].num_features == model.fc.in_features == 32


def test_grouped_conv_is_left_whole_and_reported():
    model = DepthwiseNet()
    prune_channels(model, ChannelConfig(ratio=0.5), torch.rand(2, 1, 8, 8))
    assert model.grouped.in_channels == 12 and model.pw.out_channels == 12
    assert model.dw.groups == model.dw.in_channels == model.dw.out_channels == 4
    reasons = " ".join(s["reason"] for s in model.deepshrink_channel_report["skipped"])
    assert "grouped conv grouped (groups=2)" in reasons


def test_unknown_op_blocks_its_inputs():
    class Softmaxed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.softmax(self.a(x), dim=-1)  # couples all channels of a: not prunable
            return self.c(F.relu(self.b(h)))

    model = Softmaxed()
    prune_channels(model, ChannelConfig(ratio=0.5), torch.rand(3, 6))
    assert model.a.out_features == 8 and model.b.out_features == 4
    reasons = {s["group"]: s["reason"] for s in model.deepshrink_channel_report["skipped"]}
    assert "softmax" in reasons["a"]


def test_tied_and_directly_used_weights_are_left_whole():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 8)
            self.b2 = nn.Linear(8, 8)
            self.b2.weight = self.b.weight  # tied with b
            self.c = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(F.linear(x, self.a.weight) + self.a.bias)  # a's weight used outside the layer
            return self.c(F.relu(self.b2(F.relu(self.b(h)))))

    model = Tied()
    prune_channels(model, ChannelConfig(ratio=0.5), torch.rand(3, 6))
    assert model.a.weight.shape == (8, 6) and model.b.weight is model.b2.weight
    reasons = " ".join(s["reason"] for s in model.deepshrink_channel_report["skipped"])
    assert "b: b shares (ties) a parameter with another layer" in reasons


def test_ignore_and_overrides():
    model = create_model("lenet300", in_size=8)
    prune_channels(model, ChannelConfig(ratio=0.5, ignore=("2",), overrides={"4": 0.25}),
                   torch.rand(2, 1, 8, 8))
    assert model[2].out_features == 300 and model[4].out_features == 75
    model = create_model("lenet300", in_size=8)
    prune_channels(model, ChannelConfig(ratio=0.5, round_to=8), torch.rand(2, 1, 8, 8))
    assert model[2].out_features == 152 and model[4].out_features == 56


def test_untraceable_model_raises_model_error_naming_the_problem():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return self.a(x)
            return x

    with pytest.raises(ModelError, match="cannot trace Branchy") as info:
        prune_channels(Branchy(), ChannelConfig(), torch.rand(2, 4))
    assert "control flow" in str(info.value)


def test_graph_needs_example_inputs():
    with pytest.raises(ModelError, match="example_inputs"):
        build_groups(create_model("lenet300", in_size=8), None)
