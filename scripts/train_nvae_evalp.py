#!/usr/bin/env python
"""Stage 2: fit the EVaLP prior to a frozen NVAE (`--vae CKPT`), or train both stages in one job.

`python scripts/train_nvae_evalp.py --save DIR [--vae CKPT]`, or under `torchrun --nproc_per_node=N` for DDP.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evalp_prior.cli import add_stage2_args, run_stage2  # noqa: E402
from nvae.entry import run_entry  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage2_args(parser)
    args = parser.parse_args()
    run_entry(lambda ctx: run_stage2(args, ctx), args.device)


if __name__ == "__main__":
    main()
