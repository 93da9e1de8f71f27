#!/usr/bin/env python
"""Compare priors on ONE frozen NVAE: Gaussian, EVaLP (with and without SIR), Langevin-MCMC EBM, NCP + SIR.

Trains a `tiny` (default) or `mnist` NVAE on bundled MNIST (or reuses --vae), fits EVaLP (with the
defaults of evalp_prior/config.py), the Langevin energy prior and the NCP classifiers on it for the same
number of steps, then prints one table: FID (N samples vs reference training images), top-group
prior-hole MMD^2 (one posterior-set kernel for all rows), seconds per image (all rows timed round-robin)
and its ratio to the Gaussian prior. Every stage's checkpoint is reused when present in --out, so an
interrupted run continues and a rerun with extra rows only trains what is new.

CPU default (docs/results.md: 14 min on two idle cores with --sir 100 1000 --evalp-kl-weights 0.001 1 --threads 2):
    python benchmarks/compare_priors.py --out runs/compare_priors
GPU scale-up example:
    python benchmarks/compare_priors.py --preset mnist --vae-steps 60000 --prior-steps 20000 --fid-samples 10000 \\
        --fid-ref-images 60000 --mmd-samples 5000 --sir 100 1000 --out runs/compare_priors_mnist
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from evalp_prior.baselines import langevin_run_config, ncp_run_config, train_langevin, train_ncp  # noqa: E402
from evalp_prior.config import EVaLPConfig, EVaLPRunConfig  # noqa: E402
from evalp_prior.evaluation import EvalRequest, EvalResources, bn_adjusted, evaluate_prior  # noqa: E402
from evalp_prior.generation import build_prior, load_for_sampling  # noqa: E402
from evalp_prior.metrics.timing import seconds_per_image  # noqa: E402
from evalp_prior.train import load_vae_for_stage2, train_evalp  # noqa: E402
from nvae.config import preset  # noqa: E402
from nvae.model import NVAE  # noqa: E402
from nvae.runtime import RunLogger, init_distributed, load_checkpoint, save_text_atomic, seed_everything  # noqa: E402
from nvae.runtime.checkpoint import LATEST_NAME  # noqa: E402
from nvae.train import train_nvae  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/compare_priors"), help="run directory")
    parser.add_argument("--preset", choices=("tiny", "mnist"), default="tiny")
    parser.add_argument("--vae", type=Path, default=None, help="reuse this stage-1 checkpoint instead of training one")
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--prior-steps", type=int, default=250, help="training steps of every prior")
    parser.add_argument("--prior-batch", type=int, default=64)
    parser.add_argument("--langevin-steps", type=int, default=20, help="K at training and generation")
    parser.add_argument("--langevin-step-size", type=float, default=0.05, help="s (noise sqrt(2 s))")
    parser.add_argument("--sir", type=int, nargs="+", default=[100], help="EVaLP SIR proposal counts (rows)")
    parser.add_argument("--ncp-sir", type=int, default=100, help="NCP SIR proposals (every group)")
    parser.add_argument("--evalp-kl-weights", type=float, nargs="*", default=[],
                        help="extra EVaLP rows trained with these w_kl (SPEC: measure 1e-3 and 1 besides the default)")
    parser.add_argument("--fid-samples", type=int, default=200)
    parser.add_argument("--fid-ref-images", type=int, default=1000)
    parser.add_argument("--mmd-samples", type=int, default=1000)
    parser.add_argument("--timing-batch", type=int, default=64)
    parser.add_argument("--timing-rounds", type=int, default=7, help="round-robin timing rounds (median taken)")
    parser.add_argument("--bn-batches", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 behaves best on a shared machine)")
    return parser.parse_args()


def _stage(path: Path, name: str, config_json: str, total_steps: int, train, seconds: dict[str, Any]) -> Path:
    """Train into path (resuming a partial run) and record its seconds; a finished checkpoint is reused.

    A checkpoint trained with another configuration (e.g. before a default changed) is an error, never
    silently reused: the table must describe the settings it reports.
    """
    ckpt = path / LATEST_NAME
    resume = None
    if ckpt.is_file():
        payload = load_checkpoint(ckpt, map_location="cpu")
        if json.loads(payload["config"]) != json.loads(config_json):
            raise SystemExit(f"[{name}] {ckpt} was trained with a different configuration than this run asks for "
                             f"(a changed default or flag); move {path} away or use another --out")
        if int(payload["step"]) >= total_steps:
            print(f"[{name}] reusing {ckpt}", flush=True)
            seconds[name] = "reused"
            return ckpt
        resume = ckpt
    start = time.perf_counter()
    with RunLogger(path, True) as logger:
        status = train(logger, resume)
    if status != 0:
        raise SystemExit(f"[{name}] training stopped with status {status}")
    seconds[name] = time.perf_counter() - start
    print(f"[{name}] trained in {seconds[name]:.0f} s", flush=True)
    return ckpt


def interleaved_timing(rows: list[tuple[str, Any, Any]], vae: NVAE, args: argparse.Namespace,
                       device: torch.device) -> dict[str, dict[str, Any]]:
    """Seconds per image of every row's NVAE.sample at one batch size, timed round-robin (one call per row
    per round after a warm-up call, median over rounds) so that a shared machine's changing load hits
    every row alike and the ratios stay meaningful."""
    torch.manual_seed(args.seed)
    models = {label: bn_adjusted(vae, bn if bn is not None else hook, args.bn_batches, args.timing_batch, 1.0)
              for label, hook, bn in rows}
    calls: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    with torch.no_grad():
        for r in range(args.timing_rounds):
            for label, hook, _ in rows:
                t = seconds_per_image(lambda m=models[label], h=hook: m.sample(args.timing_batch, 1.0, h),
                                      args.timing_batch, warmup=1 if r == 0 else 0, repeats=1, device=device)
                calls[label].append(t["seconds_per_batch"])
    return {label: {"seconds_per_image": statistics.median(c) / args.timing_batch, "call_seconds": c,
                    "batch_size": args.timing_batch, "rounds": args.timing_rounds} for label, c in calls.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, Any] = {}  # training seconds per stage, or 'reused'

    if args.vae is None:
        cfg = preset(args.preset)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, dataset="mnist", max_steps=args.vae_steps, batch_size=args.vae_batch, seed=args.seed,
            eval_batches=5, bn_readjust_batches=5, ckpt_every=max(args.vae_steps // 4, 1)))
        seed_everything(args.seed, ctx)
        vae_path = _stage(out / "vae", "nvae", cfg.to_json(), args.vae_steps,
                          lambda logger, resume: train_nvae(cfg, ctx, out / "vae", logger, resume), timings)
    else:
        vae_path = args.vae
    vae, vae_cfg, fingerprint = load_vae_for_stage2(vae_path, ctx.device)
    common = dict(batch_size=args.prior_batch, max_steps=args.prior_steps, seed=args.seed, eval_batches=4,
                  bn_readjust_batches=args.bn_batches, ckpt_every=max(args.prior_steps // 2, 1))

    evalp_cfg = EVaLPRunConfig(dataclasses.replace(EVaLPConfig(), **common), str(vae_path), fingerprint)
    langevin_cfg = langevin_run_config(str(vae_path), fingerprint, langevin_steps=args.langevin_steps,
                                       langevin_step_size=args.langevin_step_size, **common)
    ncp_cfg = ncp_run_config(str(vae_path), fingerprint, sir_proposals=args.ncp_sir, **common)
    extra_evalp = {f"evalp_wkl{w:g}": EVaLPRunConfig(dataclasses.replace(evalp_cfg.evalp, kl_weight=w), str(vae_path),
                                                     fingerprint) for w in args.evalp_kl_weights}
    stages = [("evalp", evalp_cfg, train_evalp), *((n, c, train_evalp) for n, c in extra_evalp.items()),
              ("langevin", langevin_cfg, train_langevin), ("ncp", ncp_cfg, train_ncp)]
    checkpoints = {}
    for name, run_cfg, train in stages:
        seed_everything(args.seed, ctx)
        checkpoints[name] = _stage(out / name, name, run_cfg.to_json(), args.prior_steps, lambda logger, resume, c=run_cfg, f=train, n=name:
                                   f(c, vae, vae_cfg, ctx, out / n, logger, resume), timings)

    req = EvalRequest(fid_samples=args.fid_samples, fid_ref_images=args.fid_ref_images,
                      fid_stats_dir=out / "fid_stats", mmd=True, mmd_samples=args.mmd_samples,
                      bn_batches=args.bn_batches, seed=args.seed)
    res = EvalResources(vae, vae_cfg, ctx.device, req)
    setups = {name: load_for_sampling(path, ctx.device) for name, path in checkpoints.items()}
    rows: list[tuple[str, Any, Any]] = [("gaussian", None, None)]
    evalp_hook, evalp_bn = build_prior(setups["evalp"], "evalp")
    rows.append(("evalp", evalp_hook, evalp_bn))
    for m in args.sir:
        hook, bn = build_prior(setups["evalp"], "evalp", m)
        rows.append((f"evalp+sir{m}", hook, bn))
    for name in extra_evalp:  # without SIR: these rows ask how w_kl alone changes the sampler
        rows.append((name.replace("_", " "), *build_prior(setups[name], "evalp")))
    rows.append(("langevin", *build_prior(setups["langevin"], "langevin")))
    rows.append((f"ncp+sir{args.ncp_sir}", *build_prior(setups["ncp"], "ncp", args.ncp_sir)))

    results = {}
    for label, hook, bn_hook in rows:
        t0 = time.perf_counter()
        results[label] = evaluate_prior(res, hook, bn_hook)
        print(f"[eval] {label}: {time.perf_counter() - t0:.0f} s", flush=True)
    for label, timing in interleaved_timing(rows, vae, args, ctx.device).items():
        results[label]["timing"] = timing
    base_time = results["gaussian"]["timing"]["seconds_per_image"]
    header = (f"| prior | FID ({args.fid_samples} samples vs {args.fid_ref_images} train) | MMD^2 z_1 (median bw) "
              f"| MMD^2 z_1 (0.5/1/2 bw) | MMD^2 mean over groups (0.5/1/2 bw) | s / image (batch {args.timing_batch}) "
              f"| x Gaussian |")
    lines = [header, "|" + "---|" * 7]
    for label, r in results.items():
        spi, mmd = r["timing"]["seconds_per_image"], r["mmd"]
        lines.append(f"| {label} | {r['fid']['fid']:.1f} | {mmd['top']['mmd2']:.4f} | {mmd['top']['mmd2_multi']:.4f} "
                     f"| {mmd['mean_mmd2_multi']:.4f} | {spi:.2e} | {spi / base_time:.1f} |")
    table = "\n".join(lines)
    summary = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "device": str(ctx.device), "torch_threads": torch.get_num_threads(),
               "vae": str(vae_path), "vae_fingerprint": fingerprint,
               "evalp_config": dataclasses.asdict(evalp_cfg.evalp),
               "evalp_extra_kl_weights": list(args.evalp_kl_weights),
               "langevin_config": dataclasses.asdict(langevin_cfg.prior), "ncp_config": dataclasses.asdict(ncp_cfg.prior),
               "train_seconds": timings, "results": results, "table": table}
    save_text_atomic(out / "compare_priors.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    print(table)
    print(f"wrote {out / 'compare_priors.json'}")


if __name__ == "__main__":
    main()
