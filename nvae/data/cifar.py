"""CIFAR-10 from torchvision's on-disk layout (ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch}).

torchvision.datasets.CIFAR10 fetches and checksums the archive when download=True. The batches are
then read here rather than through that class: its MD5 check rejects every copy but the original
(so the reader could not be tested on small synthetic batches) and its items are PIL images, whereas
one uint8 tensor per split gives fast float items.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from nvae.data.base import ArrayDataset, DatasetError, DatasetInfo, check_split

BASE_FOLDER = "cifar-10-batches-py"
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
DEFAULT_ROOT = "data/cifar10"


def _read_batch(path: Path) -> np.ndarray:
    """One pickled batch -> uint8 (N, 3, 32, 32)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # written by Python 2
        data = np.asarray(entry["data"], dtype=np.uint8)
    except Exception as e:  # any failure here means the file is not a CIFAR-10 batch
        raise DatasetError(f"CIFAR-10: cannot read batch {path} ({type(e).__name__}: {e}); "
                           f"delete it and pass --download to fetch CIFAR-10 again") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"CIFAR-10: batch {path} holds data of shape {data.shape}, expected (N, 3072)")
    return data.reshape(-1, 3, 32, 32)  # rows are R plane, G plane, B plane, each row-major


def load_cifar10(info: DatasetInfo, split: str, root: Optional[str] = None, download: bool = False) -> ArrayDataset:
    """CIFAR-10 split as (3, 32, 32) images; fetches into root only when download=True."""
    check_split(split)
    root_dir = Path(root if root is not None else DEFAULT_ROOT)
    if download:
        import torchvision  # heavy import, only needed to fetch

        torchvision.datasets.CIFAR10(str(root_dir), train=(split == "train"), download=True)
    folder = root_dir / BASE_FOLDER
    missing = [name for name in BATCHES[split] if not (folder / name).is_file()]
    if missing:
        raise DatasetError(
            f"CIFAR-10: {', '.join(missing)} not found in {folder}; pass --download to fetch CIFAR-10 "
            f"into {root_dir}, or --data-root DIR where DIR/{BASE_FOLDER} holds the python batches"
        )
    images = np.concatenate([_read_batch(folder / name) for name in BATCHES[split]])
    return ArrayDataset(torch.from_numpy(images), info)
