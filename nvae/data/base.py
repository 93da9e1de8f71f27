"""Types shared by every data set: the error, the static description and the in-memory dataset."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import Dataset, Subset

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")


class DatasetError(Exception):
    """A data set is missing, corrupt or misconfigured; the message says what and how to fix it."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a data set before it sees any data."""

    name: str
    in_channels: int
    image_size: int  # images are square, image_size x image_size
    binarize: bool  # dynamic (per-step Bernoulli) binarisation happens in the training step
    default_output: Literal["bernoulli", "dmol"]
    loss_crop: int  # pixels cropped per side before the reconstruction loss (28->32 padding)


def check_split(split: str) -> None:
    """Raise ValueError unless split is 'train' or 'test'."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class ArrayDataset(Dataset):
    """A whole split held as one uint8 tensor (N, C, H, W); items are float32 (C, H, W) in [0, 1]."""

    def __init__(self, images: torch.Tensor, info: DatasetInfo) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        self.images = images  # (N, C, H, W) uint8
        self.info = info

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].float().div_(255.0)  # (C, H, W)


HELD_OUT_PARTS = ("validation", "test")


# The permutation that splits a test split into its two held-out halves: fixed, so every run, sweep and report
# sees the same halves.
HELD_OUT_SEED = 20_260_301


def held_out_part(test_split: Dataset, part: str) -> Subset:
    """One half of a data set's test split: ``validation`` (choices, checkpoints and sweeps are made on it) or
    ``test`` (the numbers that are reported), so no reported metric is ever the one a setting was chosen on.
    Stage-1 training never sees either.

    The halves are the two halves of a fixed random permutation, in permutation order, so both halves and every
    prefix of them (the first n images an evaluation takes) are draws from the whole split. Halves by index were
    not: MNIST's first 5,000 test digits come from one writer population and the last 5,000 from another, and a
    prior fitted to the training posterior scored 0.85x the Gaussian prior on the first and 0.20x on the second
    (docs/results.md, section 0c)."""
    if part not in HELD_OUT_PARTS:
        raise ValueError(f"the held-out part must be one of {HELD_OUT_PARTS}, got {part!r}")
    order = torch.randperm(len(test_split), generator=torch.Generator().manual_seed(HELD_OUT_SEED)).tolist()
    half = len(test_split) // 2
    return Subset(test_split, order[:half] if part == "validation" else order[half:])


def binarize_if_needed(x: torch.Tensor, binarize: bool) -> torch.Tensor:
    """Dynamic binarisation: a fresh Bernoulli draw of every pixel at every use."""
    return torch.bernoulli(x) if binarize else x
