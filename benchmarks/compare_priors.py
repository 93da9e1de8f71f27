#!/usr/bin/env python
"""Compare priors on a frozen NVAE, one training seed per invocation, then aggregate seeds into tables and figures.

Rows: NVAE's Gaussian prior, EVaLP (its sampler), EVaLP + SIR, the Langevin-MCMC energy prior and NCP + SIR,
all on the same frozen NVAE, the priors trained for the same number of steps; and two rows read off the
aggregate posterior of z_1 on training images outside the FID reference (evalp_prior.oracle; not timed): its
samples, the ceiling of every top-group prior (no density, so no likelihood), and its full-covariance Gaussian
fit, the simplest learned prior (closed-form density: its NLL and ELBO come from a pass of their own on the
same posterior samples, nll_reference.json). Per seed (resumable: every
stage's checkpoint and every row's evaluation is reused when present with the same settings):

    python benchmarks/compare_priors.py --vae runs/small_s0/checkpoint.pt --out runs/compare/small/seed0
    python benchmarks/compare_priors.py --vae ... --out ... --timing     # alone on the machine: s / image
    python benchmarks/compare_priors.py --report runs/compare/small/seed* --out runs/compare/small

Ablations of EVaLP trained elsewhere on the same NVAE join as rows evalp[NAME] (sampler, no SIR; with densities):
    python benchmarks/compare_priors.py --vae ... --out ... --extra-evalp fit_only=runs/fit_only_s0/checkpoint.pt

Baseline learning rates are chosen on the validation half (first half of the test split) by
    python benchmarks/compare_priors.py --vae runs/small_s0/checkpoint.pt --out runs/compare/small/seed0 \\
        --lr-sweep 1e-4 1e-3 3e-3
which trains both baselines at each rate and picks the lowest top-group MMD^2 of its prior on --mmd-samples
images of the validation half (NCP with its --ncp-sir resampling).

Protocol of the evaluation (every row alike): images generated with BN re-adjustment (--bn-batches batches
of the row's own prior, the EVaLP sampler standing in for SIR) at temperature 1; FID, KID +- its fold
standard error and precision/recall (k = 3, as many reference images as samples) on --fid-samples images
against Inception features of the first --fid-ref-images training images (cached); the prior-hole MMD^2
per group +- fold standard error against --mmd-samples encoded images of the TEST half (second half of the
test split), one posterior-set kernel for every row; importance-weighted NLL and ELBO (K = --nll) on
--nll-images test-half images for every prior with a density, all on the same posterior samples; the NCP
classifier's accuracy on --mmd-samples validation-half images as the hole detector; seconds per image timed round-robin.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.figures import plot_bars, plot_prior_hole, plot_sample_grids  # noqa: E402
from evalp_prior.baselines import langevin_run_config, ncp_run_config, train_langevin, train_ncp  # noqa: E402
from evalp_prior.baselines.ncp import hole_detector_accuracy, load_ncp  # noqa: E402
from evalp_prior.config import EVaLPConfig, EVaLPRunConfig  # noqa: E402
from evalp_prior.evaluation import (EvalRequest, EvalResources, bn_adjusted, calibrate_on_validation,  # noqa: E402
                                    evaluate_prior, likelihood_priors, posterior_and_prior_draws, prior_hole_mmd_per_group)
from evalp_prior.generation import build_prior, load_for_sampling, sir_temperature_arg  # noqa: E402
from evalp_prior.metrics.fid import save_npz_atomic  # noqa: E402
from evalp_prior.metrics.nll import Normalisers, dataset_nll  # noqa: E402
from evalp_prior.metrics.timing import seconds_per_image  # noqa: E402
from evalp_prior.oracle import AggregatePosteriorPrior, PosteriorGaussianPrior, aggregate_posterior_bank  # noqa: E402
from evalp_prior.sir import DEFAULT_SIR_TEMPERATURE, check_sir_temperature, temperature_tag  # noqa: E402
from evalp_prior.sir_calibration import DEFAULT_CALIBRATION_IMAGES  # noqa: E402
from evalp_prior.train import load_vae_for_stage2, train_evalp  # noqa: E402
from nvae.config import SPEED_ONLY_FIELDS  # noqa: E402
from nvae.data.base import HELD_OUT_SEED  # noqa: E402
from nvae.model import NVAE  # noqa: E402
from nvae.runtime import RunLogger, init_distributed, load_checkpoint, save_text_atomic, seed_everything  # noqa: E402
from nvae.runtime.checkpoint import LATEST_NAME  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="this seed's run directory (with --report: where the tables and figures go)")
    parser.add_argument("--vae", type=Path, default=None, help="the frozen NVAE: a stage-1 checkpoint (one per training seed)")
    parser.add_argument("--evalp", type=Path, default=None,
                        help="reuse this stage-2 checkpoint of the same NVAE instead of training EVaLP here")
    parser.add_argument("--extra-evalp", nargs="+", default=[], metavar="NAME=PATH",
                        help="more stage-2 checkpoints of the same NVAE (e.g. ablations), each a row evalp[NAME] "
                             "evaluated like the EVaLP row (no SIR)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the priors' training and of the evaluation's draws")
    parser.add_argument("--prior-steps", type=int, default=1500, help="training steps of every prior")
    parser.add_argument("--prior-batch", type=int, default=64, help="images per prior training step")
    parser.add_argument("--eval-batches", type=int, default=20, help="validation batches for the priors' training diagnostics")
    parser.add_argument("--langevin-lr", type=float, default=None, help="Langevin energy learning rate (default: LangevinConfig's)")
    parser.add_argument("--ncp-lr", type=float, default=None, help="NCP classifier learning rate (default: NCPConfig's)")
    parser.add_argument("--langevin-steps", type=int, default=20, help="Langevin steps K at training and generation")
    parser.add_argument("--langevin-step-size", type=float, default=0.05, help="Langevin step s in whitened units (noise sqrt(2 s))")
    parser.add_argument("--ncp-sir", type=int, default=100, help="NCP's SIR proposals M at generation")
    parser.add_argument("--sir", type=int, nargs="*", default=[100], help="SIR proposal counts of the EVaLP + SIR rows")
    parser.add_argument("--sir-temperature", type=sir_temperature_arg, nargs="+", default=[DEFAULT_SIR_TEMPERATURE],
                        help="temperatures T tempering the EVaLP + SIR rows' weights to w^(1/T), ess:F ESS targets "
                             "(0 < F < 1) or calibrated (T fitted on 2000 validation-half images), one row per M and "
                             "value (named evalp+sirM_TT, evalp+sirM_essF or evalp+sirM_calibrated)")
    parser.add_argument("--fid-samples", type=int, default=1000, help="generated images per row for FID, KID, precision/recall")
    parser.add_argument("--fid-ref-images", type=int, default=10000, help="training images in the cached reference features")
    parser.add_argument("--fid-stats-dir", type=Path, default=Path("runs/fid_stats"), help="cache of reference features")
    parser.add_argument("--mmd-samples", type=int, default=2000, help="test-half images encoded for the prior-hole MMD^2")
    parser.add_argument("--nll", type=int, default=100, help="importance samples K per image for NLL and ELBO (0: skip)")
    parser.add_argument("--nll-images", type=int, default=1000, help="test-half images for NLL and ELBO")
    parser.add_argument("--oracle-images", type=int, default=10000,
                        help="training images whose posterior z_1 make the aggregate-posterior rows (0: no such rows)")
    parser.add_argument("--bn-batches", type=int, default=20, help="BN re-adjustment batches before generating")
    parser.add_argument("--grid-images", type=int, default=32, help="images per prior in the sample-grid figure")
    parser.add_argument("--timing", action="store_true", help="only time sampling (round-robin over rows); run it alone")
    parser.add_argument("--timing-batch", type=int, default=64, help="images per timed sampling call")
    parser.add_argument("--timing-rounds", type=int, default=7, help="round-robin timing rounds (median taken)")
    parser.add_argument("--lr-sweep", type=float, nargs="+", default=None, metavar="LR",
                        help="train both baselines at these learning rates and pick each one's best on validation MMD^2")
    parser.add_argument("--report", type=Path, nargs="+", default=None, metavar="SEED_DIR",
                        help="aggregate these seed directories into OUT/compare_priors.{md,json} and figures")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    if args.report is None and args.vae is None:
        parser.error("--vae is required (unless --report)")
    extra = [item.partition("=") for item in args.extra_evalp]
    if any(not name or not sep or not path for name, sep, path in extra):
        parser.error(f"--extra-evalp takes NAME=PATH items, got {args.extra_evalp}")
    args.extra_evalp = {f"evalp[{name}]": Path(path) for name, _, path in extra}
    try:
        for t in args.sir_temperature:
            check_sir_temperature(t, "--sir-temperature")
    except ValueError as error:
        parser.error(str(error))
    if any(m < 1 for m in args.sir):
        parser.error(f"--sir needs proposal counts >= 1, got {args.sir}")
    return args


def _without_speed_only(config: Any) -> Any:
    """A run configuration's JSON without the speed-only settings, at any depth."""
    if isinstance(config, dict):
        return {k: _without_speed_only(v) for k, v in config.items() if k not in SPEED_ONLY_FIELDS}
    return config


