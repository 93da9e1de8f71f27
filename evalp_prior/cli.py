"""Command line of stage 2 (`scripts/train_nvae_evalp.py`): EVaLP on a frozen NVAE, or both stages in one job."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nvae.cli import add_dataclass_args, overrides
from nvae.runtime import CheckpointError, RunLogger, StopSignal, load_checkpoint, resolve_resume, seed_everything
from nvae.runtime.checkpoint import LATEST_NAME
from nvae.runtime.distributed import DistContext
from nvae.stage1_cli import add_run_args, add_stage1_args, run_stage1

from .config import EVaLPConfig, EVaLPRunConfig
from .train import load_vae_for_stage2, train_evalp

EVALP_PREFIX = "evalp_"
STAGE1_DIR = "vae"  # where the one-job mode trains stage 1, inside the stage-2 run directory
# Settings that only change the run's cadence, not what it computes: free to change on resume.
CADENCE = {"log_every", "eval_every", "ckpt_every", "keep_checkpoints", "num_workers", "max_bad_steps",
           "eval_batches", "bn_readjust_batches", "eval_sir_proposals", "data_root"}


def add_stage2_args(parser: argparse.ArgumentParser) -> None:
    """Run flags, --vae, the EVaLP settings, and the stage-1 settings (prefixed --stage1-) for the one-job mode."""
    add_run_args(parser)
    parser.add_argument_group("frozen NVAE").add_argument(
        "--vae", default=None,
        help=f"stage-1 checkpoint to freeze; without it stage 1 is trained first into SAVE/{STAGE1_DIR}")
    add_dataclass_args(parser, EVaLPConfig, "EVaLP prior and stage-2 training", EVALP_PREFIX)
    add_stage1_args(parser, with_run_args=False, flag_prefix="stage1-")


def _check_resume(path: Path, requested: EVaLPRunConfig, explicit: dict) -> EVaLPRunConfig:
    """The stored stage-2 config; a different frozen NVAE or contradicting flags are errors."""
    saved = EVaLPRunConfig.from_json(load_checkpoint(path, expected_kind="evalp")["config"])
    if saved.vae_fingerprint != requested.vae_fingerprint:
        raise CheckpointError(
            f"{path} was trained on the NVAE {saved.vae_path} (fingerprint {saved.vae_fingerprint[:12]}), "
            f"but --vae {requested.vae_path} has fingerprint {requested.vae_fingerprint[:12]}; "
            "pass the NVAE it was trained on or start a new run directory")
    problems = [f"{key}: checkpoint has {getattr(saved.evalp, key)!r}, command line asks {value!r}"
                for key, value in explicit.items() if key not in CADENCE and getattr(saved.evalp, key) != value]
    if problems:
        raise CheckpointError(f"{path} was trained with a different configuration:\n  " + "\n  ".join(problems)
                              + "\nDrop these flags to resume, or start a new run directory.")
    cadence = {k: v for k, v in explicit.items() if k in CADENCE}
    return dataclasses.replace(saved, evalp=dataclasses.replace(saved.evalp, **cadence), vae_path=requested.vae_path)


def run_stage2(args: argparse.Namespace, ctx: DistContext) -> int:
    """Train stage 1 if no --vae was given, then EVaLP on the frozen NVAE; returns the exit status."""
    run_dir = Path(args.save)
    resume = resolve_resume(args.resume, run_dir)
    dataclasses.replace(EVaLPConfig(), **overrides(args, EVaLPConfig, EVALP_PREFIX)).validate()  # before any work
    vae_path = Path(args.vae) if args.vae else run_dir / STAGE1_DIR / LATEST_NAME
    if args.vae is None and resume is None:
        # One job: stage 1 (itself resumable) unless a stage-2 checkpoint shows it already finished.
        status = run_stage1(args, ctx, run_dir / STAGE1_DIR)
        if status:
            return status
    vae, vae_cfg, fingerprint = load_vae_for_stage2(vae_path, ctx.device)
    explicit = overrides(args, EVaLPConfig, EVALP_PREFIX)
    run_cfg = EVaLPRunConfig(dataclasses.replace(EVaLPConfig(), **explicit), str(vae_path), fingerprint)
    if resume is not None:
        run_cfg = _check_resume(resume, run_cfg, explicit)
    seed_everything(run_cfg.evalp.seed, ctx)
    logger = RunLogger(run_dir, ctx.is_main)
    try:
        logger.save_options({"command": vars(args), "config": dataclasses.asdict(run_cfg)})
        return train_evalp(run_cfg, vae, vae_cfg, ctx, run_dir, logger, resume, StopSignal())
    finally:
        logger.close()
