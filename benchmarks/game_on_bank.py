#!/usr/bin/env python
"""The EVaLP game on a bank of top-group posterior samples: the frozen NVAE out of the training loop, so that runs
of 10^4 steps take minutes on a CPU. For studying the game (docs/results.md section 0d), not for priors that are
reported: stage 2 (scripts/train_nvae_evalp.py) draws fresh posterior samples at every step.

The bank holds one posterior draw of z_1 for each training image (evalp_prior.sampler_fit.top_group_bank; z_1's
context is the same for every image). Per setting (EVaLPConfig overrides, as in sweep_evalp.py; --groups is top),
stage 2's task is built as a stage-2 run builds it (moment start, --sampler-fit-steps, moving average, schedules),
then EVaLPTask.step_on runs --steps alternating steps on minibatches of the bank. Measured on the VALIDATION half
of the test split (choices are made there): the sampler's negative log-likelihood of posterior samples of the
half (nats per image; the Gaussian fit's and NVAE's prior's for reference), the critic's energy gap on them,
the top-group MMD^2 (scripts/evaluate.py's estimator), and FID / KID / precision / recall of --fid images
(temperature 1, BN re-adjusted with 20 batches of the row's own prior) against the validation half's own images.
Reference rows: NVAE's Gaussian prior, the aggregate posterior's full-covariance Gaussian fit (10,000 bank rows)
and the bank itself (the ceiling of any top-group prior).

    python benchmarks/game_on_bank.py --vae runs/small_s0/checkpoint.pt --out runs/game_on_bank \\
        --setting default "" --setting long "" --steps 1500 20000 --setting fit "sampler_fit_steps=10000"
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from evalp_prior.config import EVaLPConfig, EVaLPRunConfig  # noqa: E402
from evalp_prior.evaluation import EvalRequest, EvalResources, evaluate_prior  # noqa: E402
from evalp_prior.objectives import GroupBatch  # noqa: E402
from evalp_prior.oracle import AggregatePosteriorPrior, PosteriorGaussianPrior  # noqa: E402
from evalp_prior.sampler import gaussian_log_prob  # noqa: E402
from evalp_prior.sampler_fit import TopGroupBank, top_group_bank  # noqa: E402
from evalp_prior.train import EVaLPTask, load_vae_for_stage2  # noqa: E402
from nvae.data import dataset_info, get_dataset, held_out_part  # noqa: E402
from nvae.runtime import RunLogger, init_distributed, save_text_atomic  # noqa: E402
from nvae.runtime.flags import parse_overrides  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, required=True, help="the frozen NVAE: a stage-1 checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="directory of the banks and the results table")
    parser.add_argument("--setting", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), default=[],
                        help="a named setting: EVaLPConfig overrides 'field=value,...' ('' = the defaults)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1500],
                        help="game steps per setting, one value for all or one per --setting")
    parser.add_argument("--bank-images", type=int, default=60000, help="training images in the bank (one draw each)")
    parser.add_argument("--fid", type=int, default=1000, help="generated images per row for FID/KID/precision-recall")
    parser.add_argument("--mmd-samples", type=int, default=2000, help="validation images for the MMD^2 and the NLL")
    parser.add_argument("--fid-stats-dir", type=Path, default=Path("runs/fid_stats"), help="cache of reference features")
    parser.add_argument("--seed", type=int, default=0, help="seed of every setting's game and of the evaluation")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    if len(args.steps) not in (1, len(args.setting)):
        parser.error(f"--steps takes one value or one per --setting ({len(args.setting)}), got {len(args.steps)}")
    return args


def bank_batches(bank: TopGroupBank, batch_size: int, generator: torch.Generator) -> list[GroupBatch]:
    """One minibatch of the bank's z_1 (drawn with replacement) with its shared context, as a posterior pass gives."""
    return [bank.batch(bank.z[torch.randint(bank.z.shape[0], (batch_size,), generator=generator)])]


def validation_nll(log_density, bank: TopGroupBank, count: int) -> float:
    """Mean -log p(z) of the first count validation-bank rows (nats per image) under log_density(z, mu_p, sigma_p, h)."""
    b = bank.batch(bank.z[:count])
    with torch.no_grad():
        return float(-log_density(b.z_pos, b.mu_p, b.sigma_p, b.h).mean())


