#!/usr/bin/env python
"""Sample images from a stage-1 (gaussian), stage-2 (evalp) or baseline (langevin, ncp) checkpoint.

By default the prior is the checkpoint's own; SIR (--sir) applies to evalp and ncp, the chain flags to langevin.
Example: python scripts/generate.py --checkpoint runs/mnist-evalp/checkpoint.pt --n 64 --sir 1000 --out samples.png
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evalp_prior.generation import add_prior_args, check_calibration_images  # noqa: E402
from evalp_prior.group_selection import parse_sir_groups  # noqa: E402
from nvae.runtime.flags import DefaultsHelpFormatter  # noqa: E402
from nvae.runtime.process import run_entry  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt of kind nvae, evalp, langevin or ncp")
    io.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid to write")
    io.add_argument("--npz", type=Path, default=None, help="also write the images as uint8 (N, H, W, C) .npz")
    io.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square)")
    io.add_argument("--data-root", default=None,
                    help="directory of the NVAE's data set if it moved since stage 1 (read only by --sir-temperature "
                         "calibrated; default: as stage 1 recorded)")
    sampling = add_prior_args(parser)
    sampling.add_argument("--n", type=int, default=64, help="number of images")
    sampling.add_argument("--batch-size", type=int, default=64, help="images per sampling call")
    sampling.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return parser.parse_args()


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible flags before loading anything."""
    for name in ("batch_size", "nrow"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.bn_batches < 0:
        raise ValueError(f"--bn-batches must be >= 0, got {args.bn_batches}")
    for flag, path in (("--out", args.out), ("--npz", args.npz)):
        if path is not None and path.is_dir():
            raise ValueError(f"{flag} {path} is a directory; give a file path")
    parse_sir_groups(args.sir_groups)
    check_calibration_images(args.sir_temperature, args.sir_calibration_images)


def main_with_context(args: argparse.Namespace, ctx) -> int:
    from evalp_prior.evaluation import calibrate_on_validation
    from evalp_prior.generation import (build_prior, compile_for_sampling, default_prior, describe_prior, generate,
                                        load_for_sampling, save_outputs)

    check_args(args)
    setup = load_for_sampling(args.checkpoint, ctx.device)
    if args.compile:
        compile_for_sampling(setup)
    prior_name = args.prior or default_prior(setup)
    prior, bn_prior = build_prior(setup, prior_name, args.sir, args.sir_weights, parse_sir_groups(args.sir_groups),
                                  args.sir_chunk, sir_temperature=args.sir_temperature,
                                  langevin_steps=args.langevin_steps,
                                  langevin_step_size=args.langevin_step_size)
    calibrate_on_validation(setup, prior, args.sir_calibration_images, args.batch_size, args.data_root, ctx.device)
    start = time.perf_counter()
    images = generate(setup.vae, prior, args.n, args.temperature, args.batch_size, args.bn_batches, args.seed, bn_prior)
    seconds = time.perf_counter() - start
    save_outputs(images, args.out, args.npz, args.nrow)
    described = describe_prior(prior_name, prior)
    print(f"wrote {args.out}: {args.n} images, prior {described}, temperature {args.temperature}, "
          f"{seconds:.1f} s ({seconds / args.n:.3f} s per image incl. BN re-adjustment)")
    return 0


def main() -> None:
    args = parse_args()
    run_entry(lambda ctx: main_with_context(args, ctx), args.device)


if __name__ == "__main__":
    main()
