"""Opt-in fault injection, to rehearse failures of a real cluster setup end to end (and for the tests).

Nothing changes unless one of these environment variables is set. They pass through torchrun, Slurm
and the container entry point untouched, so the command line of a job stays as it is:

- ``NVAE_FAULT_KILL_AT_STEP=N``: when it is about to run step N, the faulty rank exits at once with
  ``os._exit`` (no cleanup, no checkpoint; status ``NVAE_FAULT_EXIT_CODE``, default 1), as a crashed
  GPU or an OOM-killed process would. Only in a job's first attempt (``TORCHELASTIC_RESTART_COUNT``
  unset or 0), so an elastic restart gets past it.
- ``NVAE_FAULT_NAN_AT_STEP=SPEC``: every backward pass of the listed steps sees a NaN loss on the
  faulty rank, as an overflow would. SPEC lists steps and ranges: ``5``, ``5-7``, ``3,9-12``.
- ``NVAE_FAULT_RANK=R``: the faulty rank (default 0), or ``all``.

Steps count from 1, as in the logs: step N is the N-th optimisation step of the run.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch

from .precision import Precision

KILL_AT_STEP = "NVAE_FAULT_KILL_AT_STEP"
NAN_AT_STEP = "NVAE_FAULT_NAN_AT_STEP"
FAULT_RANK = "NVAE_FAULT_RANK"
FAULT_EXIT_CODE = "NVAE_FAULT_EXIT_CODE"
_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun: 0 in the first attempt


def _parse_steps(text: str) -> tuple[tuple[int, int], ...]:
    """'3,9-12' -> ((3, 3), (9, 12)): inclusive ranges of steps."""
    ranges = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or not (last or first).isdigit() or not 1 <= int(first) <= int(last or first):
            raise ValueError(f"{NAN_AT_STEP}={text!r}: expected steps >= 1 and ranges, e.g. '5', '5-7' or '3,9-12'")
        ranges.append((int(first), int(last or first)))
    return tuple(ranges)


def _parse_int(environ: Mapping[str, str], name: str, default: int, low: int) -> int:
    """An integer environment variable >= low, or `default` when unset."""
    text = environ.get(name, "").strip()
    if not text:
        return default
    if not text.lstrip("-").isdigit() or int(text) < low:
        raise ValueError(f"{name}={text!r}: expected an integer >= {low}")
    return int(text)


@dataclass(frozen=True)
class FaultPlan:
    """Which rank misbehaves, and how, at which steps."""

    kill_at_step: Optional[int]
    nan_ranges: tuple[tuple[int, int], ...]  # inclusive (first, last) step ranges
    rank: Optional[int]  # None: every rank
    exit_code: int
    first_attempt: bool

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Optional["FaultPlan"]:
        """The plan the NVAE_FAULT_* variables describe, or None when none is set."""
        kill_text, nan_text = environ.get(KILL_AT_STEP, "").strip(), environ.get(NAN_AT_STEP, "").strip()
        if not kill_text and not nan_text:
            return None
        rank_text = environ.get(FAULT_RANK, "").strip().lower()
        return cls(kill_at_step=_parse_int(environ, KILL_AT_STEP, 0, 1) if kill_text else None,
                   nan_ranges=_parse_steps(nan_text) if nan_text else (),
                   rank=None if rank_text == "all" else _parse_int(environ, FAULT_RANK, 0, 0),
                   exit_code=_parse_int(environ, FAULT_EXIT_CODE, 1, 1),
                   first_attempt=_parse_int(environ, _RESTART_COUNT, 0, 0) == 0)

    def poisons(self, step: int) -> bool:
        """True if step (counted from 1) gets a NaN loss."""
        return any(first <= step <= last for first, last in self.nan_ranges)

    def describe(self) -> str:
        """One line for the run log, so an injected failure is never mistaken for a real one."""
        who = "every rank" if self.rank is None else f"rank {self.rank}"
        parts = []
        if self.kill_at_step is not None:
            when = "" if self.first_attempt else " (not now: elastic restarts are spared)"
            parts.append(f"exit {self.exit_code} before step {self.kill_at_step}{when}")
        if self.nan_ranges:
            steps = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.nan_ranges)
            parts.append(f"NaN loss at steps {steps}")
        return f"FAULT INJECTION ({who}): " + "; ".join(parts)

    def wrap(self, task: Any, rank: int) -> Any:
        """`task` with this plan applied on `rank` (itself on ranks the plan leaves alone)."""
        if self.rank is not None and self.rank != rank:
            return task
        return FaultyTask(task, self)


@contextlib.contextmanager
def _nan_loss() -> Iterator[None]:
    """Every Precision.backward_and_step inside the block differentiates a NaN loss instead of the real one."""
    original = Precision.backward_and_step

    def poisoned(self: Precision, loss: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
        return original(self, loss * float("nan"), *args, **kwargs)

    Precision.backward_and_step = poisoned  # type: ignore[method-assign]
    try:
        yield
    finally:
        Precision.backward_and_step = original  # type: ignore[method-assign]


class FaultyTask:
    """A TrainTask that misbehaves as planned and otherwise is the task it wraps."""

    def __init__(self, task: Any, plan: FaultPlan) -> None:
        self._task, self._plan = task, plan

    def train_step(self, batch: torch.Tensor, step: int) -> Any:
        """The wrapped train_step, or a crash, or a step with a NaN loss; `step` counts steps done so far."""
        number = step + 1
        if number == self._plan.kill_at_step and self._plan.first_attempt:
            print(f"{self._plan.describe()}: exiting now", file=sys.stderr, flush=True)
            os._exit(self._plan.exit_code)
        if self._plan.poisons(number):
            with _nan_loss():
                return self._task.train_step(batch, step)
        return self._task.train_step(batch, step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


def inject_faults(task: Any, rank: int, environ: Mapping[str, str] = os.environ) -> tuple[Any, Optional[FaultPlan]]:
    """(task, None) normally; (the task wrapped for this rank, the plan) when NVAE_FAULT_* is set."""
    plan = FaultPlan.from_env(environ)
    return (task, None) if plan is None else (plan.wrap(task, rank), plan)
