"""A DistributedSampler that can resume in the middle of an epoch and replay the same remaining batches."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Per-epoch permutation from (seed, epoch), identical on all ranks; rank r takes positions r, r+R, ...

    To resume after `k` batches of size `B` in epoch `e`, call ``set_epoch(e, start_index=k * B)``:
    the rank then yields exactly the indices it had not yet consumed, so a DataLoader with the same
    batch size forms the same remaining batches as the uninterrupted run.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int,
        rank: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        # drop_last trims the tail so every rank gets the same count; otherwise the head is repeated.
        self.num_samples = dataset_len // num_replicas if drop_last else math.ceil(dataset_len / num_replicas)
        if self.num_samples == 0:
            raise ValueError(f"data set of {dataset_len} items is too small for {num_replicas} ranks")
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's permutation and skip the first `start_index` items of this rank's share."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} outside [0, {self.num_samples}]")
        self.epoch = epoch
        self.start_index = start_index

    def _rank_indices(self) -> list[int]:
        """This rank's full share of the current epoch, before skipping."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        if self.total_size > len(order):
            order += (order * math.ceil(self.total_size / len(order)))[: self.total_size - len(order)]
        return order[: self.total_size][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices()[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index
