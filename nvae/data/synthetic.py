"""Deterministic random images for tests and smoke runs."""
from __future__ import annotations

import torch

from nvae.data.base import ArrayDataset, DatasetInfo, check_split


def synthetic_info(channels: int = 1, size: int = 32, binarize: bool = False) -> DatasetInfo:
    """Description of a synthetic data set with the given shape."""
    if channels < 1 or size < 1:
        raise ValueError(f"channels and size must be positive, got {channels}, {size}")
    return DatasetInfo(name="synthetic", in_channels=channels, image_size=size, binarize=binarize,
                       default_output="bernoulli" if binarize else "dmol", loss_crop=0)


def make_synthetic(
    split: str, channels: int = 1, size: int = 32, count: int = 256, seed: int = 0, binarize: bool = False
) -> ArrayDataset:
    """count uniform random 8-bit images; the same (seed, split) always gives the same images."""
    check_split(split)
    generator = torch.Generator().manual_seed(2 * seed + (split == "test"))  # disjoint streams per split
    images = torch.randint(0, 256, (count, channels, size, size), generator=generator, dtype=torch.uint8)
    return ArrayDataset(images, synthetic_info(channels, size, binarize))
