#!/usr/bin/env python
"""Stage 2: fit the EVaLP prior to a frozen NVAE (`--vae CKPT`), or train both stages in one job.

`python scripts/train_nvae_evalp.py --save DIR [--vae CKPT]`, or under `torchrun --nproc_per_node=N` for DDP.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evalp_prior.stage2_command import STAGE1_DIR, add_stage2_args, run_stage2, stage2_inputs  # noqa: E402
from nvae.runtime.process import run_entry  # noqa: E402
from nvae.stage1_command import add_stage1_args, run_stage1  # noqa: E402


def one_job(args: argparse.Namespace, ctx) -> int:
    """Stage 1 into SAVE/vae first when no --vae is given (itself resumable, and skipped once a stage-2
    checkpoint shows it finished), then stage 2 on it."""
    run_dir, resume, _ = stage2_inputs(args)  # a bad EVaLP flag fails before stage 1 starts
    if args.vae is None and resume is None:
        status = run_stage1(args, ctx, run_dir / STAGE1_DIR)
        if status:
            return status
    return run_stage2(args, ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage2_args(parser)
    add_stage1_args(parser, with_run_args=False, flag_prefix="stage1-")  # the one-job mode's stage 1
    args = parser.parse_args()
    run_entry(lambda ctx: one_job(args, ctx), args.device)


if __name__ == "__main__":
    main()
