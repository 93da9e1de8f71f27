"""What every entry point does around its one call: path setup, distributed context, clean exit."""
from __future__ import annotations

import ctypes
import sys
import traceback
from typing import Callable

from .distributed import DistContext, init_distributed, shutdown_and_exit


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_CPU_HEAP_LIMIT = 1 << 30  # tensors up to 1 GiB come from (and go back to) the heap


def keep_cpu_memory_mapped() -> bool:
    """Let glibc's heap keep freed tensor memory instead of unmapping it (CPU runs).

    By default glibc serves every allocation above 32 MB (a batch-64 activation of the mnist preset is 50 MB)
    with a fresh mmap and unmaps it on free, so each training step page-faults its largest tensors in again;
    a fixed high mmap threshold and no trimming reuse that memory: 1.2-1.25x faster stage-1 steps at batch
    64 on the CPU (docs/benchmarks.md). The process keeps its peak resident memory until it exits. False where
    the C library is not glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _CPU_HEAP_LIMIT)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class UsageError(Exception):
    """A user-facing error: printed as one message, exit status 2."""


def run_entry(main: Callable[[DistContext], int], device: str = "auto") -> None:
    """Set up (torchrun-aware) distribution, run main, and always exit through shutdown_and_exit.

    Expected failures (bad paths, bad data, bad checkpoints, bad flags) print one line naming the
    problem and exit 2; anything else prints its traceback and exits 1.
    """
    from nvae.data import DatasetError

    from .checkpoint import CheckpointError

    try:
        ctx = init_distributed(device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        shutdown_and_exit(2)
    except BaseException:  # noqa: BLE001 - e.g. a rendezvous failure: the traceback helps, the exit stays clean
        traceback.print_exc()
        shutdown_and_exit(1)
    if ctx.device.type == "cpu":
        keep_cpu_memory_mapped()
    try:
        status = main(ctx)
    except (UsageError, DatasetError, CheckpointError, ValueError, FileNotFoundError, FileExistsError,
            IsADirectoryError, NotADirectoryError, PermissionError) as exc:  # the OSErrors: a path the user gave
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    except BaseException:  # noqa: BLE001 - every exit must go through the clean shutdown below
        traceback.print_exc()
        status = 1
    shutdown_and_exit(status)
