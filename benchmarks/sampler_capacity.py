#!/usr/bin/env python
"""Why a trained EVaLP sampler misses the aggregate posterior of z_1: its moments, and what its architecture
can reach when trained by maximum likelihood on posterior samples instead of by the adversarial game.

On one frozen NVAE (top group only):
  1. the second moments of posterior samples (training images), p0, the EVaLP sampler (--evalp), the
     sampler architectures fitted by maximum likelihood, and the Gaussian fit of the posterior;
  2. the prior-hole MMD^2 (test half, scripts/evaluate.py's estimator) of every one of them.

    python benchmarks/sampler_capacity.py --vae runs/small_s0/checkpoint.pt \\
        --evalp runs/final_small/default/vae0_seed0/checkpoint.pt
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from evalp_prior.evaluation import prior_hole_mmd_per_group  # noqa: E402
from evalp_prior.generation import build_prior, load_for_sampling  # noqa: E402
from evalp_prior.oracle import PosteriorGaussianPrior, aggregate_posterior_bank  # noqa: E402
from evalp_prior.sampler import SharedFlowSampler  # noqa: E402
from evalp_prior.train import load_vae_for_stage2  # noqa: E402
from nvae.data import binarize_if_needed, dataset_info, get_dataset, held_out_part  # noqa: E402

# (name, couplings, channel mixing) of the sampler architectures fitted by maximum likelihood.
ARCHITECTURES = [("4 couplings (default)", 4, False), ("4 couplings + mixing", 4, True),
                 ("8 couplings", 8, False), ("8 couplings + mixing", 8, True)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, required=True, help="the frozen NVAE (stage-1 checkpoint)")
    parser.add_argument("--evalp", type=Path, required=True, help="an EVaLP checkpoint trained on it")
    parser.add_argument("--first-image", type=int, default=20000, help="first training image of the posterior bank")
    parser.add_argument("--bank-images", type=int, default=20000, help="training images in the posterior bank")
    parser.add_argument("--steps", type=int, default=1500, help="maximum-likelihood steps per architecture")
    parser.add_argument("--batch", type=int, default=64, help="posterior samples per maximum-likelihood step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the maximum-likelihood fits")
    parser.add_argument("--moment-samples", type=int, default=10000, help="draws per row for the moment table")
    parser.add_argument("--mmd-samples", type=int, default=2000, help="test-half images for the MMD^2")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fits and the draws")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


class TopGroupHook:
    """PriorHook drawing z_1 from a callable n -> (n, C, H, W); None below it."""

    def __init__(self, draw):
        self.draw = draw

    def sample_group(self, group, h, mu_p, sigma_p, temperature):
        return None if group else self.draw(mu_p.shape[0]).to(mu_p)


def moments(name: str, x: torch.Tensor, reference: torch.Tensor) -> str:
    """A markdown row: mean offset, trace and eigenvalue range of the covariance, its distance to the reference's."""
    x, reference = x.flatten(1).double(), reference.flatten(1).double()
    cov, ref_cov = torch.cov(x.T), torch.cov(reference.T)
    eig = torch.linalg.eigvalsh(cov)
    return (f"| {name} | {(x.mean(0) - reference.mean(0)).norm():.3f} | {cov.trace():.2f} | {eig[0]:.3f} .. {eig[-1]:.2f} "
            f"| {(cov - ref_cov).norm():.2f} |")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    vae, cfg, _ = load_vae_for_stage2(args.vae, device)
    info = dataset_info(cfg.train.dataset, cfg.train.data_root)
    train = get_dataset(cfg.train.dataset, "train", cfg.train.data_root)
    test = held_out_part(get_dataset(cfg.train.dataset, "test", cfg.train.data_root), "test")
    torch.manual_seed(args.seed)
    bank = aggregate_posterior_bank(vae, train, args.first_image, args.bank_images, 64, info.binarize, device)
    with torch.no_grad():  # the top group's context is the same for every image
        top = vae.posterior(binarize_if_needed(train[0].unsqueeze(0), info.binarize)).groups[0]
    h, mu, sigma = top.h, top.mu_p, top.sigma_p

    def expand(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.expand(n, *t.shape[1:])

    evalp_hook, _ = build_prior(load_for_sampling(args.evalp, device), "evalp")
    gaussian_fit = PosteriorGaussianPrior(bank)
    draws = {"p0 (NVAE)": lambda n: mu.expand(n, *mu.shape[1:]) + sigma * torch.randn(n, *mu.shape[1:]),
             "EVaLP sampler": lambda n: evalp_hook.sample_group(0, expand(h, n), expand(mu, n), expand(sigma, n), 1.0),
             "Gaussian fit of the posterior": lambda n: gaussian_fit.sample_group(0, expand(h, n), expand(mu, n),
                                                                                  expand(sigma, n), 1.0)}
    for name, couplings, mixing in ARCHITECTURES:
        torch.manual_seed(args.seed)
        flow = SharedFlowSampler(vae.group_specs, [0], 32, num_couplings=couplings, channel_mixing=mixing)
        optimiser = torch.optim.Adam(flow.parameters(), args.lr)
        for _ in range(args.steps):
            z = bank[torch.randint(len(bank), (args.batch,))]
            loss = -flow.log_prob(z, expand(mu, args.batch), expand(sigma, args.batch), expand(h, args.batch), 0).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        draws[f"ML fit, {name}"] = lambda n, f=flow: f(expand(mu, n), expand(sigma, n), expand(h, n), 0)[0]

    n = args.moment_samples
    lines = ["| z_1 drawn from | norm of mean - posterior mean | trace of covariance | covariance eigenvalues "
             "| Frobenius distance to the posterior's covariance | MMD^2 x1e3 (test half) | x Gaussian prior |",
             "|---|---|---|---|---|---|---|"]
    posterior = bank[:n]
    lines.append(moments("posterior (training images)", posterior, posterior) + "  |  |")
    with torch.no_grad():
        for name, draw in draws.items():
            torch.manual_seed(args.seed)
            mmd = prior_hole_mmd_per_group(vae, TopGroupHook(draw), test, args.mmd_samples, 64, info.binarize,
                                           device, args.seed)["top"]
            lines.append(moments(name, draw(n), posterior)
                         + f" {1e3 * mmd['mmd2_multi']:.2f} +- {1e3 * mmd['mmd2_multi_stderr']:.2f} "
                           f"| {mmd['mmd2_multi'] / mmd['gaussian']['mmd2_multi']:.3f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
