#!/usr/bin/env python
"""Sweep EVaLP settings on ONE frozen NVAE and print what decides them, measured on the validation split.

Every setting is a name plus EVaLPConfig overrides (`--setting NAME key=value,key=value`; an empty list is
the defaults), run for every seed of `--seeds`. Each run trains stage 2 from scratch into OUT/NAME/seedS
(reused when its checkpoint is complete, so an interrupted sweep continues), then measures on the
validation half of the test split (`--split`; never the reported half): per group the energy gap, the
critic's gradient norms, KL(q_alpha || p0) and the MMD^2 of the sampler and of NVAE's Gaussian prior
(with standard errors), all from training's last evaluation; and the top group's MMD^2 on `--mmd-samples`
encoded images with its two-sample noise floor (scripts/evaluate.py's estimator), for the sampler alone and
for SIR with every M of `--sir` and weighting of `--sir-weights`.
Prints one table (mean +- standard deviation over seeds) and writes OUT/sweep.json.

Example (docs/results.md):
    python benchmarks/sweep_evalp.py --vae runs/small/checkpoint.pt --out runs/sweep_small --steps 1500 \\
        --setting default "" --setting whiten "whiten_critic=true" --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from evalp_prior.config import EVaLPConfig, EVaLPRunConfig  # noqa: E402
from nvae.runtime.flags import parse_overrides  # noqa: E402
from evalp_prior.evaluation import EvalRequest, evaluate_checkpoint  # noqa: E402
from evalp_prior.train import load_vae_for_stage2, train_evalp  # noqa: E402
from nvae.runtime import RunLogger, init_distributed, load_checkpoint, save_text_atomic, seed_everything  # noqa: E402
from nvae.runtime.checkpoint import LATEST_NAME  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, nargs="+", required=True,
                        help="stage-1 checkpoints to freeze (e.g. one per stage-1 seed); every setting runs on each")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory (one run directory per setting and seed)")
    parser.add_argument("--setting", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True,
                        help="a named setting: EVaLPConfig overrides 'field=value,...' ('' = the defaults)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="stage-2 seeds per setting")
    parser.add_argument("--steps", type=int, default=1500, help="stage-2 training steps of every run")
    parser.add_argument("--mmd-samples", type=int, default=2000, help="encoded images for the top-group MMD^2")
    parser.add_argument("--sir", type=int, nargs="*", default=[100], help="SIR proposal counts M, one MMD column each")
    parser.add_argument("--sir-weights", nargs="*", choices=("exact", "energy"), default=["exact"],
                        help="SIR weightings, one MMD column per weighting and M")
    parser.add_argument("--split", choices=("validation", "test"), default="validation",
                        help="held-out half the MMD is measured on (sweeps choose on validation)")
    parser.add_argument("--fid", type=int, default=0,
                        help="also FID of this many samples for NVAE's prior, the sampler and every SIR column (0: skip)")
    parser.add_argument("--fid-ref-images", type=int, default=10000, help="training images in the FID reference statistics")
    parser.add_argument("--fid-stats-dir", type=Path, default=Path("runs/fid_stats"), help="cache of FID reference statistics")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def column_requests(args: argparse.Namespace, seed: int) -> list[tuple[str, EvalRequest]]:
    """(column, evaluation) of one run: the sampler alone, then SIR at every M and weighting."""
    common = dict(mmd=True, mmd_samples=args.mmd_samples, split=args.split, seed=seed, fid_samples=args.fid,
                  fid_ref_images=args.fid_ref_images, fid_stats_dir=args.fid_stats_dir)
    return [("sampler", EvalRequest(**common))] + [(f"sir{m}_{w}", EvalRequest(sir=m, sir_weights=w, **common))
                                                  for m in args.sir for w in args.sir_weights]


def run_one(args: argparse.Namespace, vae_path: Path, overrides: dict[str, Any], seed: int, run_dir: Path,
            ctx) -> dict[str, Any]:
    """Train (or reuse) one stage-2 run and measure it; returns its row of the sweep."""
    ckpt = run_dir / LATEST_NAME
    settings = {"max_steps": args.steps, "seed": seed, **overrides}
    seconds = None
    if not (ckpt.exists() and load_checkpoint(ckpt, "evalp")["step"] >= args.steps
            and (run_dir / "final_metrics.json").exists()):
        if run_dir.exists():
            raise SystemExit(f"error: {run_dir} holds an incomplete run; remove it to rerun")
        vae, vae_cfg, fingerprint = load_vae_for_stage2(vae_path, ctx.device)
        run_cfg = EVaLPRunConfig(EVaLPConfig(**settings), str(vae_path), fingerprint)
        run_cfg.evalp.validate()
        seed_everything(seed, ctx)
        start = time.perf_counter()
        with RunLogger(run_dir, ctx.is_main) as logger:
            if train_evalp(run_cfg, vae, vae_cfg, ctx, run_dir, logger) != 0:
                raise SystemExit(f"error: stage 2 in {run_dir} did not finish")
        seconds = time.perf_counter() - start
    final = json.loads((run_dir / "final_metrics.json").read_text())
    row: dict[str, Any] = {"train_seconds": seconds, "final": final}
    for label, req in column_requests(args, seed):
        metrics = evaluate_checkpoint(ckpt, req, ctx.device)["metrics"]
        top = metrics["mmd"]["top"]
        row[label] = {"mmd2_multi": top["mmd2_multi"], "stderr": top["mmd2_multi_stderr"],
                      "gaussian": top["gaussian"]["mmd2_multi"], "gaussian_stderr": top["gaussian"]["mmd2_multi_stderr"],
                      "noise_floor": top["gaussian"]["null_std_multi"],
                      "groups": [{"mmd2_multi": g["mmd2_multi"], "stderr": g["mmd2_multi_stderr"],
                                  "gaussian": g["gaussian"]["mmd2_multi"], "noise_floor": g["gaussian"]["null_std_multi"]}
                                 for g in metrics["mmd"]["groups"]]}
        if args.fid:
            row[label]["fid"] = metrics["fid"]["fid"]
    if args.fid:
        fid = dict(fid_samples=args.fid, fid_ref_images=args.fid_ref_images, fid_stats_dir=args.fid_stats_dir)
        row["gaussian_fid"] = evaluate_checkpoint(ckpt, EvalRequest(prior="gaussian", seed=seed, **fid),
                                                  ctx.device)["metrics"]["fid"]["fid"]
    return row


def spread(values: list[float]) -> str:
    """'mean +- std' over seeds (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} +- {statistics.stdev(values):.2g}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    ctx = init_distributed("cpu")
    settings = [(name, parse_overrides(text, EVaLPConfig)) for name, text in args.setting]
    results: dict[str, Any] = {}
    for name, overrides in settings:
        for v, vae_path in enumerate(args.vae):
            for seed in args.seeds:
                run = f"seed{seed}" if len(args.vae) == 1 else f"vae{v}_seed{seed}"
                results[f"{name}/{run}"] = {"setting": name, "overrides": overrides, "seed": seed, "vae": str(vae_path),
                                            **run_one(args, vae_path, overrides, seed, args.out / name / run, ctx)}
                save_text_atomic(args.out / "sweep.json", json.dumps(
                    {"vae": [str(p) for p in args.vae], "steps": args.steps, "mmd_samples": args.mmd_samples,
                     "split": args.split, "sir": args.sir, "sir_weights": args.sir_weights, "fid": args.fid,
                     "fid_ref_images": args.fid_ref_images, "runs": results}, indent=2, sort_keys=True) + "\n")

    sir_columns = [f"sir{m}_{w}" for m in args.sir for w in args.sir_weights]
    header = ("| setting | MMD^2 z_1 sampler | / Gaussian | " + "".join(f"{c} / Gaussian | " for c in sir_columns)
              + "Gaussian MMD^2 z_1 | noise floor | max energy gap over groups | KL(q||p0) top | runs |"
              + (" FID Gaussian | FID sampler | " + "".join(f"FID {c} | " for c in sir_columns) if args.fid else ""))
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for name, _ in settings:
        runs = [r for r in results.values() if r["setting"] == name]
        top = f"group{min(int(k.split('group')[1]) for k in runs[0]['final'] if k.startswith('energy_gap/group')):02d}"
        sampler = [r["sampler"]["mmd2_multi"] for r in runs]
        gauss = [r["sampler"]["gaussian"] for r in runs]
        ratio = [s / g for s, g in zip(sampler, gauss)]
        sir = "".join(spread([r[c]["mmd2_multi"] / r[c]["gaussian"] for r in runs]) + " | " for c in sir_columns)
        print(f"| {name} | {spread(sampler)} | {spread(ratio)} | {sir}{spread(gauss)} | "
              f"{spread([r['sampler']['noise_floor'] for r in runs])} | "
              f"{spread([r['final']['energy_gap_max'] for r in runs])} | "
              f"{spread([r['final'][f'kl_sampler_p0/{top}'] for r in runs])} | {len(runs)} |"
              + (f" {spread([r['gaussian_fid'] for r in runs])} | "
                 + "".join(spread([r[c]['fid'] for r in runs]) + " | " for c in ["sampler", *sir_columns])
                 if args.fid else ""))
    print(f"wrote {args.out / 'sweep.json'}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
