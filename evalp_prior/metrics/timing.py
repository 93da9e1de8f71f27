"""Sampling time per image: warm-up calls, then the median of timed repeats."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch


def synchronize(device: Optional[torch.device]) -> None:
    """Wait for queued GPU work so a timer measures it (a no-op on the CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_image(fn: Callable[[], Any], batch_size: int, warmup: int = 1, repeats: int = 5,
                      device: Optional[torch.device] = None,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time fn(), which produces batch_size images, and report seconds per image.

    ``warmup`` untimed calls first (allocator, kernel selection, lazy initialisation), then ``repeats``
    timed calls; the median is robust to one-off stalls on a shared machine. ``clock`` is injectable
    for tests. Returns seconds_per_image (median / batch_size), the per-call seconds and the settings.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    calls = []
    for _ in range(repeats):
        start = clock()
        fn()
        synchronize(device)
        calls.append(clock() - start)
    median = statistics.median(calls)
    return {"seconds_per_image": median / batch_size, "seconds_per_batch": median, "call_seconds": calls,
            "batch_size": batch_size, "warmup": warmup, "repeats": repeats}
