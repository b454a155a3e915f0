"""Data: IDX reader, embedded digits, Fashion-MNIST / MNIST loaders, deterministic splits."""

from deepshrink.data.datasets import (
    DataBundle,
    fashion_mnist_available,
    fashion_mnist_dir,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_dir,
)
from deepshrink.data.idx import parse_idx, read_idx, write_idx

__all__ = [
    "DataBundle",
    "fashion_mnist_available",
    "fashion_mnist_dir",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dir",
    "parse_idx",
    "read_idx",
    "write_idx",
]
