#!/usr/bin/env python
"""Stage 1: train an NVAE. `python scripts/train_nvae.py ...` or `torchrun --nproc_per_node=N scripts/train_nvae.py ...`."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nvae.stage1_command import add_stage1_args, run_stage1  # noqa: E402
from nvae.runtime.flags import DefaultsHelpFormatter  # noqa: E402
from nvae.runtime.process import run_entry  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    add_stage1_args(parser)
    args = parser.parse_args()
    run_entry(lambda ctx: run_stage1(args, ctx), args.device)


if __name__ == "__main__":
    main()
