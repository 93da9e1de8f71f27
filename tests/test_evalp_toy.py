"""EVaLP end to end on a toy aggregate posterior with a known density.

The "aggregate posterior" is a two-component Gaussian mixture in 4 dimensions (z of shape (4, 1, 1),
constant context h) with a hole between its modes, and the base prior is N(0, I). Training the energy
and the shared flow sampler with the alternating WGAN-GP objective (w_kl = 0) must close most of the
MMD gap. SIR with exact weights samples p0 exp(-E); to test it against a known answer it runs with the
oracle energy E* = log p0 - log q(z), for which p0 exp(-E*) is the target, and the trained sampler as
proposal: resampling must then cut the MMD further.
"""
import math

import pytest
import torch
from torch import nn

from evalp_prior.energy import EnergySet
from evalp_prior.metrics import median_bandwidth, mmd2_unbiased
from evalp_prior.objectives import GroupBatch, ObjectiveConfig, alternating_step
from evalp_prior.prior import EVaLPPrior
from evalp_prior.sampler import SharedFlowSampler
from nvae.hooks import GroupSpec

DIM, CONTEXT = 4, 3
CENTRES = torch.tensor([[1.2, 1.2, 0.0, 0.0], [1.2, -1.2, 0.0, 0.0]])
STD = 0.5
SPECS = [GroupSpec(index=0, scale=0, channels=DIM, height=1, width=1, context_channels=CONTEXT)]


def _draw_target(n: int, generator: torch.Generator) -> torch.Tensor:
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


def _base(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu_p, sigma_p, h) of the base prior N(0, I) with a constant context."""
    return torch.zeros(n, DIM, 1, 1), torch.ones(n, DIM, 1, 1), torch.ones(n, CONTEXT, 1, 1)


def run_toy(seed: int, steps: int = 1500, batch: int = 512) -> dict[str, float]:
    """Train EVaLP on the toy and return MMD^2 to the target of the base, the sampler and SIR."""
    torch.manual_seed(seed)
    energies = EnergySet(SPECS, [0], hidden=32)
    sampler = SharedFlowSampler(SPECS, [0], hidden=32, num_couplings=4)
    opt_e = torch.optim.Adam(energies.parameters(), lr=2e-3, betas=(0.5, 0.9))
    opt_s = torch.optim.Adam(sampler.parameters(), lr=2e-3, betas=(0.5, 0.9))
    config = ObjectiveConfig(n_critic=5, lambda_gp=10.0, kl_weight=0.0)
    data = torch.Generator().manual_seed(seed + 1)
    mu, sigma, h = _base(batch)
    for step in range(steps):
        z_pos = _draw_target(batch, data).view(batch, DIM, 1, 1)
        alternating_step([GroupBatch(0, z_pos, h, mu, sigma)], energies, sampler, opt_e, opt_s, step, config)

    n = 1000
    held_out = torch.Generator().manual_seed(seed + 2)
    target = _draw_target(n, held_out)
    med = median_bandwidth(target, target).item()
    bandwidths = [0.5 * med, med, 2 * med]  # fixed, so that every prior is measured alike
    mu, sigma, h = _base(n)
    draws = {
        "base": torch.randn(n, DIM, generator=held_out),
        "evalp": EVaLPPrior(energies, sampler, [0]).sample_group(0, h, mu, sigma, 1.0),
        "sir_oracle": EVaLPPrior(OracleEnergy(), sampler, [0], sir_proposals=50, sir_chunk=16)
        .sample_group(0, h, mu, sigma, 1.0),
    }
    return {name: mmd2_unbiased(z.flatten(1), target, bandwidths).item() for name, z in draws.items()}


@pytest.fixture
def one_thread():
    """Run single-threaded: these ops are tiny, and two threads on two shared, busy cores can stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_evalp_closes_prior_holes_and_sir_refines(one_thread):
    mmd = run_toy(seed=0)
    assert mmd["evalp"] < mmd["base"] / 3, mmd
    assert mmd["sir_oracle"] < mmd["evalp"], mmd
