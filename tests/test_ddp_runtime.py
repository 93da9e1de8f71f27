"""Two-process gloo test of nvae.runtime's collectives and stop-signal agreement."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    """Ask the OS for an unused port instead of hard-coding one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tmp_dir: str) -> None:
    """One rank: set the torchrun environment, then exercise the runtime API."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nvae.runtime import (StopSignal, all_reduce_mean, all_reduce_sum, broadcast_object,
                              init_distributed, rank_zero_first, seed_everything, shutdown_and_exit)

    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_distributed) == (rank, 2, "gloo", True)
    assert seed_everything(10, ctx) == 20 + rank

    total = all_reduce_sum(torch.tensor([float(rank + 1), 10.0 * rank]), ctx)
    assert torch.equal(total, torch.tensor([3.0, 10.0])), total
    mean = all_reduce_mean(torch.tensor([float(rank)]), ctx)
    assert torch.equal(mean, torch.tensor([0.5])), mean
    assert broadcast_object({"from": rank}, ctx) == {"from": 0}

    shared = Path(tmp_dir) / "shared.txt"
    with rank_zero_first(ctx):
        if ctx.is_main:
            shared.write_text("ready")
        else:
            assert shared.read_text() == "ready"  # rank 0 finished its body before ours started

    stop = StopSignal()
    assert not stop.sync(ctx)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.requested == (rank == 1)
    assert stop.sync(ctx), f"rank {rank} did not learn about rank 1's signal"
    stop.uninstall()
    (Path(tmp_dir) / f"done{rank}").write_text("ok")
    shutdown_and_exit(0)


def test_two_process_gloo(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    assert all((tmp_path / f"done{r}").read_text() == "ok" for r in range(WORLD_SIZE))
