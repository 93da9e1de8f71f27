#!/usr/bin/env python
"""Sample images from a stage-1 (Gaussian prior) or stage-2 (EVaLP prior) checkpoint, optionally with SIR.

Example: python scripts/generate.py --checkpoint runs/mnist-evalp/checkpoint.pt --n 64 --sir 1000 --out samples.png
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nvae.entry import run_entry  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--checkpoint", required=True, type=Path, help="stage-1 or stage-2 checkpoint.pt")
    io.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid to write")
    io.add_argument("--npz", type=Path, default=None, help="also write the images as uint8 (N, H, W, C) .npz")
    io.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--n", type=int, default=64, help="number of images")
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--prior", choices=("gaussian", "evalp"), default=None,
                          help="default: evalp for a stage-2 checkpoint, gaussian for a stage-1 one")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--batch-size", type=int, default=64)
    sampling.add_argument("--bn-batches", type=int, default=20, help="BN re-adjustment batches (0: off)")
    sampling.add_argument("--device", default="auto")
    sir = parser.add_argument_group("sampling-importance-resampling (EVaLP only)")
    sir.add_argument("--sir", type=int, default=None, metavar="M", help="proposals per image (e.g. 1000)")
    sir.add_argument("--sir-weights", choices=("exact", "energy"), default="exact",
                     help="exact: -E + log p0 - log q (towards p_psi); energy: -E (the authors' variant)")
    sir.add_argument("--sir-groups", default=None, help="'all' or comma-separated EVaLP groups (default: the top one)")
    sir.add_argument("--sir-chunk", type=int, default=100, help="proposals per image evaluated at once (memory bound)")
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
    if args.sir_groups is not None and args.sir_groups != "all" and not re.fullmatch(r"[0-9]+(,[0-9]+)*", args.sir_groups):
        raise ValueError(f"--sir-groups must be 'all' or comma-separated group indices, got {args.sir_groups!r}")


def main_with_context(args: argparse.Namespace, ctx) -> int:
    from evalp_prior.generation import build_prior, generate, load_for_sampling, save_outputs

    check_args(args)
    setup = load_for_sampling(args.checkpoint, ctx.device)
    prior_name = args.prior or ("evalp" if setup.evalp is not None else "gaussian")
    sir_groups = None
    if args.sir_groups is not None:
        if setup.evalp is None:
            raise ValueError("--sir-groups needs a stage-2 checkpoint")
        sir_groups = setup.evalp.groups if args.sir_groups == "all" else [int(g) for g in args.sir_groups.split(",")]
    prior, bn_prior = build_prior(setup, prior_name, args.sir, args.sir_weights, sir_groups, args.sir_chunk)
    start = time.perf_counter()
    images = generate(setup.vae, prior, args.n, args.temperature, args.batch_size, args.bn_batches, args.seed, bn_prior)
    seconds = time.perf_counter() - start
    save_outputs(images, args.out, args.npz, args.nrow)
    sir_text = f", SIR M={args.sir} ({args.sir_weights})" if args.sir else ""
    print(f"wrote {args.out}: {args.n} images, prior {prior_name}{sir_text}, temperature {args.temperature}, "
          f"{seconds:.1f} s ({seconds / args.n:.3f} s per image incl. BN re-adjustment)")
    return 0


def main() -> None:
    args = parse_args()
    run_entry(lambda ctx: main_with_context(args, ctx), args.device)


if __name__ == "__main__":
    main()
