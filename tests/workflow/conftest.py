"""Shared fixtures for the workflow tests: a small LeNet-300 trained on the embedded digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepshrink import save
from deepshrink.data import load_digits
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def digits():
    return load_digits()


@pytest.fixture(scope="session")
def digits_model(digits, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model("lenet300", in_size=digits.in_size, num_classes=digits.num_classes)
    train(model, digits, TrainConfig(epochs=8, batch_size=64, lr=2e-3, progress=False, keep_best=True))
    path = tmp_path_factory.mktemp("model") / "digits300.safetensors"
    save(model, path)
    return model.eval(), path
