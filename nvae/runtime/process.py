"""What every entry point does around its one call: path setup, distributed context, clean exit."""
from __future__ import annotations

import sys
import traceback
from typing import Callable

from .distributed import DistContext, init_distributed, shutdown_and_exit


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
