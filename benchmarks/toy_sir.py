#!/usr/bin/env python
"""SIR on the toy with a known answer (evalp_prior/toy.py): MMD^2 to the target of the base prior, the trained
sampler, SIR with the trained energy (exact and energy weights) and SIR with the oracle energy, per setting
and seed. Settings are EVaLPConfig overrides as in benchmarks/sweep_evalp.py.

Example (docs/results.md):
    python benchmarks/toy_sir.py --setting wgan "" --setting ebm "kl_weight=1,gradient_penalty=r1,lambda_gp=1" --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from evalp_prior.config import EVaLPConfig  # noqa: E402
from evalp_prior.toy import toy_mmd, train_toy  # noqa: E402
from nvae.runtime.flags import parse_overrides  # noqa: E402

COLUMNS = ("base", "sampler", "sir_exact", "sir_energy", "sir_oracle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True,
                        help="a named setting: EVaLPConfig overrides 'field=value,...' ('' = the defaults)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per setting")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (batch 512)")
    parser.add_argument("--sir", type=int, default=50, help="SIR proposals M")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| setting | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, text in args.setting:
        cfg = dataclasses.replace(EVaLPConfig(), **parse_overrides(text, EVaLPConfig))
        rows = [toy_mmd(*train_toy(cfg, seed, args.steps), seed, args.sir) for seed in args.seeds]
        cells = [f"{statistics.mean(r[c] for r in rows):.3f} +- {statistics.stdev(r[c] for r in rows):.3f}"
                 if len(rows) > 1 else f"{rows[0][c]:.3f}" for c in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
