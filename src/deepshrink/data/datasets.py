"""Datasets: scikit-learn's bundled `digits` (the embedded default), Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package, and any directory of MNIST-style IDX files. Nothing downloads.

Images come as float32 tensors in [0, 1] of shape (N, 1, H, W); labels as int64.
Splits are deterministic: the official test split where one exists (else a seeded stratified
one), and a seeded validation split carved from the training data.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from deepshrink.data.idx import read_idx
from deepshrink.errors import DataError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_ENV = "DEEPSHRINK_FASHION_MNIST"
MNIST_ENV = "DEEPSHRINK_MNIST"
SPLIT_SEED = 20160101

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


@dataclasses.dataclass
class DataBundle:
    """Train / validation / test splits of one image-classification dataset."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.tensors[0].shape[1:])

    @property
    def in_size(self) -> int:
        return int(self.input_shape[-1])

    def loader(self, split: str, batch_size: int = 128, shuffle: bool | None = None,
               seed: int = 0) -> DataLoader:
        """A DataLoader over one split; shuffled (with a seeded generator) for 'train' only."""
        ds = {"train": self.train, "val": self.val, "test": self.test}.get(split)
        if ds is None:
            raise DataError(f"unknown split {split!r}; use 'train', 'val' or 'test'")
        shuffle = (split == "train") if shuffle is None else shuffle
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _tensors(images: np.ndarray, labels: np.ndarray, scale: float) -> TensorDataset:
    x = torch.from_numpy(images.astype(np.float32) / scale).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def _split_val(images: np.ndarray, labels: np.ndarray, n_val: int, seed: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(len(labels))
    val, train = perm[:n_val], perm[n_val:]
    return images[train], labels[train], images[val], labels[val]


def load_digits(seed: int = SPLIT_SEED) -> DataBundle:
    """scikit-learn's 8x8 digits (1797 images, bundled with the package): 60/20/20 stratified."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    images = d.images.astype(np.float32)  # values 0..16
    labels = d.target.astype(np.int64)
    x_tv, x_te, y_tv, y_te = train_test_split(images, labels, test_size=0.2, stratify=labels,
                                              random_state=seed % (2**32))
    x_tr, x_va, y_tr, y_va = train_test_split(x_tv, y_tv, test_size=0.25, stratify=y_tv,
                                              random_state=seed % (2**32))
    return DataBundle("digits", _tensors(x_tr, y_tr, 16.0), _tensors(x_va, y_va, 16.0),
                      _tensors(x_te, y_te, 16.0), 10, tuple(str(i) for i in range(10)))


_IDX_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find(directory: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = directory / f"{stem}{suffix}"
            if p.is_file():
                return p
    raise DataError(f"{directory}: no file named {stems[0]}[.gz]")


MAX_CLASSES = 1000


def _check_splits(arrays: dict[str, np.ndarray], directory: Path) -> None:
    """Images (N, H, W) of one dtype and size in both splits, integer labels (N,) in
    [0, MAX_CLASSES), no empty split."""
    for split in ("train", "test"):
        imgs, labs = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if imgs.ndim != 3 or labs.ndim != 1 or len(imgs) != len(labs):
            raise DataError(f"{directory}: {split} images {imgs.shape} and labels {labs.shape} "
                            "do not match (want (N, H, W) and (N,))")
        if len(labs) == 0 or imgs.shape[1] == 0 or imgs.shape[2] == 0:
            raise DataError(f"{directory}: the {split} split is empty ({imgs.shape})")
        if labs.dtype.kind not in "iu":
            raise DataError(f"{directory}: {split} labels are {labs.dtype}, not integers")
        lo, hi = int(labs.min()), int(labs.max())
        if lo < 0 or hi >= MAX_CLASSES:
            raise DataError(f"{directory}: {split} labels range over [{lo}, {hi}], outside "
                            f"[0, {MAX_CLASSES})")
    tr, te = arrays["train_images"], arrays["test_images"]
    if tr.shape[1:] != te.shape[1:] or tr.dtype != te.dtype:
        raise DataError(f"{directory}: train images are {tr.dtype} {tr.shape[1:]}, test images "
                        f"{te.dtype} {te.shape[1:]}; both splits must match")


def load_idx_dir(directory: str | Path, name: str = "idx", n_val: int = 5000,
                 seed: int = SPLIT_SEED, class_names: tuple[str, ...] | None = None) -> DataBundle:
    """Any directory with the four standard MNIST-style IDX files (.gz or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    arrays = {k: read_idx(_find(directory, v)) for k, v in _IDX_NAMES.items()}
    _check_splits(arrays, directory)
    num_classes = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
    if class_names is not None and num_classes > len(class_names):
        raise DataError(f"{directory}: label {num_classes - 1} is out of range for the "
                        f"{len(class_names)} classes of {name}")
    if not 0 <= n_val < len(arrays["train_labels"]):
        raise DataError(f"{directory}: n_val={n_val} must be at least 0 and smaller than the "
                        f"{len(arrays['train_labels'])} training examples")
    x_tr, y_tr, x_va, y_va = _split_val(arrays["train_images"], arrays["train_labels"], n_val, seed)
    scale = 255.0 if arrays["train_images"].dtype == np.uint8 else 1.0
    names = class_names or tuple(str(i) for i in range(num_classes))
    return DataBundle(name, _tensors(x_tr, y_tr, scale), _tensors(x_va, y_va, scale),
                      _tensors(arrays["test_images"], arrays["test_labels"], scale),
                      num_classes, names)


def fashion_mnist_dir(override: str | Path | None = None) -> Path:
    """Where Fashion-MNIST lives: the argument, then $DEEPSHRINK_FASHION_MNIST, then Debian's path."""
    candidates = [override] if override else []
    if os.environ.get(FASHION_ENV):
        candidates.append(os.environ[FASHION_ENV])
    candidates.extend(FASHION_MNIST_DIRS)
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    raise DataError(
        "Fashion-MNIST not found (looked in " + ", ".join(str(c) for c in candidates) + ")",
        hint=f"`apt-get install dataset-fashion-mnist`, or set {FASHION_ENV} / --data-dir "
        "to a directory of its IDX files",
    )


def fashion_mnist_available() -> bool:
    try:
        fashion_mnist_dir()
    except DataError:
        return False
    return True


def load_fashion_mnist(directory: str | Path | None = None, n_val: int = 5000,
                       seed: int = SPLIT_SEED) -> DataBundle:
    return load_idx_dir(fashion_mnist_dir(directory), "fashion-mnist", n_val, seed, FASHION_CLASSES)


def load_dataset(name: str = "digits", data_dir: str | Path | None = None) -> DataBundle:
    """By name: ``digits`` (embedded), ``fashion-mnist``, ``mnist`` (needs a directory), or a
    path to any directory of IDX files."""
    if name == "digits":
        return load_digits()
    if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_fashion_mnist(data_dir)
    if name == "mnist":
        directory = data_dir or os.environ.get(MNIST_ENV)
        if not directory:
            raise DataError("MNIST needs a directory of IDX files",
                            hint=f"pass --data-dir or set {MNIST_ENV}")
        return load_idx_dir(directory, "mnist")
    if Path(name).is_dir():
        return load_idx_dir(name, Path(name).name)
    raise DataError(f"unknown dataset {name!r}",
                    hint="use digits, fashion-mnist, mnist, or a directory of IDX files")
