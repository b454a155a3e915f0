"""Channel pruning on the traced dependency graph: removing a unit must be exactly zeroing it.

Reference: a copy of the ORIGINAL model in which every removed unit's producing slices (weight
rows / filters, embedding columns) and the per-channel parameters sliced along with them (biases,
norm scales, layer scales) are forced to zero, run in eval mode. The pruned model must match it to
1e-5 absolute (float32 sums reordered by the smaller shapes; observed differences ~1e-7). Hidden
size is left off here: LayerNorm statistics change when a channel goes, so it is not exact.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.errors import ModelError
from deepshrink.models import create_model
from deepshrink.pruning.graph import trace_graph
from deepshrink.pruning.structured import ChannelConfig, prune_channels

ATOL = 1e-5


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and scales, so a wrongly sliced running_mean shows up."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()


def zeroed_reference(original: nn.Module, x, edit: dict) -> nn.Module:
    """The original with the removed units' producing and along-sliced parameters zeroed."""
    ref = copy.deepcopy(original)
    roles = {(m.tensor, m.dim): m.role for g in trace_graph(ref, x).groups for m in g.members}
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, dims in edit["slices"].items():
            if name not in params:
                continue  # buffers (running statistics) follow their scale and shift
            for d, keep in dims.items():
                if roles.get((name, int(d))) == "in":
                    continue  # consumers are untouched: they must see the zeros
                p = params[name]
                drop = sorted(set(range(p.shape[int(d)])) - set(keep))
                p.index_fill_(int(d), torch.as_tensor(drop, dtype=torch.long), 0.0)
    return ref


