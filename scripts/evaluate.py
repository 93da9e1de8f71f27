#!/usr/bin/env python
"""Evaluate a prior on a frozen NVAE: FID, top-group prior-hole MMD, sampling time, importance-weighted NLL.

Accepts stage-1 (gaussian), stage-2 (evalp) and baseline (langevin, ncp) checkpoints; by default the prior
is the checkpoint's own. Writes a JSON report (atomically) and prints a table.
Example: python scripts/evaluate.py --checkpoint runs/mnist-evalp/checkpoint.pt --fid 10000 --mmd --nll 1000 --timing
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evalp_prior.generation import add_prior_args  # noqa: E402
from evalp_prior.group_selection import parse_sir_groups  # noqa: E402
from evalp_prior.metrics.nll import DEFAULT_LOG_Z_ITEM_SAMPLES, DEFAULT_LOG_Z_SAMPLES  # noqa: E402
from nvae.runtime.flags import DefaultsHelpFormatter  # noqa: E402
from nvae.runtime.process import run_entry  # noqa: E402

FULL_FID = 50000  # `--fid` without a number: the standard sample count (a GPU job)
FULL_NLL = 1000  # `--nll` without a number: NVAE's importance-sample count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt of kind nvae, evalp, langevin or ncp")
    io.add_argument("--out", type=Path, default=None, help="JSON report (default: CHECKPOINT_DIR/eval_<prior label>.json, e.g. eval_evalp+sir100.json)")
    io.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_prior_args(parser)
    metrics = parser.add_argument_group("metrics (at least one)")
    metrics.add_argument("--fid", type=int, nargs="?", const=FULL_FID, default=None, metavar="N",
                         help=f"FID, KID (+- stderr) and precision/recall of N generated images (no N: {FULL_FID})")
    metrics.add_argument("--fid-batch", type=int, default=64, help="images per generation / feature batch")
    metrics.add_argument("--fid-ref-images", type=int, default=10000, help="images in the reference statistics")
    metrics.add_argument("--fid-reference", choices=("train", "validation"), default="train",
                         help="FID/KID/precision-recall reference images: the training split (reported numbers) or "
                              "the validation half of the test split (for choices; at most its 5000 images on MNIST)")
    metrics.add_argument("--fid-stats-dir", type=Path, default=Path("runs/fid_stats"),
                         help="cache of reference statistics, shared by runs on the same data")
    metrics.add_argument("--mmd", action="store_true", help="top-group prior-hole MMD against encoded test images")
    metrics.add_argument("--mmd-samples", type=int, default=1000, help="posterior and prior samples for the MMD")
    metrics.add_argument("--nll", type=int, nargs="?", const=FULL_NLL, default=None, metavar="K",
                         help=f"importance-weighted NLL and ELBO with K posterior samples per image, under the Gaussian "
                              f"prior and the evaluated prior's density where it has one (no K: {FULL_NLL})")
    metrics.add_argument("--nll-images", type=int, default=1000, help="test images for the NLL")
    metrics.add_argument("--log-z-samples", type=int, default=DEFAULT_LOG_Z_SAMPLES,
                         help="proposals for an energy prior's normaliser Z shared by all images (the top group)")
    metrics.add_argument("--log-z-item-samples", type=int, default=DEFAULT_LOG_Z_ITEM_SAMPLES,
                         help="proposals per posterior sample for Z(h) of a context-conditioned group")
    metrics.add_argument("--nll-chunk", type=int, default=16, help="importance samples per posterior pass")
    metrics.add_argument("--timing", action="store_true", help="seconds per generated image")
    metrics.add_argument("--timing-batch", type=int, default=64, help="images per timed sampling call")
    metrics.add_argument("--timing-repeats", type=int, default=5, help="timed calls; the median is reported")
    metrics.add_argument("--batch-size", type=int, default=64, help="images per posterior pass (MMD, NLL)")
    metrics.add_argument("--data-root", default=None,
                         help="directory of the NVAE's data set if it moved since stage 1 (default: as stage 1 recorded)")
    metrics.add_argument("--split", choices=("validation", "test"), default="test",
                         help="half of the test split the MMD and NLL use: validation (first half, for choices) "
                              "or test (second half, for reported numbers)")
    return parser.parse_args(argv)


def build_request(args: argparse.Namespace):
    """The EvalRequest the flags describe (validated)."""
    from evalp_prior.evaluation import EvalRequest
    from evalp_prior.generation import check_calibration_images

    if args.fid is not None and args.fid < 2:
        raise ValueError(f"--fid needs at least 2 samples, got {args.fid}")
    if args.nll is not None and args.nll < 1:
        raise ValueError(f"--nll needs K >= 1 importance samples, got {args.nll}")
    check_calibration_images(args.sir_temperature, args.sir_calibration_images)
    req = EvalRequest(prior=args.prior, fid_samples=args.fid or 0, fid_batch=args.fid_batch,
                      fid_ref_images=args.fid_ref_images, fid_reference=args.fid_reference,
                      fid_stats_dir=args.fid_stats_dir, mmd=args.mmd,
                      mmd_samples=args.mmd_samples, nll_samples=args.nll or 0, nll_images=args.nll_images,
                      nll_chunk=args.nll_chunk, log_z_samples=args.log_z_samples,
                      log_z_item_samples=args.log_z_item_samples, timing=args.timing, timing_batch=args.timing_batch,
                      timing_repeats=args.timing_repeats, sir=args.sir, sir_weights=args.sir_weights,
                      sir_groups=parse_sir_groups(args.sir_groups), sir_chunk=args.sir_chunk,
                      sir_temperature=args.sir_temperature, sir_calibration_images=args.sir_calibration_images,
                      langevin_steps=args.langevin_steps, langevin_step_size=args.langevin_step_size,
                      temperature=args.temperature, bn_batches=args.bn_batches, batch_size=args.batch_size,
                      data_root=args.data_root, split=args.split, seed=args.seed,
                      compile=args.compile)
    req.validate()
    return req


def main_with_context(args: argparse.Namespace, ctx) -> int:
    from evalp_prior.evaluation import evaluate_checkpoint, finite_or_none, format_report
    from nvae.runtime import save_text_atomic

    if ctx.world_size > 1:
        raise ValueError("evaluate.py runs as one process: start it with python, not torchrun")
    req = build_request(args)  # before loading anything: a bad flag fails fast
    report = finite_or_none(evaluate_checkpoint(args.checkpoint, req, ctx.device))
    out = args.out or args.checkpoint.parent / f"eval_{report['label']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_text_atomic(out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(format_report(report))
    print(f"wrote {out}")
    return 0


def main() -> None:
    args = parse_args()
    run_entry(lambda ctx: main_with_context(args, ctx), args.device)


if __name__ == "__main__":
    main()
