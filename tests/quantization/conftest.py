"""Shared fixtures: the digits data and a briefly trained lenet300 to quantize."""

import pytest
import torch

from deepshrink.data import load_digits
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, train


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    train(m, digits, TrainConfig(epochs=5, batch_size=64, lr=2e-3, progress=False))
    return m
