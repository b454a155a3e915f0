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
from deepshrink.data.record import DataRecord, data_record
from deepshrink.data.text import is_text_source, load_text

__all__ = [
    "DataBundle",
    "DataRecord",
    "data_record",
    "fashion_mnist_available",
    "fashion_mnist_dir",
    "is_text_source",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dir",
    "load_text",
    "parse_idx",
    "read_idx",
    "write_idx",
]