def _stage(path: Path, name: str, config_json: str, total_steps: int, train, seconds: dict[str, Any]) -> Path:
    """Train into path (resuming a partial run) and record its seconds; a finished checkpoint is reused.

    A checkpoint trained with another configuration (e.g. before a default changed) is an error, never
    silently reused: the table must describe the settings it reports. Speed-only settings (SPEED_ONLY_FIELDS,
    also ones added after the checkpoint was written) do not count: they never change what is trained.
    """
    ckpt = path / LATEST_NAME
    resume = None
    if ckpt.is_file():
        payload = load_checkpoint(ckpt, map_location="cpu")
        if _without_speed_only(json.loads(payload["config"])) != _without_speed_only(json.loads(config_json)):
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


def _common(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings every prior shares."""
    return dict(batch_size=args.prior_batch, max_steps=args.prior_steps, seed=args.seed, eval_batches=args.eval_batches,
                bn_readjust_batches=args.bn_batches, ckpt_every=max(args.prior_steps // 2, 1))


def _baseline_configs(args: argparse.Namespace, fingerprint: str, langevin_lr: Optional[float],
                      ncp_lr: Optional[float]) -> dict[str, Any]:
    """{stage name: run config} of the two baselines at these learning rates (None: the config default)."""
    common = _common(args)
    langevin = langevin_run_config(str(args.vae), fingerprint, langevin_steps=args.langevin_steps,
                                   langevin_step_size=args.langevin_step_size, **common,
                                   **({} if langevin_lr is None else {"lr": langevin_lr}))
    ncp = ncp_run_config(str(args.vae), fingerprint, sir_proposals=args.ncp_sir, **common,
                         **({} if ncp_lr is None else {"lr": ncp_lr}))
    return {f"langevin_lr{langevin.prior.lr:g}": (langevin, train_langevin), f"ncp_lr{ncp.prior.lr:g}": (ncp, train_ncp)}


def _require_same_nvae(path: Path, flag: str, fingerprint: str, vae: Path) -> None:
    """Exit with a clear message when the stage-2 checkpoint at path was trained on another NVAE than --vae."""
    if json.loads(load_checkpoint(path, "evalp", map_location="cpu")["config"])["vae_fingerprint"] != fingerprint:
        raise SystemExit(f"{flag} {path} was trained on another NVAE than --vae {vae}")


def train_stages(args: argparse.Namespace, vae: NVAE, vae_cfg: Any, fingerprint: str, ctx: Any,
                 timings: dict[str, Any]) -> dict[str, Path]:
    """Checkpoints of EVaLP (trained here or --evalp) and both baselines at the chosen learning rates."""
    checkpoints: dict[str, Path] = {}
    for label, path in args.extra_evalp.items():
        _require_same_nvae(path, "--extra-evalp", fingerprint, args.vae)
        checkpoints[label] = path
        timings[label] = "reused"
    if args.evalp is not None:
        _require_same_nvae(args.evalp, "--evalp", fingerprint, args.vae)
        checkpoints["evalp"] = args.evalp
        timings["evalp"] = "reused"
    else:
        cfg = EVaLPRunConfig(dataclasses.replace(EVaLPConfig(), **_common(args)), str(args.vae), fingerprint)
        seed_everything(args.seed, ctx)
        checkpoints["evalp"] = _stage(args.out / "evalp", "evalp", cfg.to_json(), args.prior_steps,
                                      lambda logger, resume: train_evalp(cfg, vae, vae_cfg, ctx, args.out / "evalp",
                                                                         logger, resume), timings)
    for name, (cfg, train) in _baseline_configs(args, fingerprint, args.langevin_lr, args.ncp_lr).items():
        seed_everything(args.seed, ctx)
        checkpoints[name.split("_lr")[0]] = _stage(
            args.out / name, name, cfg.to_json(), args.prior_steps,
            lambda logger, resume, c=cfg, f=train, n=name: f(c, vae, vae_cfg, ctx, args.out / n, logger, resume), timings)
    return checkpoints


def _validation(vae: NVAE, vae_cfg: Any, device: torch.device) -> EvalResources:
    """The evaluation resources whose held_out() is the validation half: what baselines are chosen and the hole
    detector is read on."""
    return EvalResources(vae, vae_cfg, device, EvalRequest(mmd=True, split="validation"))


def validation_mmd2_top(args: argparse.Namespace, vae: NVAE, vae_cfg: Any, kind: str, stage: Path,
                        device: torch.device) -> float:
    """Top-group prior-hole MMD^2 of a trained baseline (NCP with its --ncp-sir resampling) on --mmd-samples
    images of the validation half, by the evaluator of the reported rows; cached in the stage's directory
    and keyed by the halves' definition, so a changed split is measured again rather than reused."""
    settings = {"kind": kind, "mmd_samples": args.mmd_samples, "ncp_sir": args.ncp_sir, "seed": args.seed,
                "split": "validation", "held_out_seed": HELD_OUT_SEED, "checkpoint": str(stage / LATEST_NAME)}

    def measure() -> dict[str, Any]:
        hook, _ = build_prior(load_for_sampling(stage / LATEST_NAME, device), kind, args.ncp_sir if kind == "ncp" else None)
        res = _validation(vae, vae_cfg, device)
        return prior_hole_mmd_per_group(vae, hook, res.held_out(), args.mmd_samples, 64, res.binarize(), device,
                                        args.seed)["top"]
    return _cached(stage / "validation_mmd.json", settings, measure)["mmd2_multi"]


def lr_sweep(args: argparse.Namespace, vae: NVAE, vae_cfg: Any, fingerprint: str, ctx: Any) -> None:
    """Both baselines at every --lr-sweep rate; the best of each on its final validation top-group MMD^2."""
    results: dict[str, dict[str, float]] = {"langevin": {}, "ncp": {}}
    timings: dict[str, Any] = {}
    for lr in args.lr_sweep:
        for name, (cfg, train) in _baseline_configs(args, fingerprint, lr, lr).items():
            seed_everything(args.seed, ctx)
            _stage(args.out / name, name, cfg.to_json(), args.prior_steps,
                   lambda logger, resume, c=cfg, f=train, n=name: f(c, vae, vae_cfg, ctx, args.out / n, logger, resume),
                   timings)
            kind = name.split("_lr")[0]
            results[kind][f"{lr:g}"] = validation_mmd2_top(args, vae, vae_cfg, kind, args.out / name, ctx.device)
    best = {kind: min(r, key=r.get) for kind, r in results.items()}
    lines = ["| baseline | " + " | ".join(f"lr {lr:g}" for lr in args.lr_sweep) + " | chosen |", "|---" * (len(args.lr_sweep) + 2) + "|"]
    for kind, r in results.items():
        lines.append(f"| {kind} | " + " | ".join(f"{r[f'{lr:g}']:.4g}" for lr in args.lr_sweep) + f" | {best[kind]} |")
    table = "\n".join(lines)
    save_text_atomic(args.out / "lr_sweep.json", json.dumps({"validation_mmd2_top": results, "chosen": best,
                                                             "train_seconds": timings, "table": table}, indent=2) + "\n")
    print("validation top-group MMD^2 of each baseline's prior at the end of training:")
    print(table)


# The rows read off the aggregate posterior's bank of z_1 samples.
REFERENCE_ROWS = {"aggregate_posterior": AggregatePosteriorPrior, "posterior_gaussian": PosteriorGaussianPrior}


def _rows(args: argparse.Namespace, setups: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(label, hook, BN re-adjustment hook) of every compared (trained) prior."""
    rows: list[tuple[str, Any, Any]] = [("gaussian", None, None), ("evalp", *build_prior(setups["evalp"], "evalp"))]
    rows += [(f"evalp+sir{m}{temperature_tag(t)}", *build_prior(setups["evalp"], "evalp", m, sir_temperature=t))
             for m in args.sir for t in args.sir_temperature]
    rows += [(label, *build_prior(setups[label], "evalp")) for label in args.extra_evalp]
    rows.append(("langevin", *build_prior(setups["langevin"], "langevin")))
    rows.append((f"ncp+sir{args.ncp_sir}", *build_prior(setups["ncp"], "ncp", args.ncp_sir)))
    return rows


def calibrate_rows(rows: list[tuple[str, Any, Any]], setups: dict[str, Any],
                   device: torch.device) -> dict[str, dict[str, Any]]:
    """Fit the SIR temperature of every ``calibrated`` row on the validation half before any row samples;
    returns each such row's calibration (SIRCalibration.to_json) by label."""
    calibrations = {}
    for label, hook, _ in rows:
        fitted = calibrate_on_validation(setups["evalp"], hook, DEFAULT_CALIBRATION_IMAGES, 64, None, device)
        if fitted is not None:
            calibrations[label] = fitted.to_json()
            print(f"{label}: {fitted.describe()}", flush=True)
    return calibrations


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


def _cached(path: Path, settings: dict[str, Any], compute) -> dict[str, Any]:
    """compute()'s JSON result, reused from path when it was made with the same settings."""
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("settings") == settings:
            return cached
    start = time.perf_counter()
    result = {"settings": settings, **compute(), "seconds": time.perf_counter() - start}
    save_text_atomic(path, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    print(f"[{path.stem}] {result['seconds']:.0f} s", flush=True)
    return result


def run_seed(args: argparse.Namespace) -> None:
    """Train (or reuse) every prior on --vae and evaluate every row; with --timing only time sampling."""
    ctx = init_distributed(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    vae, vae_cfg, fingerprint = load_vae_for_stage2(args.vae, ctx.device)
    if args.lr_sweep:
        lr_sweep(args, vae, vae_cfg, fingerprint, ctx)
        return
    timings: dict[str, Any] = {}
    checkpoints = train_stages(args, vae, vae_cfg, fingerprint, ctx, timings)
    setups = {name: load_for_sampling(path, ctx.device) for name, path in checkpoints.items()}
    rows = _rows(args, setups)
    calibrations = calibrate_rows(rows, setups, ctx.device)
    if args.timing:
        timing = interleaved_timing(rows, vae, args, ctx.device)
        save_text_atomic(args.out / "timing.json", json.dumps(
            {"timing": timing, "torch_threads": torch.get_num_threads(), "device": str(ctx.device)}, indent=2) + "\n")
        for label, t in timing.items():
            print(f"{label}: {t['seconds_per_image']:.3e} s / image", flush=True)
        return
    req = EvalRequest(fid_samples=args.fid_samples, fid_ref_images=args.fid_ref_images, fid_stats_dir=args.fid_stats_dir,
                      mmd=True, mmd_samples=args.mmd_samples, bn_batches=args.bn_batches, split="test", seed=args.seed)
    res = EvalResources(vae, vae_cfg, ctx.device, req)
    # The held-out halves' definition is part of every cached row: rows measured on other halves are redone.
    settings = {**{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(req).items()
                   if k not in SPEED_ONLY_FIELDS}, "held_out_seed": HELD_OUT_SEED}
    results = {label: _cached(args.out / "eval" / f"{label}.json", {**settings, "checkpoint": str(checkpoints.get(label.split("+")[0], args.vae))},
                              lambda h=hook, b=bn, c=calibrations.get(label): {
                                  **evaluate_prior(res, h, b), **({"sir_calibration": c} if c else {})})
               for label, hook, bn in rows}
    densities = {"gaussian": None}
    for label, hook, _ in rows[1:]:
        if "+sir" not in label or label.startswith("ncp"):
            densities.update({k: v for k, v in likelihood_priors(label.split("+")[0], hook).items() if v is not None})
    nll_settings = {"K": args.nll, "images": args.nll_images, "split": "test", "held_out_seed": HELD_OUT_SEED,
                    "seed": args.seed,
                    "checkpoints": {k: str(v) for k, v in checkpoints.items()}}

    def likelihood(priors: dict[str, Any]) -> dict[str, Any]:
        torch.manual_seed(args.seed)  # the same posterior samples for every call (log Z draws its own stream)
        return {"priors": dataset_nll(vae, res.held_out(), args.nll, args.nll_images, res.binarize(), 64, 16,
                                      ctx.device, priors, Normalisers())}
    nll = _cached(args.out / "nll.json", nll_settings, lambda: likelihood(densities)) if args.nll else None
    if args.oracle_images:
        # The training images right after the FID reference ones: a row never scored against its own reconstructions.
        first, count = args.fid_ref_images, args.oracle_images
        try:
            bank = aggregate_posterior_bank(vae, res.split("train"), first, count, 64, res.binarize(), ctx.device)
        except ValueError as exc:
            raise SystemExit(f"--oracle-images {count} after the {first} reference images: {exc}") from exc
        for label, kind in REFERENCE_ROWS.items():
            hook = kind(bank)
            results[label] = _cached(args.out / "eval" / f"{label}.json",
                                     {**settings, "checkpoint": str(args.vae), "bank_images": [first, first + count]},
                                     lambda h=hook: evaluate_prior(res, h, h))
            rows = [*rows, (label, hook, hook)]
        if nll is not None:
            _add_reference_likelihood(nll, _cached(
                args.out / "nll_reference.json", {**nll_settings, "bank_images": [first, first + count]},
                lambda: likelihood({"gaussian": None, **{label: hook for label, hook, _ in rows
                                                         if label in REFERENCE_ROWS and hasattr(hook, "log_density_ratio")}})))
    _figure_data(args, rows, vae, res, ctx.device)
    # The hole detector on the validation half now, not the training diagnostics (measured on the halves of then).
    detector = _cached(args.out / "eval" / "ncp_accuracy.json",
                       {"split": "validation", "held_out_seed": HELD_OUT_SEED, "images": args.mmd_samples,
                        "seed": args.seed, "checkpoint": str(checkpoints["ncp"])},
                       lambda: hole_detector_accuracy(load_ncp(checkpoints["ncp"], ctx.device), vae,
                                                      _validation(vae, vae_cfg, ctx.device).held_out(), args.mmd_samples,
                                                      64, res.binarize(), ctx.device, args.seed))
    summary = {"vae": str(args.vae), "vae_fingerprint": fingerprint, "seed": args.seed, "checkpoints": checkpoints,
               "train_seconds": timings, "rows": results, "row_order": [label for label, _, _ in rows], "nll": nll,
               "ncp_validation_accuracy": {f"accuracy/group{detector['group']:02d}": detector["accuracy"]},
               "evalp_config": json.loads(load_checkpoint(checkpoints["evalp"], "evalp", map_location="cpu")["config"]),
               "langevin_config": json.loads(load_checkpoint(checkpoints["langevin"], "langevin", map_location="cpu")["config"]),
               "ncp_config": json.loads(load_checkpoint(checkpoints["ncp"], "ncp", map_location="cpu")["config"]),
               "torch_threads": torch.get_num_threads()}
    save_text_atomic(args.out / "seed_summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {args.out / 'seed_summary.json'}")


def _add_reference_likelihood(nll: dict[str, Any], reference: dict[str, Any]) -> None:
    """Add the reference rows' likelihood (their own cached pass, so the trained priors' is not redone) to nll.
    Both passes draw the same posterior samples, so their Gaussian rows must agree: the pairing is checked."""
    ours, theirs = nll["priors"]["gaussian"], reference["priors"]["gaussian"]
    if not math.isclose(ours["elbo_nats"], theirs["elbo_nats"], rel_tol=1e-9, abs_tol=1e-9):
        raise RuntimeError(f"the reference likelihood saw other posterior samples: Gaussian -ELBO {theirs['elbo_nats']} "
                           f"vs {ours['elbo_nats']}")
    nll["priors"].update({k: v for k, v in reference["priors"].items() if k != "gaussian"})


def _figure_data(args: argparse.Namespace, rows: list[tuple[str, Any, Any]], vae: NVAE, res: EvalResources,
                 device: torch.device) -> None:
    """Top-group draws of every row on the test half (for the PCA figure) and a sample grid per row, one seed."""
    path = args.out / "figure_data.npz"
    if path.is_file() and all(f"grid/{label}" in np.load(path).files for label, _, _ in rows):
        return
    draws = posterior_and_prior_draws(vae, {label: hook for label, hook, _ in rows}, res.held_out(), args.mmd_samples,
                                      64, res.binarize(), device, args.seed)
    arrays = {f"z1/{label}": draws[label][0].numpy() for label, _, _ in rows}
    arrays["z1/posterior"] = draws["posterior"][0].numpy()
    for label, hook, bn in rows:
        torch.manual_seed(args.seed)
        model = bn_adjusted(vae, bn if bn is not None else hook, args.bn_batches, 64, 1.0)
        torch.manual_seed(args.seed + 1)
        with torch.no_grad():
            arrays[f"grid/{label}"] = model.crop(model.sample(args.grid_images, 1.0, hook)).cpu().numpy()
    save_npz_atomic(path, **arrays)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def report(args: argparse.Namespace) -> None:
    """Aggregate seed directories: tables (markdown + JSON) and the three figures."""
    seeds = [json.loads((d / "seed_summary.json").read_text()) for d in args.report]
    timings = [json.loads((d / "timing.json").read_text())["timing"] for d in args.report if (d / "timing.json").is_file()]
    labels = seeds[0]["row_order"]
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for label in labels:
        per = [s["rows"][label] for s in seeds]
        gauss = [s["rows"]["gaussian"] for s in seeds]
        t = {"FID": _mean_std([p["fid"]["fid"] for p in per]),
             "FID / Gaussian": _mean_std([p["fid"]["fid"] / g["fid"]["fid"] for p, g in zip(per, gauss)]),
             "KID x1e3": _mean_std([1e3 * p["fid"]["kid"] for p in per]),
             "KID stderr x1e3 (mean over seeds)": (float(np.mean([1e3 * p["fid"]["kid_stderr"] for p in per])), 0.0),
             "precision": _mean_std([p["fid"]["precision"] for p in per]),
             "recall": _mean_std([p["fid"]["recall"] for p in per]),
             "MMD^2 z_1 x1e3": _mean_std([1e3 * p["mmd"]["top"]["mmd2_multi"] for p in per]),
             "MMD^2 / Gaussian": _mean_std([p["mmd"]["top"]["mmd2_multi"] / g["mmd"]["top"]["mmd2_multi"]
                                            for p, g in zip(per, gauss)])}
        for group in range(1, len(per[0]["mmd"]["groups"])):  # the lower groups of a hierarchical NVAE
            t[f"MMD^2 z_{group + 1} x1e3"] = _mean_std([1e3 * p["mmd"]["groups"][group]["mmd2_multi"] for p in per])
            # Against the permutation noise floor: with no hole there, a ratio to the Gaussian's MMD^2 (~0) means nothing.
            t[f"MMD^2 z_{group + 1} / noise floor"] = _mean_std(
                [p["mmd"]["groups"][group]["mmd2_multi"] / p["mmd"]["groups"][group]["null_std_multi"] for p in per])
        if timings and all(label in tm for tm in timings):
            t["s / image x1e3"] = _mean_std([1e3 * tm[label]["seconds_per_image"] for tm in timings])
            t["time / Gaussian"] = _mean_std([tm[label]["seconds_per_image"] / tm["gaussian"]["seconds_per_image"]
                                              for tm in timings])
            # Every row runs the same decoder: what a prior adds to the Gaussian's time is its own sampling cost.
            t["prior's own s / image x1e3"] = _mean_std([1e3 * (tm[label]["seconds_per_image"] - tm["gaussian"]["seconds_per_image"])
                                                         for tm in timings])
        table[label] = t
    columns = list(table[labels[0]])
    lines = ["| prior | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, t in table.items():
        lines.append(f"| {label} | " + " | ".join(f"{t[c][0]:.4g} +- {t[c][1]:.2g}" if c in t else "not timed"
                                                   for c in columns) + " |")
    likelihood: dict[str, dict[str, tuple[float, float]]] = {}
    with_nll = [s for s in seeds if s["nll"]]
    if with_nll:
        for name in ["gaussian", *sorted(set(with_nll[0]["nll"]["priors"]) - {"gaussian"})]:
            per = [s["nll"]["priors"][name] for s in with_nll]
            base = [s["nll"]["priors"]["gaussian"] for s in with_nll]
            likelihood[name] = {"NLL (nats)": _mean_std([p["nats"] for p in per]),
                                "-ELBO (nats)": _mean_std([p["elbo_nats"] for p in per]),
                                "ELBO gain over Gaussian (nats)": _mean_std([b["elbo_nats"] - p["elbo_nats"] for p, b in zip(per, base)]),
                                "NLL gain over Gaussian (nats)": _mean_std([b["nats"] - p["nats"] for p, b in zip(per, base)]),
                                "log Z bias (nats)": _mean_std([sum(r["log_z_bias"] for r in p["log_z"]) for p in per])}
        cols = list(next(iter(likelihood.values())))
        lines += ["", "| density | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, t in likelihood.items():
            lines.append(f"| {name} | " + " | ".join(f"{m:.4g} +- {s:.2g}" for m, s in (t[c] for c in cols)) + " |")
    accuracy = [s["ncp_validation_accuracy"].get("accuracy/group00") for s in seeds]
    lines += ["", f"NCP classifier accuracy on the validation half, top group: {_mean_std(accuracy)[0]:.3f} +- "
                  f"{_mean_std(accuracy)[1]:.2g} (0.5 = no detectable hole)",
              f"seeds: {len(seeds)}; with NLL/ELBO: {len(with_nll)}; timing runs: {len(timings)}"]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    save_text_atomic(args.out / "compare_priors.md", text + "\n")
    save_text_atomic(args.out / "compare_priors.json", json.dumps(
        {"seed_dirs": [str(d) for d in args.report], "table": table, "likelihood": likelihood,
         "ncp_accuracy": accuracy, "markdown": text}, indent=2) + "\n")
    first = np.load(args.report[0] / "figure_data.npz")
    plot_prior_hole(first["z1/posterior"], {label: first[f"z1/{label}"] for label in labels},
                    args.out / "prior_hole_pca.png", "top group z_1: 2-D PCA of the posterior (test half), seed dir "
                    f"{args.report[0].name}")
    plot_sample_grids({label: first[f"grid/{label}"] for label in labels}, args.out / "samples.png")
    bars = {"FID": "FID", "KID x1e3": "KID x1e3", "MMD^2 z_1 x1e3": "MMD^2 z_1 x1e3"}
    plot_bars(labels, {title: ([table[label][key][0] for label in labels], [table[label][key][1] for label in labels])
                       for title, key in bars.items()}, args.out / "metrics.png",
              f"mean +- std over {len(seeds)} seeds")
    print(text)
    print(f"wrote {args.out / 'compare_priors.md'}, prior_hole_pca.png, samples.png, metrics.png")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.report is not None:
        report(args)
    else:
        run_seed(args)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
