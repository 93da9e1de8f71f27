"""The training loop shared by stage 1 (NVAE) and stage 2 (a prior on a frozen NVAE).

A task owns the maths (one optimisation step, evaluation, its state); the loop owns the run: data
order with mid-epoch resume, logging cadence, checkpoints, pre-emption and non-finite steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from nvae.config import RunCadence

from .checkpoint import (FORMAT_VERSION, CheckpointManager, capture_rng_state, load_checkpoint,
                         restore_rng_state)
from .distributed import DistContext, all_gather_object, barrier, forked_rng
from .faults import inject_faults
from .run_logging import RunLogger, progress
from .sampler import ResumableDistributedSampler
from .signals import PREEMPTED_EXIT_CODE, StopSignal, ignore_stop_signals

NON_FINITE_EXIT_CODE = 3  # the run stopped after too many non-finite steps in a row


class TrainTask(Protocol):
    """What the loop needs from a stage's maths."""

    kind: str  # checkpoint kind, e.g. 'nvae'

    def train_step(self, batch: torch.Tensor, step: int) -> Optional[Mapping[str, torch.Tensor]]:
        """One optimisation step; detached metrics, or None when the step was skipped as non-finite."""
        ...

    def evaluate(self, step: int) -> Mapping[str, float]:
        """Validation metrics (collective: every rank calls it); may log images through the task."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    def config_json(self) -> str:
        ...


@dataclass(kw_only=True)
class LoopSettings(RunCadence):
    """Cadence and data settings of a run."""

    total_steps: int
    batch_size: int
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the command-line flag of the first impossible setting."""
        for name, low in (("batch_size", 1), ("log_every", 1), ("ckpt_every", 1), ("max_bad_steps", 1),
                          ("eval_every", 0), ("keep_checkpoints", 0), ("num_workers", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.total_steps < 1:
            raise ValueError(f"the run has {self.total_steps} steps; set --max-steps or --epochs to at least 1")


def loop_settings(cfg: Any, total_steps: int) -> LoopSettings:
    """Cadence from a stage's config (any object with LoopSettings' field names, e.g. TrainConfig)."""
    names = [f.name for f in dataclasses.fields(LoopSettings) if f.name != "total_steps"]
    return LoopSettings(total_steps=total_steps, **{name: getattr(cfg, name) for name in names})


def planned_steps(cfg: Any, per_epoch: int) -> int:
    """cfg.max_steps when positive, else cfg.epochs full passes over the data."""
    if cfg.max_steps < 0 or cfg.epochs < 0:
        raise ValueError(f"--max-steps and --epochs must be >= 0, got {cfg.max_steps} and {cfg.epochs}")
    steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * per_epoch
    if steps == 0:
        raise ValueError("nothing to train: set --epochs or --max-steps to a positive value")
    return steps


def steps_per_epoch(dataset_len: int, world_size: int, batch_size: int) -> int:
    """Optimisation steps in one pass over the data (drop_last on every rank)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    steps = dataset_len // world_size // batch_size
    if steps == 0:
        raise ValueError(f"a data set of {dataset_len} images cannot fill one batch of {batch_size} on "
                         f"each of {world_size} process(es); lower --batch-size")
    return steps


def isolated_rng(ctx: DistContext) -> contextlib.AbstractContextManager:
    """Evaluation and sampling draw from a forked RNG so they never change the training stream."""
    return forked_rng(ctx.device)


def run_training(task: TrainTask, dataset: Dataset, ctx: DistContext, settings: LoopSettings,
                 run_dir: Path, logger: RunLogger, resume: Optional[Path] = None,
                 stop: Optional[StopSignal] = None) -> int:
    """Train until settings.total_steps; returns 0, PREEMPTED_EXIT_CODE or NON_FINITE_EXIT_CODE."""
    settings.validate()
    manager = CheckpointManager(run_dir, settings.keep_checkpoints)
    if ctx.is_main:
        for stale in manager.remove_stale_temporaries():
            logger.info(f"removed {stale.name}, left by a checkpoint save that was killed")
    per_epoch = steps_per_epoch(len(dataset), ctx.world_size, settings.batch_size)
    task, faults = inject_faults(task, ctx.rank)
    if faults is not None:
        logger.info(faults.describe())
    step, epoch, batch_in_epoch = 0, 0, 0
    if resume is not None:
        payload = load_checkpoint(resume, expected_kind=task.kind, map_location=ctx.device)
        task.load_state_dict(payload["task"])
        step, epoch, batch_in_epoch = int(payload["step"]), int(payload["epoch"]), int(payload["batch_in_epoch"])
        rng = payload["rng"]
        if int(payload["world_size"]) == ctx.world_size:
            restore_rng_state(rng[ctx.rank])
        else:  # a different world size cannot replay the same streams; keep the data order at least
            logger.info(f"resuming on {ctx.world_size} processes from a {payload['world_size']}-process run: "
                        "random streams restart, data order continues")
        logger.info(f"resumed from {resume} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    sampler = ResumableDistributedSampler(len(dataset), ctx.world_size, ctx.rank, shuffle=True,
                                          seed=settings.seed, drop_last=True)
    stop = stop or StopSignal()
    bad_in_a_row, skipped = 0, 0
    # What a stop after non-finite steps points the user to: the newest checkpoint of this run.
    last_good = f"{resume} (step {step})" if resume is not None else "none written yet"

    def save() -> Path:
        rngs = all_gather_object(capture_rng_state(), ctx)
        payload = {"kind": task.kind, "format_version": FORMAT_VERSION, "config": task.config_json(),
                   "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                   "world_size": ctx.world_size, "rng": rngs, "task": task.state_dict()}
        path = manager.save(payload, step) if ctx.is_main else manager.run_dir / "checkpoint.pt"
        # No rank leaves before the file is in place: after a stop, torchrun takes the first rank to exit
        # as a failure and SIGKILLs the others once its shutdown timeout is over, rank 0 mid-write included.
        barrier(ctx)
        return path

    last_eval_step = -1

    def evaluate() -> None:
        nonlocal last_eval_step
        last_eval_step = step
        with isolated_rng(ctx):
            metrics = task.evaluate(step)
        logger.scalars(step, {f"val/{k}": v for k, v in metrics.items()})
        logger.info(f"step {step} validation: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    bar = progress(settings.total_steps, f"{task.kind} training", ctx.is_main)
    bar.update(step)
    status = 0
    while step < settings.total_steps:
        if batch_in_epoch >= per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
        sampler.set_epoch(epoch, batch_in_epoch * settings.batch_size)
        # A private generator keeps DataLoader from drawing on the global RNG that checkpoints restore.
        loader = DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, drop_last=True,
                            num_workers=settings.num_workers, pin_memory=ctx.device.type == "cuda",
                            generator=torch.Generator(),
                            worker_init_fn=ignore_stop_signals if settings.num_workers > 0 else None)
        for batch in loader:
            metrics = task.train_step(batch.to(ctx.device, non_blocking=True), step)
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            bar.update(1)
            if metrics is None:
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                logger.scalars(step, {"skipped_steps": skipped})
                logger.info(f"step {step}: non-finite loss or gradient, step skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= settings.max_bad_steps:
                    logger.info(f"stopping at step {step}: {bad_in_a_row} non-finite steps in a row "
                                f"(--max-bad-steps {settings.max_bad_steps}); last good checkpoint: {last_good}")
                    status = NON_FINITE_EXIT_CODE
                    break
            else:
                bad_in_a_row = 0
                if step % settings.log_every == 0 or step == settings.total_steps:
                    values = {k: float(v) for k, v in metrics.items()}
                    logger.scalars(step, values)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:3]})
                if (step % settings.eval_every == 0) if settings.eval_every else (batch_in_epoch == per_epoch):
                    evaluate()
            # A skipped step is still a step: pre-emption and the end of the run apply after it too.
            if stop.sync(ctx):
                reason = stop.signal_name or "a stop request"  # before save(): torchrun may signal again
                path = save()
                logger.info(f"received {reason}: checkpoint written at step {step} to {path}; "
                            "resume with --resume auto")
                status = PREEMPTED_EXIT_CODE
                break
            if (metrics is not None and step % settings.ckpt_every == 0) or step == settings.total_steps:
                last_good = f"{save()} (step {step})"
            if step >= settings.total_steps:
                break
        if status:
            break
    bar.close()
    if status == 0 and last_eval_step != step:
        evaluate()  # the final state is always validated once
    return status