def run_setting(args: argparse.Namespace, overrides: dict[str, Any], steps: int, vae, vae_cfg, fingerprint: str,
                ctx, banks: dict[str, TopGroupBank], res: EvalResources) -> dict[str, Any]:
    """Build the task as stage 2 does, play the game on the bank, measure on the validation half."""
    cfg = EVaLPConfig(**{**overrides, "groups": "top", "seed": args.seed, "max_steps": steps})
    cfg.validate()
    tc = vae_cfg.train
    train_set = get_dataset(tc.dataset, "train", tc.data_root)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    task = EVaLPTask(EVaLPRunConfig(cfg, str(args.vae), fingerprint), vae, vae_cfg, ctx, res.held_out(),
                     dataset_info(tc.dataset, tc.data_root).binarize, RunLogger(args.out, False), steps, train_set)
    generator = torch.Generator().manual_seed(args.seed)
    skipped = sum(task.step_on(bank_batches(banks["train"], cfg.batch_size, generator), step) is None
                  for step in range(steps))
    seconds = time.perf_counter() - start
    sampler, val = task.generation_sampler().eval(), banks["validation"]
    task.energies.eval()
    with torch.no_grad():
        b = bank_batches(val, args.mmd_samples, torch.Generator().manual_seed(args.seed))[0]
        z_neg, _ = sampler(b.mu_p, b.sigma_p, b.h, 0)
        energy = [task.energies(0, task.energies.inputs(z, b.mu_p, b.sigma_p), b.h).mean() for z in (b.z_pos, z_neg)]
        gap = float(energy[0] - energy[1])
    torch.manual_seed(args.seed)
    metrics = evaluate_prior(res, task.prior(), None)
    return {"steps": steps, "skipped_steps": skipped, "train_seconds": seconds, "energy_gap": gap,
            "nll": validation_nll(lambda z, m, s, h: sampler.log_prob(z, m, s, h, 0), val, args.mmd_samples),
            **metrics}


def reference_rows(args: argparse.Namespace, banks: dict[str, TopGroupBank], res: EvalResources) -> dict[str, Any]:
    """NVAE's Gaussian prior, the aggregate posterior's Gaussian fit and its bank, measured like the settings."""
    fit = PosteriorGaussianPrior(banks["train"].z[:10000])
    rows = {"gaussian (NVAE)": (None, lambda z, m, s, h: gaussian_log_prob(z, m, s)),
            "Gaussian fit of the aggregate posterior": (fit, lambda z, m, s, h: fit.distribution.log_prob(
                z.flatten(1).to(fit.mean)).float()),
            "aggregate posterior (bank, ceiling)": (AggregatePosteriorPrior(banks["train"].z), None)}
    out = {}
    for name, (hook, log_density) in rows.items():
        torch.manual_seed(args.seed)
        out[name] = {**evaluate_prior(res, hook, hook),
                     "nll": validation_nll(log_density, banks["validation"], args.mmd_samples) if log_density else None}
    return out


def _bank(path: Path, fingerprint: str, build) -> TopGroupBank:
    """A bank cached at path for this NVAE (fingerprint), built when missing or made for another NVAE."""
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["fingerprint"] == fingerprint:
            return TopGroupBank(**saved["bank"])
    bank = build()
    torch.save({"fingerprint": fingerprint, "bank": dataclasses.asdict(bank)}, path)
    return bank


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one line per row."""
    lines = ["| row | steps | NLL (nats) | energy gap | MMD^2 z_1 x1e3 +- stderr | FID | KID x1e3 +- stderr | "
             "precision | recall |", "|---" * 9 + "|"]
    for name, r in rows.items():
        mmd, fid = r["mmd"]["top"], r["fid"]
        nll = "" if r["nll"] is None else f"{r['nll']:.2f}"
        gap = f"{r['energy_gap']:.3f}" if "energy_gap" in r else ""
        lines.append(f"| {name} | {r.get('steps', '')} | {nll} | {gap} | {1e3 * mmd['mmd2_multi']:.2f} +- "
                     f"{1e3 * mmd['mmd2_multi_stderr']:.2f} | {fid['fid']:.2f} | {1e3 * fid['kid']:.2f} +- "
                     f"{1e3 * fid['kid_stderr']:.2f} | {fid['precision']:.3f} | {fid['recall']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    vae, vae_cfg, fingerprint = load_vae_for_stage2(args.vae, ctx.device)
    res = EvalResources(vae, vae_cfg, ctx.device, EvalRequest(
        fid_samples=args.fid, fid_ref_images=5000, fid_reference="validation", fid_stats_dir=args.fid_stats_dir,
        mmd=True, mmd_samples=args.mmd_samples, split="validation", seed=args.seed))
    binarize = res.binarize()
    banks = {"train": _bank(args.out / "bank_train.pt", fingerprint, lambda: top_group_bank(
                 vae, res.split("train"), args.bank_images, 500, binarize, ctx.device)),
             "validation": _bank(args.out / "bank_validation.pt", fingerprint, lambda: top_group_bank(
                 vae, Subset(res.held_out(), range(min(args.mmd_samples, len(res.held_out())))), args.mmd_samples,
                 500, binarize, ctx.device))}
    rows = reference_rows(args, banks, res)
    steps = args.steps * len(args.setting) if len(args.steps) == 1 else args.steps
    for (name, text), n in zip(args.setting, steps):
        rows[name] = run_setting(args, parse_overrides(text, EVaLPConfig), n, vae, vae_cfg, fingerprint, ctx, banks, res)
        print(f"[{name}] {n} steps in {rows[name]['train_seconds']:.0f} s", flush=True)
    text = table(rows)
    save_text_atomic(args.out / "game_on_bank.json", json.dumps({"rows": rows, "vae": str(args.vae),
                                                                 "settings": args.setting, "markdown": text},
                                                                indent=2, default=str) + "\n")
    print(text)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
