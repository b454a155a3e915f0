import gzip

import numpy as np
import pytest

from deepshrink.data import fashion_mnist_available, load_fashion_mnist, load_idx_dir, read_idx, write_idx
from deepshrink.errors import DataError, FormatError


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    arr = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    write_idx(path, arr)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, arr)


def test_idx_float_big_endian_round_trip(tmp_path):
    arr = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    write_idx(tmp_path / "f.idx", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), arr)


def _raw(tmp_path, data: bytes, name="bad-idx1-ubyte"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x02\x05\x06", "bad IDX magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x02\x05\x06", "unknown IDX type code 0x07 at offset 2"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x05\x06", "truncated"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated IDX header"),
        (b"\x00\x00", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06", "trailing bytes after offset 9"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
    ],
)
def test_idx_rejects_corrupt_files_naming_file_and_problem(tmp_path, data, needle):
    p = _raw(tmp_path, data)
    with pytest.raises(FormatError) as exc:
        read_idx(p)
    assert needle in str(exc.value)
    assert str(p) in str(exc.value)


def test_idx_rejects_corrupt_gzip(tmp_path):
    good = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02\x05\x06")
    p = _raw(tmp_path, good[:-6], "cut.gz")
    with pytest.raises(FormatError, match="corrupt gzip"):
        read_idx(p)


def test_idx_dir_loader_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 50), ("t10k", 20)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 6, 6), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 3, n, dtype=np.uint8))
    b = load_idx_dir(tmp_path, n_val=10)
    assert b.sizes() == {"train": 40, "val": 10, "test": 20}
    x, y = b.train.tensors
    assert x.shape == (40, 1, 6, 6) and float(x.max()) <= 1.0 and float(x.min()) >= 0.0
    assert y.dtype.is_floating_point is False
    # deterministic split
    b2 = load_idx_dir(tmp_path, n_val=10)
    assert (b2.val.tensors[1] == b.val.tensors[1]).all()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_idx_dir(tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    import deepshrink.data.datasets as ds

    monkeypatch.setattr(ds, "FASHION_MNIST_DIRS", (str(tmp_path / "nope"),))
    monkeypatch.delenv(ds.FASHION_ENV, raising=False)
    with pytest.raises(DataError) as exc:
        ds.load_fashion_mnist()
    assert "apt-get install dataset-fashion-mnist" in str(exc.value)


@pytest.mark.skipif(not fashion_mnist_available(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    b = load_fashion_mnist()
    assert b.sizes() == {"train": 55000, "val": 5000, "test": 10000}
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    counts = np.bincount(b.test.tensors[1].numpy(), minlength=10)
    assert (counts == 1000).all()  # the official test split is balanced
