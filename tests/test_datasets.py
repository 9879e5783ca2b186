"""The IDX reader and the Fashion-MNIST loader (apps/datasets.py)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from crestcore.apps.datasets import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    IDXFormatError,
    fashion_mnist_available,
    load_fashion_mnist,
    read_idx,
)

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
          np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """An independent IDX writer: magic 0x0000<code><ndim>, big-endian uint32 dims, big-endian data."""
    head = bytes([0, 0, _CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path, data: bytes, gz: bool):
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([0, 9, 3, 255], dtype=np.uint8),
        np.array([[-1, 2], [300, -40000]], dtype=np.int32),
        np.array([-3, 7, 1000], dtype=np.int16),
        np.array([-128, 127], dtype=np.int8),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
        np.array([np.pi, -1e300], dtype=np.float64),
        np.zeros((0, 28, 28), dtype=np.uint8),
    ],
    ids=["u8-3d", "u8-1d", "i32", "i16", "i8", "f32", "f64", "empty"],
)
def test_round_trip(tmp_path, arr, gz):
    p = write(tmp_path / ("a.idx.gz" if gz else "a.idx"), idx_bytes(arr), gz)
    got = read_idx(p)
    assert got.shape == arr.shape
    assert got.dtype == arr.dtype and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)
    assert got.flags.writeable  # a copy, not a read-only view of the file buffer


def test_gzip_detected_from_content_not_name(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    p = write(tmp_path / "no-suffix", idx_bytes(arr), gz=True)
    np.testing.assert_array_equal(read_idx(p), arr)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_bad_magic(tmp_path, gz):
    data = bytearray(idx_bytes(np.arange(6, dtype=np.uint8)))
    data[0] = 0x1A
    p = write(tmp_path / "bad.idx", bytes(data), gz)
    with pytest.raises(IDXFormatError, match=r"bad\.idx.*magic"):
        read_idx(p)


def test_unknown_type_code(tmp_path):
    data = bytearray(idx_bytes(np.arange(6, dtype=np.uint8)))
    data[2] = 0x42
    p = write(tmp_path / "code.idx", bytes(data), False)
    with pytest.raises(IDXFormatError, match=r"code\.idx.*type code 0x42"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_truncated_data(tmp_path, gz):
    data = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    p = write(tmp_path / "short.idx", data[:-5], gz)
    with pytest.raises(IDXFormatError, match=r"short\.idx.*truncated"):
        read_idx(p)


def test_truncated_header(tmp_path):
    data = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    for cut in (2, 9):
        p = write(tmp_path / f"head{cut}.idx", data[:cut], False)
        with pytest.raises(IDXFormatError, match=rf"head{cut}\.idx"):
            read_idx(p)


def test_trailing_bytes(tmp_path):
    p = write(tmp_path / "long.idx", idx_bytes(np.arange(4, dtype=np.uint8)) + b"\x00", False)
    with pytest.raises(IDXFormatError, match=r"long\.idx.*trailing"):
        read_idx(p)


def test_zero_dims(tmp_path):
    p = write(tmp_path / "z.idx", bytes([0, 0, 8, 0]), False)
    with pytest.raises(IDXFormatError, match="0 dimensions"):
        read_idx(p)


def test_cut_gzip_stream(tmp_path):
    p = write(tmp_path / "cut.gz", idx_bytes(np.arange(5000, dtype=np.int32)), True)
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(IDXFormatError, match=r"cut\.gz"):
        read_idx(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope.idx")


def test_idx_format_error_is_value_error():
    assert issubclass(IDXFormatError, ValueError)


# ---------------------------------------------------------------------------------------------------
# the Fashion-MNIST loader on a tiny fake copy, then on the real files
# ---------------------------------------------------------------------------------------------------


def _fake_root(tmp_path, n=20, n_labels=None, shape=(28, 28)):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labs = (np.arange(n if n_labels is None else n_labels) % 10).astype(np.uint8)
    for _split, (fi, fl) in FASHION_MNIST_FILES.items():
        write(tmp_path / fi, idx_bytes(imgs), True)
        write(tmp_path / fl, idx_bytes(labs), True)
    return imgs, labs


def test_loader_on_fake_files(tmp_path):
    imgs, labs = _fake_root(tmp_path)
    for split in ("train", "test"):
        x, y = load_fashion_mnist(tmp_path, split=split)
        assert x.dtype == np.uint8 and x.shape == (20, 28, 28)
        assert y.dtype == np.int64 and y.shape == (20,)
        np.testing.assert_array_equal(x, imgs)
        np.testing.assert_array_equal(y, labs)
    assert fashion_mnist_available(tmp_path, "train")


def test_loader_count_mismatch(tmp_path):
    _fake_root(tmp_path, n=20, n_labels=19)
    with pytest.raises(IDXFormatError, match="20 images.*19 labels"):
        load_fashion_mnist(tmp_path)


def test_loader_wrong_image_shape(tmp_path):
    _fake_root(tmp_path, shape=(27, 28))
    with pytest.raises(IDXFormatError, match=r"\(n, 28, 28\)"):
        load_fashion_mnist(tmp_path)


def test_loader_missing_root_says_how_to_install(tmp_path):
    assert not fashion_mnist_available(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as ei:
        load_fashion_mnist(tmp_path / "empty")
    assert "train-images-idx3-ubyte.gz" in str(ei.value)


def test_loader_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(tmp_path, split="validation")


def test_class_names():
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


needs_fmnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Fashion-MNIST not in {DEFAULT_FASHION_MNIST_ROOT} (apt-get install dataset-fashion-mnist)",
)


@needs_fmnist
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split, n):
    x, y = load_fashion_mnist(split=split)
    assert x.shape == (n, 28, 28) and x.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, n // 10))
    assert x.min() == 0 and x.max() == 255
