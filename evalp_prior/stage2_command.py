"""The stage-2 command (`scripts/train_nvae_evalp.py`): EVaLP on a frozen NVAE. The one-job mode (stage 1
first when no --vae is given) is the script's: this package never runs stage 1."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nvae.config import MAY_CHANGE_ON_RESUME
from nvae.runtime import CheckpointError, RunLogger, StopSignal, load_checkpoint, resolve_resume, seed_everything
from nvae.runtime.checkpoint import LATEST_NAME, check_resume
from nvae.runtime.distributed import DistContext
from nvae.runtime.flags import add_dataclass_args, add_run_args, overrides

from .config import EVaLPConfig, EVaLPRunConfig
from .train import load_vae_for_stage2, train_evalp

EVALP_PREFIX = "evalp_"
STAGE1_DIR = "vae"  # where the one-job mode trains stage 1, inside the stage-2 run directory
# Besides every run's cadence, how many SIR proposals the evaluation uses may change on resume.
MAY_CHANGE = MAY_CHANGE_ON_RESUME | {"eval_sir_proposals"}


def add_stage2_args(parser: argparse.ArgumentParser) -> None:
    """Run flags, --vae and the EVaLP settings."""
    add_run_args(parser)
    parser.add_argument_group("frozen NVAE").add_argument(
        "--vae", default=None,
        help=f"stage-1 checkpoint to freeze; without it stage 1 is trained first into SAVE/{STAGE1_DIR}")
    add_dataclass_args(parser, EVaLPConfig, "EVaLP prior and stage-2 training", EVALP_PREFIX)


def stage2_inputs(args: argparse.Namespace) -> tuple[Path, Path | None, Path]:
    """(run directory, checkpoint to resume or None, frozen NVAE checkpoint: --vae or the one-job stage-1 run's);
    the EVaLP flags are validated first, so a bad flag fails before any training."""
    run_dir = Path(args.save)
    dataclasses.replace(EVaLPConfig(), **overrides(args, EVaLPConfig, EVALP_PREFIX)).validate()
    vae_path = Path(args.vae) if args.vae else run_dir / STAGE1_DIR / LATEST_NAME
    return run_dir, resolve_resume(args.resume, run_dir), vae_path


def _check_resume(path: Path, requested: EVaLPRunConfig, explicit: dict) -> EVaLPRunConfig:
    """The stored stage-2 config; a different frozen NVAE or contradicting flags are errors."""
    saved = EVaLPRunConfig.from_json(load_checkpoint(path, expected_kind="evalp")["config"])
    if saved.vae_fingerprint != requested.vae_fingerprint:
        raise CheckpointError(
            f"{path} was trained on the NVAE {saved.vae_path} (fingerprint {saved.vae_fingerprint[:12]}), "
            f"but --vae {requested.vae_path} has fingerprint {requested.vae_fingerprint[:12]}; "
            "pass the NVAE it was trained on or start a new run directory")
    evalp = check_resume(path, {"evalp": saved.evalp}, {"evalp": explicit}, MAY_CHANGE)["evalp"]
    return dataclasses.replace(saved, evalp=evalp, vae_path=requested.vae_path)


def run_stage2(args: argparse.Namespace, ctx: DistContext) -> int:
    """EVaLP on the frozen NVAE of stage2_inputs; returns the exit status."""
    run_dir, resume, vae_path = stage2_inputs(args)
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
