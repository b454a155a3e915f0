"""Reference models. All image models take float tensors in [0, 1] of shape (N, 1, H, W) and
normalize inside, so a saved model is self-contained for deployment."""

from __future__ import annotations

import torch
from torch import nn

from deepshrink.errors import ModelError
from deepshrink.models.registry import register_model

# Fashion-MNIST pixel statistics on [0, 1]; close enough for MNIST and digits as well, and
# normalization only needs to put inputs near zero mean / unit variance.
DEFAULT_MEAN = 0.2860
DEFAULT_STD = 0.3530


class Normalize(nn.Module):
    """(x - mean) / std with the constants stored as buffers (saved with the weights)."""

    def __init__(self, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _hw(in_size: int) -> int:
    if in_size < 4:
        raise ModelError(f"in_size must be >= 4, got {in_size}")
    return in_size


@register_model("mlp")
def mlp(in_size: int = 28, hidden: int = 128, num_classes: int = 10) -> nn.Module:
    """The seed model: Flatten -> Dense(hidden) ReLU -> Dense(num_classes)."""
    n = _hw(in_size) ** 2
    return nn.Sequential(
        Normalize(), nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


@register_model("lenet300")
def lenet300(in_size: int = 28, num_classes: int = 10) -> nn.Module:
    """LeNet-300-100 (LeCun et al. 1998; Han et al. 2015's pruning benchmark)."""
    n = _hw(in_size) ** 2
    return nn.Sequential(
        Normalize(), nn.Flatten(),
        nn.Linear(n, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@register_model("lenet5")
def lenet5(in_size: int = 28, num_classes: int = 10) -> nn.Module:
    """LeNet-5, Caffe variant: conv5x5(20)-pool-conv5x5(50)-pool-fc500-fc10."""
    if in_size < 16:
        raise ModelError(f"lenet5 needs in_size >= 16 (two 5x5 valid convs and pools), got {in_size}")
    s = ((in_size - 4) // 2 - 4) // 2
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * s * s, 500), nn.ReLU(),
        nn.Linear(500, num_classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN; 1x1 conv+BN shortcut when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(self.norm(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("resnet_small")
def resnet_small(in_size: int = 28, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
                 blocks: int = 1) -> nn.Module:
    """A small ResNet for 28x28 (or 8x8) inputs: residual additions and BatchNorm."""
    _hw(in_size)
    return SmallResNet(tuple(widths), blocks, num_classes)


@register_model("vgg_small")
def vgg_small(in_size: int = 28, num_classes: int = 10, width: int = 32, hidden: int = 128) -> nn.Module:
    """A small VGG-style CNN: two conv-conv-pool stages (with BN) then two dense layers."""
    s = _hw(in_size) // 4
    w = width
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * w * s * s, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register_model("cnn_wide")
def cnn_wide(in_size: int = 28, num_classes: int = 10) -> nn.Module:
    """A wide CNN used as a distillation teacher (vgg_small at twice the width)."""
    return vgg_small(in_size=in_size, num_classes=num_classes, width=64, hidden=512)
