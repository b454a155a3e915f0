"""Small models and data shared by the early-exit tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.data import load_digits
from deepshrink.models import create_model

BERT = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 16,
        "num_labels": 3}


class UserNet(nn.Module):
    """A user's own module (not from the registry, not a Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block2(self.block1(x)))


@pytest.fixture(scope="session")
def digits():
    return load_digits()


def make(name: str) -> tuple[nn.Module, object, dict]:
    """(model, example inputs maker, ExitConfig kwargs) for one architecture."""
    torch.manual_seed(0)
    if name == "bert":
        model = create_model("hf", arch="BertForSequenceClassification", config=BERT, seed=0)
        return model, bert_inputs, {}
    if name == "user":
        return UserNet().eval(), images, {"points": ("block1", "block2")}
    kwargs = {"resnet_small": {"widths": (4, 8, 8)}, "vgg_small": {"width": 4, "hidden": 16}}.get(name, {})
    in_size = 16 if name == "lenet5" else 8
    return create_model(name, in_size=in_size, num_classes=10, **kwargs).eval(), \
        (lambda n, s=in_size: images(n, s)), {}


def images(n: int, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(n))


def bert_inputs(n: int) -> dict:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(1, 50, (n, 10), generator=g)
    mask = torch.ones(n, 10, dtype=torch.long)
    for i in range(n):  # ragged lengths: padding that the attention mask must hide
        mask[i, 4 + i % 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


ARCHS = ["mlp", "lenet300", "lenet5", "vgg_small", "resnet_small", "user", "bert"]


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    import types

    return types.SimpleNamespace(make=make, images=images, bert_inputs=bert_inputs, archs=ARCHS)
