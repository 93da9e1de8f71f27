"""The stage-1 command (`scripts/train_nvae.py`, and stage 1 of the one-job stage-2 script)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .runtime.flags import add_dataclass_args, add_run_args, overrides
from .config import PRESETS, ModelConfig, NVAERunConfig, TrainConfig, preset
from .data import dataset_info
from .runtime import RunLogger, StopSignal, resolve_resume, seed_everything
from .runtime.distributed import DistContext
from .train import model_config_for_dataset, resume_config, train_nvae

MODEL_PREFIX, TRAIN_PREFIX = "model_", "train_"


def add_stage1_args(parser: argparse.ArgumentParser, with_run_args: bool = True, flag_prefix: str = "") -> None:
    """Preset plus every ModelConfig / TrainConfig field as an override flag (optionally prefixed)."""
    if with_run_args:
        add_run_args(parser)
    parser.add_argument_group("preset").add_argument(
        f"--{flag_prefix}preset", dest="preset", default="tiny", choices=sorted(PRESETS),
        help="architecture and schedule to start from")
    add_dataclass_args(parser, TrainConfig, "stage-1 training and data", TRAIN_PREFIX, flag_prefix=flag_prefix)
    add_dataclass_args(parser, ModelConfig, "NVAE architecture", MODEL_PREFIX, flag_prefix=flag_prefix)


def explicit_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The stage-1 settings the user typed, by section."""
    return {"model": overrides(args, ModelConfig, MODEL_PREFIX), "train": overrides(args, TrainConfig, TRAIN_PREFIX)}


def build_stage1_config(args: argparse.Namespace) -> NVAERunConfig:
    """Preset, then the data set's image shape and likelihood, then the user's explicit values."""
    base = preset(args.preset)
    explicit = explicit_overrides(args)
    train = dataclasses.replace(base.train, **explicit["train"])
    train.validate()
    info = dataset_info(train.dataset, train.data_root)
    model = model_config_for_dataset(base.model, info, explicit["model"])
    model = dataclasses.replace(model, **explicit["model"])
    model.validate()
    return NVAERunConfig(model=model, train=train)


def run_stage1(args: argparse.Namespace, ctx: DistContext, run_dir: Path | None = None) -> int:
    """Build or restore the config, then train; returns the loop's exit status."""
    run_dir = Path(run_dir or args.save)
    resume = resolve_resume(args.resume, run_dir)
    run_cfg = build_stage1_config(args)
    if resume is not None:
        run_cfg = resume_config(resume, run_cfg, explicit_overrides(args))
    seed_everything(run_cfg.train.seed, ctx)
    logger = RunLogger(run_dir, ctx.is_main)
    try:
        logger.save_options({"command": vars(args), "config": dataclasses.asdict(run_cfg)})
        return train_nvae(run_cfg, ctx, run_dir, logger, resume, StopSignal())
    finally:
        logger.close()