class CatNet(nn.Module):
    """Two branches concatenated on the channel axis, BatchNorm over the joint channels, split."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.c = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        left, right = F.relu(self.bn(y)).chunk(2, dim=1)  # GLU-like: the halves go together
        y = F.relu(self.c(left * torch.sigmoid(right)))
        return self.fc(y.mean((2, 3)))


class GroupedNet(nn.Module):
    """conv -> BN -> depthwise conv -> GroupNorm -> grouped conv (groups=2) -> pointwise."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(4, 8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.pw = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv(x)))
        x = F.relu(self.gn(self.dw(x)))
        x = F.relu(self.pw(F.relu(self.grouped(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SENet(nn.Module):
    """Squeeze-excitation gate indexed as g[:, :, None, None], and a bare per-channel parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)  # layer scale, no module around it
        self.head = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3))))))
        y = y * g[:, :, None, None] * self.scale.view(1, -1, 1, 1)
        return self.fc(F.relu(self.head(y)).amax((2, 3)))


class AttnNet(nn.Module):
    """nn.MultiheadAttention between two Linear layers (no residual: heads prunable by default)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(F.relu(a)).mean(1)


class Branchy(nn.Module):
    """Python control flow on a tensor value (torch.fx cannot trace this)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        for _ in range(int(h.sum().item() > -1) + 1):  # runs twice; tensor-valued decision
            if h.mean() > 0:
                h = F.relu(self.b(h)) if h.shape[0] else h
        return self.c(h)


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
    ("concat-split", CatNet, (4, 1, 8, 8)),
    ("grouped-groupnorm", GroupedNet, (4, 1, 8, 8)),
    ("se-gate-bare-param", SENet, (4, 1, 8, 8)),
    ("multihead-attention", AttnNet, (4, 5, 6)),
    ("control-flow", Branchy, (4, 4)),
    ("embedding-conv1d", SeqNet, (4, 10)),
]


def make_input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 20, shape) if len(shape) == 2 and shape[1] == 10 else torch.rand(*shape)


@pytest.mark.parametrize("importance", ["l1", "activation"])
@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=[c[0] for c in CASES])
def test_pruned_equals_original_with_removed_units_zeroed(name, make, shape, importance):
    torch.manual_seed(0)
    original = randomize_norms(make())
    x = make_input(shape)
    res = prune_channels(copy.deepcopy(original), ChannelConfig(ratio=0.5, importance=importance),
                         example_inputs=x)
    ref = zeroed_reference(original, x, res.edit)
    with torch.no_grad():
        out, want, full = res.model(x), ref(x), original(x)
    assert out.shape == full.shape
    assert torch.allclose(out, want, atol=ATOL), (out - want).abs().max()
    # The check has teeth: zeroing half of the units changes the output.
    assert not torch.allclose(full, want, atol=1e-3)
    assert res.params[1] < 0.9 * res.params[0]


def test_grouped_conv_groupnorm_and_depthwise_lose_whole_groups():
    res = prune_channels(randomize_norms(GroupedNet()), ChannelConfig(ratio=0.5),
                         example_inputs=torch.rand(2, 1, 8, 8))
    m = res.model
    # 4 GroupNorm groups of 2 channels, grouped conv with 2 groups: the coupled group keeps 1 of
    # 2 grouped-conv groups = 4 of 8 channels (2 GroupNorm groups), depthwise follows.
    assert m.conv.out_channels == m.dw.in_channels == m.dw.groups == m.gn.num_channels == 4
    assert m.gn.num_groups == 2 and m.grouped.groups == 1 and m.grouped.in_channels == 4
    assert m.grouped.out_channels == 6 and m.pw.in_channels == 6


def test_mha_heads_and_embedding_width_are_cut_together():
    res = prune_channels(AttnNet(), ChannelConfig(ratio=0.5), example_inputs=torch.rand(2, 5, 6))
    a = res.model.attn
    assert (a.num_heads, a.embed_dim, a.head_dim) == (2, 8, 4)
    assert a.in_proj_weight.shape == (24, 8) and a.out_proj.weight.shape == (8, 8)
    assert res.model.inp.out_features == 8 and [r["kind"] for r in res.pruned] == ["head"]


def test_output_layer_is_never_pruned_and_skips_are_reported():
    model = create_model("lenet300", in_size=8)
    x = torch.rand(2, 1, 8, 8)
    res = prune_channels(model, ChannelConfig(ratio=0.9), example_inputs=x)
    assert model[6].out_features == 10 and model(x).shape == (2, 10)
    reasons = {s["group"]: s["reason"] for s in res.skipped}
    assert "model output" in reasons["6"] and "model input" in reasons["2 (input)"]
    assert not hasattr(model, "deepshrink_channel_report")


def test_residual_stream_is_hidden_size_off_by_default():
    x = torch.rand(2, 1, 16, 16)
    model = create_model("resnet_small", in_size=16)
    res = prune_channels(model, ChannelConfig(ratio=0.5), example_inputs=x)
    assert model.stem[0].out_channels == 16 and model.layers[0].conv1.out_channels == 8
    assert any("residual connection" in s["reason"] for s in res.skipped)
    model = create_model("resnet_small", in_size=16)
    prune_channels(model, ChannelConfig(ratio=0.5, hidden=True), example_inputs=x)
    b = model.layers
    assert model.stem[0].out_channels == b[0].conv2.out_channels == b[0].bn2.num_features == 8
    assert b[1].shortcut[0].in_channels == b[1].conv1.in_channels == 8
    assert b[2].bn2.num_features == b[2].shortcut[1].num_features == model.fc.in_features == 32


@pytest.mark.parametrize(("rounding", "kept"), [("up", 23), ("down", 22), ("nearest", 22)])
def test_round_semantics(rounding, kept):
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    prune_channels(model, ChannelConfig(ratio=0.3, round=rounding), example_inputs=torch.rand(2, 4))
    assert model[0].out_features == kept  # 32 * 0.7 = 22.4
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    prune_channels(model, ChannelConfig(ratio=0.3, round=rounding, round_to=8),
                   example_inputs=torch.rand(2, 4))
    assert model[0].out_features == {"up": 24, "down": 16, "nearest": 24}[rounding]


def test_unknown_op_fixes_its_inputs_naming_it():
    class Cumsummed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.fft.fft(self.a(x)).real  # mixes every channel of a: not prunable
            return self.c(F.relu(self.b(h)))

    model = Cumsummed()
    res = prune_channels(model, ChannelConfig(ratio=0.5), example_inputs=torch.rand(3, 6))
    assert model.a.out_features == 8 and model.b.out_features == 4
    assert "fft" in {s["group"]: s["reason"] for s in res.skipped}["a"]


def test_unhandled_architecture_error_names_the_blocking_op():
    class AllFFT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.c = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.fft.fft(self.a(x)).real)

    with pytest.raises(ModelError, match="nothing to prune in AllFFT: blocked by fft_fft"):
        prune_channels(AllFFT(), ChannelConfig(), example_inputs=torch.rand(2, 6))


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight  # tied, as in language models

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(F.relu(self.mid(self.emb(ids))) + self.emb(ids))

    model = Tied()
    x = torch.randint(0, 10, (2, 5))
    prune_channels(model, ChannelConfig(ratio=0.5, hidden=True), example_inputs=x)
    assert model.out.weight is model.emb.weight and model.emb.weight.shape == (10, 4)
    assert model(x).shape == (2, 5, 10)


def test_ignore_and_overrides():
    model = create_model("lenet300", in_size=8)
    x = torch.rand(2, 1, 8, 8)
    res = prune_channels(model, ChannelConfig(ratio=0.5, ignore=("2",), overrides={"4": 0.25}),
                         example_inputs=x)
    assert model[2].out_features == 300 and model[4].out_features == 75
    assert "ignore list" in {s["group"]: s["reason"] for s in res.skipped}["2"]


def test_graph_needs_example_inputs():
    with pytest.raises(ModelError, match="example_inputs"):
        trace_graph(create_model("lenet300", in_size=8), None)
