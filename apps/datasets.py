"""Small dataset readers for the demo and benchmarks (NumPy only; the core never imports this).

Fashion-MNIST ships as four gzipped IDX files. On Debian/Ubuntu they come with the package
``dataset-fashion-mnist`` and live in ``/usr/share/datasets/fashion-mnist``.

The IDX format (LeCun et al.): a 4-byte big-endian magic number ``0x00 0x00 <type code> <ndim>``,
then ``ndim`` big-endian uint32 dimensions, then the data in C order, big-endian. :func:`write_idx` writes
such files and :func:`write_fashion_mnist_stand_in` a small random stand-in for the data set (for examples
and tests; :func:`fashion_mnist_stand_in` writes one into a new temporary folder).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "IDXFormatError",
    "read_idx",
    "write_idx",
    "load_fashion_mnist",
    "write_fashion_mnist_stand_in",
    "fashion_mnist_stand_in",
    "fashion_mnist_available",
]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX type code -> big-endian NumPy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXFormatError(ValueError):
    """An IDX file is malformed (bad magic number, truncated, trailing bytes, unexpected shape).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "broken-idx1-ubyte"
    ...     _ = path.write_bytes(bytes([1, 2, 8, 1]))  # the magic number must start with two zero bytes
    ...     try:
    ...         read_idx(path)
    ...     except IDXFormatError as exc:
    ...         print(isinstance(exc, ValueError))
    True
    """


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
    gzipped = head == b"\x1f\x8b"
    try:
        if gzipped:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a cut gzip stream is EOFError
        raise IDXFormatError(f"{path}: cannot decompress ({exc})") from exc


def read_idx(path) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed, detected from its first bytes) into a NumPy array.

    The array has the file's dimensions and the native-endian version of its element type (uint8
    files give uint8). Raises :class:`FileNotFoundError` if the file is missing and
    :class:`IDXFormatError` (a ``ValueError``) naming the file if it is malformed: a magic number
    whose first two bytes are not zero, an unknown type code, zero dimensions, a size that does not
    match the header (truncated or with trailing bytes).

    Examples
    --------
    An IDX file is two zero bytes, a type code (0x08: unsigned bytes), the number of dimensions, each
    dimension as a big-endian int32, then the data:

    >>> import gzip
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "tiny-idx2-ubyte.gz"
    ...     with gzip.open(path, "wb") as fh:
    ...         _ = fh.write(bytes([0, 0, 0x08, 2]) + np.array(a.shape, dtype=">i4").tobytes() + a.tobytes())
    ...     read_idx(path)
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise IDXFormatError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000<type><ndim>); "
            "not an IDX file"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise IDXFormatError(f"{path}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise IDXFormatError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got < expected:
        raise IDXFormatError(
            f"{path}: truncated IDX data: header says shape {dims} ({expected} bytes), file holds {got}"
        )
    if got > expected:
        raise IDXFormatError(
            f"{path}: {got - expected} trailing bytes after IDX data of shape {dims}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(dims, dtype=np.int64)), offset=header)
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def write_idx(path, array) -> None:
    """Write ``array`` to ``path`` as an IDX file, gzip-compressed when the name ends in ``.gz``: what
    :func:`read_idx` reads back (the element type must be one IDX knows: uint8, int8, int16, int32,
    float32, float64).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_idx(Path(folder) / "tiny-idx2-ubyte.gz", a)
    ...     read_idx(Path(folder) / "tiny-idx2-ubyte.gz")
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
    """
    a = np.asarray(array)
    code = next((c for c, dt in _IDX_DTYPES.items() if dt == a.dtype.newbyteorder(">")), None)
    if code is None or a.ndim == 0:
        raise ValueError(f"IDX cannot store a {a.dtype} array of shape {a.shape} (types: uint8, int8, int16, "
                         "int32, float32, float64; one dimension or more)")
    data = bytes([0, 0, code, a.ndim]) + np.array(a.shape, dtype=">i4").tobytes()
    data += np.ascontiguousarray(a, dtype=_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def write_fashion_mnist_stand_in(root, n_train: int, n_test: int = 0, *, num_classes: int = 10,
                                 seed: int = 0) -> None:
    """Write a stand-in for Fashion-MNIST into the folder ``root``: ``n_train`` training images (and
    ``n_test`` test images; none: no test files) of uniformly random pixels, in the data set's gzipped IDX
    files (:data:`FASHION_MNIST_FILES`), so that the loaders read it like the real one. The labels cycle
    through ``0 .. num_classes - 1``; the pixels come from ``numpy.random.default_rng(seed)``, the
    training images first. For examples and tests that must not depend on the real data set.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_fashion_mnist_stand_in(folder, n_train=6, n_test=4, num_classes=3)
    ...     images, labels = load_fashion_mnist(folder, split="train")
    ...     fashion_mnist_available(folder, split="test")
    True
    >>> images.shape, images.dtype, labels
    ((6, 28, 28), dtype('uint8'), array([0, 1, 2, 0, 1, 2]))
    """
    root = Path(os.fspath(root))
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        if n:
            image_file, label_file = FASHION_MNIST_FILES[split]
            write_idx(root / image_file, rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
            write_idx(root / label_file, (np.arange(n) % num_classes).astype(np.uint8))


def fashion_mnist_stand_in(n_train: int, n_test: int = 0, *, num_classes: int = 10, seed: int = 0):
    """A new temporary folder holding :func:`write_fashion_mnist_stand_in`'s stand-in for Fashion-MNIST
    (same arguments): a :class:`tempfile.TemporaryDirectory`, its path in ``.name``; ``.cleanup()`` removes
    it. For examples and tests that must not depend on the real data set.

    Examples
    --------
    >>> folder = fashion_mnist_stand_in(n_train=6, n_test=4, num_classes=3)
    >>> images, labels = load_fashion_mnist(folder.name, split="test")
    >>> images.shape, labels
    ((4, 28, 28), array([0, 1, 2, 0]))
    >>> folder.cleanup()
    """
    import tempfile

    folder = tempfile.TemporaryDirectory()
    write_fashion_mnist_stand_in(folder.name, n_train, n_test, num_classes=num_classes, seed=seed)
    return folder


def _resolve_root(root) -> Path:
    return Path(DEFAULT_FASHION_MNIST_ROOT if root is None else os.fspath(root))


def fashion_mnist_available(root=None, split: str = "train") -> bool:
    """Whether the Fashion-MNIST files of ``split`` are present under ``root``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...     fashion_mnist_available(empty), fashion_mnist_available(empty, split="test")
    (False, False)
    >>> fashion_mnist_available(split="validation")  # no such split
    False
    """
    r = _resolve_root(root)
    files = FASHION_MNIST_FILES.get(split, ())
    return bool(files) and all((r / f).is_file() for f in files)


def load_fashion_mnist(root=None, split: str = "train"):
    """Load Fashion-MNIST: ``(images, labels)``, uint8 (n, 28, 28) and int64 (n,).

    Parameters
    ----------
    root : folder holding the gzipped IDX files; default ``/usr/share/datasets/fashion-mnist``
        (Debian/Ubuntu package ``dataset-fashion-mnist``).
    split : "train" (60,000 images) or "test" (10,000 images).

    Label ``c`` names the class ``FASHION_MNIST_CLASSES[c]``.

    Examples
    --------
    A folder laid out like the data set's, with four 28 x 28 images instead of 60,000:

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> folder = tempfile.TemporaryDirectory()
    >>> image_file, label_file = FASHION_MNIST_FILES["train"]
    >>> write_idx(Path(folder.name) / image_file, np.zeros((4, 28, 28), dtype=np.uint8))
    >>> write_idx(Path(folder.name) / label_file, np.array([9, 0, 0, 3], dtype=np.uint8))
    >>> images, labels = load_fashion_mnist(folder.name)
    >>> images.shape, labels, FASHION_MNIST_CLASSES[labels[0]]
    ((4, 28, 28), array([9, 0, 0, 3]), 'Ankle boot')
    >>> folder.cleanup()
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {tuple(FASHION_MNIST_FILES)}, got {split!r}")
    r = _resolve_root(root)
    img_name, lab_name = FASHION_MNIST_FILES[split]
    missing = [f for f in (img_name, lab_name) if not (r / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found in {r} (missing: {', '.join(missing)}). "
            "Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
            "or pass the folder that holds the gzipped IDX files (`crest demo --root DIR`, or root=)."
        )
    images = read_idx(r / img_name)
    labels = read_idx(r / lab_name)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IDXFormatError(
            f"{r / img_name}: expected uint8 images of shape (n, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXFormatError(f"{r / lab_name}: expected 1-D uint8 labels, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise IDXFormatError(
            f"{r}: {images.shape[0]} images in {img_name} but {labels.shape[0]} labels in {lab_name}"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise IDXFormatError(f"{r / lab_name}: label {int(labels.max())} out of range 0..9")
    return images, labels.astype(np.int64)
