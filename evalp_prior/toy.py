"""A reference problem with a known answer: EVaLP on a 4-d toy "aggregate posterior".

The target is a two-component Gaussian mixture (z of shape (4, 1, 1), constant context h) with a hole
between its modes; the base prior p0 is N(0, I). Its oracle energy E*(z) = log p0(z) - log q(z) makes
p0 exp(-E*) the target exactly, so SIR with E* checks resampling itself, while SIR with the trained
energy shows what the trained critic's density is worth. Used by tests/test_evalp_toy.py and
benchmarks/toy_sir.py, with the same EVaLPConfig settings a real run takes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nvae.hooks import GroupSpec

from .config import EVaLPConfig
from .energy import EnergySet
from .metrics.mmd import median_bandwidth, mmd2_unbiased
from .objectives import GroupBatch, alternating_step
from .prior import EVaLPPrior
from .sampler import SharedFlowSampler
from .train import sampler_average

DIM, CONTEXT = 4, 3
CENTRES = torch.tensor([[1.2, 1.2, 0.0, 0.0], [1.2, -1.2, 0.0, 0.0]])
STD = 0.5
SPECS = [GroupSpec(index=0, scale=0, channels=DIM, height=1, width=1, context_channels=CONTEXT)]


def draw_target(n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples (n, DIM) of the mixture."""
    component = torch.randint(len(CENTRES), (n,), generator=generator)
    return CENTRES[component] + STD * torch.randn(n, DIM, generator=generator)


class OracleEnergy(nn.Module):
    """E*(z) = log N(z; 0, I) - log q(z) for the mixture q, so that p0 exp(-E*) = q."""

    def forward(self, group: int, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = z.flatten(1)
        log_p0 = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        log_components = torch.distributions.Normal(CENTRES, STD).log_prob(z[:, None, :]).sum(2)
        return log_p0 - (log_components.logsumexp(1) - math.log(len(CENTRES)))


def base(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu_p, sigma_p, h) of the base prior N(0, I) with a constant context."""
    return torch.zeros(n, DIM, 1, 1), torch.ones(n, DIM, 1, 1), torch.ones(n, CONTEXT, 1, 1)


def train_toy(cfg: EVaLPConfig, seed: int, steps: int, batch: int = 512) -> tuple[EnergySet, SharedFlowSampler]:
    """EVaLP's energy and generation sampler (the weights' moving average when cfg keeps one) fitted to the
    mixture with cfg's objective, optimisers and network sizes."""
    torch.manual_seed(seed)
    energies = EnergySet(SPECS, [0], cfg.energy_hidden, whiten=cfg.whiten_critic)
    sampler = SharedFlowSampler(SPECS, [0], cfg.sampler_hidden, cfg.num_couplings, cfg.embed_dim, cfg.max_log_scale,
                                cfg.sampler_mixing)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    opt_e = torch.optim.Adam(energies.parameters(), lr=cfg.lr_energy, betas=betas)
    opt_s = torch.optim.Adam(sampler.parameters(), lr=cfg.lr_sampler, betas=betas)
    objective = cfg.objective()
    data = torch.Generator().manual_seed(seed + 1)
    ema = sampler_average(sampler, cfg.sampler_ema)
    mu, sigma, h = base(batch)
    for step in range(steps):
        z_pos = draw_target(batch, data).view(batch, DIM, 1, 1)
        stats = alternating_step([GroupBatch(0, z_pos, h, mu, sigma)], energies, sampler, opt_e, opt_s, step, objective)
        if ema is not None and bool(stats["sampler_step"]):
            ema.update_parameters(sampler)
    return energies, (sampler if ema is None else ema.module)


@torch.no_grad()
def toy_mmd(energies: nn.Module, sampler: SharedFlowSampler, seed: int, sir_proposals: int = 50,
            n: int = 1000) -> dict[str, float]:
    """MMD^2 to held-out target samples of the base, the sampler, SIR with the trained energy (both weightings)
    and SIR with the oracle energy (exact weights), one fixed kernel (0.5/1/2 x the target's median)."""
    held_out = torch.Generator().manual_seed(seed + 2)
    target = draw_target(n, held_out)
    med = median_bandwidth(target, target).item()
    bandwidths = [0.5 * med, med, 2 * med]
    mu, sigma, h = base(n)
    draws = {"base": torch.randn(n, DIM, generator=held_out),
             "sampler": EVaLPPrior(energies, sampler, [0]).sample_group(0, h, mu, sigma, 1.0)}
    for weights in ("exact", "energy"):
        draws[f"sir_{weights}"] = EVaLPPrior(energies, sampler, [0], sir_proposals=sir_proposals, sir_weights=weights,
                                             sir_chunk=16).sample_group(0, h, mu, sigma, 1.0)
    draws["sir_oracle"] = EVaLPPrior(OracleEnergy(), sampler, [0], sir_proposals=sir_proposals,
                                     sir_chunk=16).sample_group(0, h, mu, sigma, 1.0)
    return {name: mmd2_unbiased(z.flatten(1), target, bandwidths).item() for name, z in draws.items()}
