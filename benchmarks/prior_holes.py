#!/usr/bin/env python
"""Does a frozen NVAE have prior holes, and in which groups? Two detectors, per latent group:

- an NCP classifier (evalp_prior.baselines.ncp: EVaLP's energy network as a logit) trained to tell
  posterior samples z_l ~ q(z_l | x, z_<l) from NVAE's prior samples under the same context; its accuracy
  on the validation half of the test split is 0.5 exactly when the two cannot be told apart;
- the unbiased MMD^2 between encoded held-out images and NVAE's Gaussian prior (scripts/evaluate.py's
  estimator, median-heuristic kernel of the posterior), with its permutation noise floor (the standard
  deviation of the same estimator when both samples come from one distribution) and their ratio.

Prints one table per checkpoint and writes OUT/prior_holes.json. Example (docs/results.md):
    python benchmarks/prior_holes.py --vae runs/small/checkpoint.pt --out runs/holes_small
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from evalp_prior.baselines import ncp_run_config, train_ncp  # noqa: E402
from evalp_prior.evaluation import prior_hole_mmd_per_group  # noqa: E402
from evalp_prior.train import load_vae_for_stage2  # noqa: E402
from nvae.data import dataset_info, get_dataset, held_out_part  # noqa: E402
from nvae.runtime import RunLogger, init_distributed, load_checkpoint, save_text_atomic, seed_everything  # noqa: E402
from nvae.runtime.checkpoint import LATEST_NAME  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, required=True, help="stage-1 checkpoint to examine")
    parser.add_argument("--out", type=Path, required=True, help="directory for the classifier run and the JSON")
    parser.add_argument("--steps", type=int, default=1000, help="NCP classifier training steps (batch 64)")
    parser.add_argument("--mmd-samples", type=int, default=2000, help="encoded held-out images for the MMD^2")
    parser.add_argument("--eval-batches", type=int, default=40, help="validation batches of 64 for the accuracy")
    parser.add_argument("--seed", type=int, default=0, help="classifier and prior-draw seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    ctx = init_distributed("cpu")
    vae, vae_cfg, fingerprint = load_vae_for_stage2(args.vae, ctx.device)
    run_dir = args.out / "ncp"
    if not (run_dir / "final_metrics.json").exists():
        cfg = ncp_run_config(str(args.vae), fingerprint, max_steps=args.steps, seed=args.seed,
                             eval_batches=args.eval_batches, eval_every=args.steps, bn_readjust_batches=1)
        seed_everything(args.seed, ctx)
        resume = run_dir / LATEST_NAME if (run_dir / LATEST_NAME).exists() else None
        with RunLogger(run_dir, True) as logger:
            if train_ncp(cfg, vae, vae_cfg, ctx, run_dir, logger, resume) != 0:
                raise SystemExit("error: the NCP classifier run did not finish")
    classifier = json.loads((run_dir / "final_metrics.json").read_text())
    tc = vae_cfg.train
    held_out = held_out_part(get_dataset(tc.dataset, "test", tc.data_root), "validation")
    mmd = prior_hole_mmd_per_group(vae, None, held_out, args.mmd_samples, 64, dataset_info(tc.dataset, tc.data_root).binarize,
                                   ctx.device, args.seed)
    rows = []
    for g, spec in enumerate(vae.group_specs):
        gauss = mmd["groups"][g]["gaussian"]
        rows.append({"group": g, "shape": list(spec.shape), "ncp_accuracy": classifier[f"accuracy/group{g:02d}"],
                     "mmd2_multi": gauss["mmd2_multi"], "mmd2_multi_stderr": gauss["mmd2_multi_stderr"],
                     "noise_floor": gauss["null_std_multi"], "p_value": gauss["p_value"],
                     "over_noise_floor": gauss["mmd2_multi"] / gauss["null_std_multi"]})
    print(f"| group | shape | NCP accuracy (validation) | Gaussian MMD^2 (n={mmd['top']['num_samples']}) | noise floor | "
          "MMD^2 / floor | permutation p |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {'x'.join(map(str, r['shape']))} | {r['ncp_accuracy']:.3f} | {r['mmd2_multi']:.4g} "
              f"+- {r['mmd2_multi_stderr']:.2g} | {r['noise_floor']:.2g} | {r['over_noise_floor']:.1f} | {r['p_value']:.3f} |")
    steps = int(load_checkpoint(run_dir / LATEST_NAME, "ncp")["step"])
    save_text_atomic(args.out / "prior_holes.json", json.dumps(
        {"vae": str(args.vae), "classifier_steps": steps, "split": "validation", "groups": rows}, indent=2) + "\n")
    print(f"wrote {args.out / 'prior_holes.json'}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
