"""Turn SIGTERM/SIGUSR1 (cluster pre-emption) into a flag that all ranks act on at the same step."""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional

import torch
import torch.distributed as dist

from nvae.runtime.distributed import DistContext

# EX_TEMPFAIL from sysexits.h ("temporary failure, retry later"): the run saved a checkpoint and
# stopped on request, so a wrapper or scheduler should requeue it with --resume auto. It differs from
# 143 (128 + SIGTERM), which is what a process killed before it could save reports, and from 1/2
# (errors, bad arguments), so the three outcomes stay distinguishable.
PREEMPTED_EXIT_CODE = 75

_DEFAULT_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: loader workers ignore SIGTERM/SIGUSR1 and leave the stop to the trainer.

    torchrun delivers SIGTERM to each worker's whole process group, loader processes included, and
    torch's loader workers die on it; the trainer then fails with "DataLoader worker ... is killed by
    signal" before it can checkpoint. The trainer shuts its loader workers down itself when it stops.
    """
    for signum in _DEFAULT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopSignal:
    """Sets a flag on SIGTERM/SIGUSR1 instead of dying, so the loop can checkpoint and exit cleanly."""

    def __init__(self, signals: tuple[int, ...] = _DEFAULT_SIGNALS) -> None:
        self._requested = False
        self.signum: Optional[int] = None  # the last signal received, for the log message
        self._previous: dict[int, Any] = {}
        # Python only lets the main thread install handlers; elsewhere the flag is set via request().
        if threading.current_thread() is threading.main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        """Signal handler: only record, since the loop decides when it is safe to stop."""
        self._requested = True
        self.signum = signum

    def request(self) -> None:
        """Ask for a stop without a signal (e.g. from a test or another thread)."""
        self._requested = True

    @property
    def requested(self) -> bool:
        """True once this process was asked to stop."""
        return self._requested

    @property
    def signal_name(self) -> Optional[str]:
        """Name of the last signal received, e.g. 'SIGTERM'."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    def sync(self, ctx: DistContext) -> bool:
        """True on every rank if any rank was asked to stop (one small all-reduce; collective call)."""
        if ctx.is_distributed and ctx.world_size > 1:
            flag = torch.tensor([int(self._requested)], dtype=torch.int32, device=ctx.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                self._requested = True
        return self._requested

    def uninstall(self) -> None:
        """Restore the handlers that were in place before this object installed its own."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "StopSignal":
        """Use as a context manager that uninstalls the handlers."""
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()
