"""Process-group setup for torchrun (env://) launches that also runs as a plain single process."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset


@dataclass
class DistContext:
    """Where this process sits in the job and which device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]  # None: no process group (plain single process)

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when a process group exists (any torchrun launch, even at world size 1)."""
        return self.backend is not None


def _resolve_device(device: str, local_rank: int) -> torch.device:
    """Turn 'auto'/'cpu'/'cuda'/'cuda:N' into a concrete device; a bare 'cuda' follows the local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if re.fullmatch(r"cpu|cuda(:[0-9]+)?", device) is None:
        raise ValueError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
        if resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {resolved} does not exist: this node has {torch.cuda.device_count()} CUDA "
                f"device(s); launch at most that many processes per node"
            )
        torch.cuda.set_device(resolved)
    return resolved


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group if launched by torchrun, else return a single-process context."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0)) if launched else 0
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if launched else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    resolved = _resolve_device(device, local_rank)
    if not launched:
        return DistContext(rank, world_size, local_rank, resolved, None)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # device_id binds NCCL to this GPU up front, so barriers and collectives never guess the device.
        device_id = resolved if backend == "nccl" else None
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size, device_id=device_id
        )
    return DistContext(rank, world_size, local_rank, resolved, backend)


def seed_everything(seed: int, ctx: DistContext) -> int:
    """Seed python, numpy and torch (all devices) with seed * world_size + rank; return that seed."""
    rank_seed = seed * ctx.world_size + ctx.rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)  # numpy accepts only 32-bit seeds
    torch.manual_seed(rank_seed)
    return rank_seed


@contextlib.contextmanager
def forked_rng(device: torch.device, seed: Optional[int] = None) -> Iterator[None]:
    """Torch's random streams (the CPU's, and the device's when it is CUDA) forked: draws inside leave the
    caller's stream as it was; with seed, reseeded first, so the draws are the same whatever the run's seed."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def barrier(ctx: DistContext) -> None:
    """Wait for all ranks; a no-op without a process group."""
    if not ctx.is_distributed:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum `tensor` over ranks in place (it must live on ctx.device) and return it."""
    if ctx.is_distributed and ctx.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average a floating-point `tensor` over ranks in place and return it."""
    if ctx.is_distributed and ctx.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ctx.world_size)
    return tensor


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Return rank `src`'s picklable `obj` on every rank."""
    if not (ctx.is_distributed and ctx.world_size > 1):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """Return every rank's picklable `obj`, indexed by rank (e.g. per-rank RNG states for a checkpoint)."""
    if not (ctx.is_distributed and ctx.world_size > 1):
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


@contextlib.contextmanager
def rank_zero_first(ctx: DistContext) -> Iterator[None]:
    """Run the body on rank 0 first and on the other ranks after it, e.g. to build a shared cache file."""
    if not ctx.is_main:
        barrier(ctx)
    try:
        yield
    finally:
        # Rank 0 reaches the barrier even if its body raised, so the others fail fast instead of hanging.
        if ctx.is_main:
            barrier(ctx)


def shutdown_and_exit(status: int) -> NoReturn:
    """Flush output and logs, destroy the process group, then os._exit(status).

    os._exit skips interpreter teardown, where gloo's background threads can race with module
    destruction and crash or hang a run that has already finished its work.
    """
    try:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        logging.shutdown()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(status)


def split_for_rank(dataset: Dataset, ctx: DistContext, limit: Optional[int] = None) -> Subset:
    """This rank's strided share of the first `limit` items (evaluation is summed across ranks)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return Subset(dataset, range(ctx.rank, n, ctx.world_size))


def ddp_if_distributed(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """The module wrapped in DistributedDataParallel under a multi-process run, else the module itself."""
    if not ctx.is_distributed:
        return module
    return DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
