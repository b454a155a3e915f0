"""A user's own model, as the README's command-line path uses it (`--import examples/mymodel.py`).

The CLI calls the factory with the data's sizes it asks for (here ``num_classes``; also offered:
``in_size``, ``in_channels``) and with ``--model-arg NAME=VALUE`` for the rest (here ``width``).
"""

from torch import nn


def build(num_classes: int, width: int = 8) -> nn.Module:
    """A small CNN for 8x8 digits."""
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 64, 32), nn.ReLU(), nn.Linear(32, num_classes))
