"""Baseline priors: the Langevin chain against Gaussian closed forms, maximum-likelihood training of a known
tilt, NCP's density ratio and its SIR hook, NCP's hole detector, both hooks' contract with NVAE, and exact resume of
their training."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from scipy import stats
from torch import nn

from evalp_prior.baselines import (LangevinPrior, NCPPrior, langevin_loss, langevin_run_config, langevin_sample,
                                   ncp_loss, ncp_run_config, train_langevin, train_ncp)
from evalp_prior.baselines.ncp import hole_detector_accuracy, load_ncp
from evalp_prior.energy import EnergySet
from evalp_prior.train import vae_fingerprint
from nvae.data.registry import get_dataset
from nvae.distributions import draw_normal
from nvae.hooks import GroupSpec, PriorHook
from nvae.runtime import RunLogger, load_checkpoint
from nvae.runtime.signals import PREEMPTED_EXIT_CODE
from nvae.trained import load_trained_nvae
from tests.helpers import CPU, StopAt

MU = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)
SIGMA = torch.tensor([0.8, 1.5]).view(1, 2, 1, 1)
A, C = 2.0, torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)  # E(z) = A/2 ||z - C||^2


class Quadratic(nn.Module):
    """An EnergySet stand-in with a known energy E(z) = a/2 ||z - c||^2 (ignores h)."""

    def __init__(self, a: float, c: torch.Tensor):
        super().__init__()
        self.a, self.c = a, c

    def forward(self, group: int, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.a * (z - self.c).square().flatten(1).sum(1)


def _tilted_target() -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of N(MU, SIGMA^2) exp(-E): precision 1 / SIGMA^2 + A."""
    precision = 1 / SIGMA**2 + A
    return (MU / SIGMA**2 + A * C) / precision, 1 / precision


def _chain(steps: int, step_size: float, n: int = 4000) -> torch.Tensor:
    torch.manual_seed(0)
    prior = LangevinPrior(Quadratic(A, C), groups=[0], steps=steps, step_size=step_size)
    h = torch.zeros(n, 1, 1, 1)
    return prior.sample_group(0, h, MU.expand(n, -1, -1, -1), SIGMA.expand(n, -1, -1, -1), 1.0)


def test_langevin_reaches_the_tilted_gaussian():
    mean, var = _tilted_target()
    z = _chain(steps=400, step_size=0.01)
    # MC standard errors at n = 4000: mean about 0.01 * sd, variance about 2.2 %; the step bias is < 3 %.
    torch.testing.assert_close(z.mean(0, keepdim=True), mean, atol=0.05 * var.sqrt().max().item(), rtol=0)
    torch.testing.assert_close(z.var(0, keepdim=True), var, rtol=0.1, atol=0)


def test_langevin_step_size_convention_is_sqrt_2s_noise():
    # At a large step the unadjusted chain's stationary variance has a closed form that tells the two
    # conventions apart: in whitened units with precision lam, drift s and noise sqrt(2 s) give
    # 1 / (lam (1 - s lam / 2)); drift s^2 / 2 and noise s would give the same with s -> s^2 / 2.
    s = 0.2
    lam = 1 + A * SIGMA**2  # whitened precision: eps = (z - MU) / SIGMA
    ours = SIGMA**2 / (lam * (1 - s * lam / 2))
    other = SIGMA**2 / (lam * (1 - (s * s / 2) * lam / 2))
    z = _chain(steps=200, step_size=s, n=10000)  # variance standard error 1.4 %
    measured = z.var(0, keepdim=True)
    torch.testing.assert_close(measured, ours, rtol=0.1, atol=0)
    assert ((measured - other).abs() / other > 0.2).all()  # 30 % and 120 % apart at this step size


def test_zero_steps_reproduce_nvae_draws_bit_for_bit():
    energies = EnergySet([GroupSpec(0, 0, 4, 2, 2, 3)], [0], hidden=8)
    prior = LangevinPrior(energies, [0], steps=0)
    mu, sigma, h = torch.randn(5, 4, 2, 2), torch.rand(5, 4, 2, 2) + 0.1, torch.randn(5, 3, 2, 2)
    assert isinstance(prior, PriorHook)
    for t in (1.0, 0.7):
        torch.manual_seed(3)
        expected = draw_normal(mu, sigma, t)
        torch.manual_seed(3)
        assert torch.equal(prior.sample_group(0, h, mu, sigma, t), expected)
    assert prior.sample_group(1, h, mu, sigma, 1.0) is None  # not one of its groups: NVAE draws it


class TiltEnergy(nn.Module):
    """E(z) = a z^2 + b z, the family that holds the exact tilt from N(0, 1) to any Gaussian."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.a * z.square() + self.b * z).flatten(1).sum(1)


def test_maximum_likelihood_training_recovers_a_known_tilt():
    # Data N(1, 0.5^2) = N(0, 1) exp(-E) / Z with E(z) = 1.5 z^2 - 4 z: learn (a, b) with Langevin negatives.
    torch.manual_seed(0)
    energy = TiltEnergy()
    opt = torch.optim.Adam(energy.parameters(), lr=0.05)
    mu, sigma = torch.zeros(256, 1, 1, 1), torch.ones(256, 1, 1, 1)
    for _ in range(300):
        z_pos = 1 + 0.5 * torch.randn(256, 1, 1, 1)
        z_neg = langevin_sample(energy, mu, sigma, steps=30, step_size=0.05)
        loss = langevin_loss(energy(z_pos), energy(z_neg), alpha=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Measured 1.54 and -3.91; the loss with its sign flipped runs off to (16, 16).
    assert energy.a.item() == pytest.approx(1.5, abs=0.4)
    assert energy.b.item() == pytest.approx(-4.0, abs=0.6)


def test_ncp_classifier_recovers_the_log_density_ratio():
    # Posterior N(0.5, 0.7^2) against the base N(0, 1): the optimal logit is log q / p0, a known quadratic.
    torch.manual_seed(0)
    energies = EnergySet([GroupSpec(0, 0, 1, 1, 1, 1)], [0], hidden=32)
    opt = torch.optim.Adam(energies.parameters(), lr=3e-3)
    h = torch.zeros(512, 1, 1, 1)
    q, p0 = torch.distributions.Normal(0.5, 0.7), torch.distributions.Normal(0.0, 1.0)
    for _ in range(600):
        z_pos, z_neg = q.sample((512, 1, 1, 1)), p0.sample((512, 1, 1, 1))
        loss = ncp_loss(-energies(0, z_pos, h), -energies(0, z_neg, h))
        opt.zero_grad()
        loss.backward()
        opt.step()
    grid = torch.linspace(-1.0, 1.5, 26).view(-1, 1, 1, 1)  # where both samples are dense
    with torch.no_grad():
        logit = -energies(0, grid, torch.zeros(26, 1, 1, 1))
    truth = (q.log_prob(grid) - p0.log_prob(grid)).flatten()  # from -1.4 to 0.6 on the grid
    assert (logit - truth).abs().max().item() < 0.25, (logit, truth)  # measured 0.17 at the left end


@pytest.mark.parametrize("temperature, mean, var", [(1.0, 0.8, 0.8), (2.0, 2 / 3, 4 / 3)])
def test_ncp_sir_resamples_the_reweighted_prior(temperature, mean, var):
    # r = exp(-E) with E(z) = z^2 / 2 - z on proposals N(0, 2^2): the target is N(0.8, 0.8); tempered to
    # r^(1/2), precision 1/4 + 1/2 and mean (1/2) / (3/4): N(2/3, 4/3).
    class Tilt(nn.Module):
        def forward(self, group, z, h):
            return (z.square() / 2 - z).flatten(1).sum(1)

    prior = NCPPrior(Tilt(), groups=[0], sir_proposals=200, sir_chunk=37, sir_temperature=temperature)
    n = 3000
    mu, sigma, h = torch.zeros(n, 1, 1, 1), torch.full((n, 1, 1, 1), 2.0), torch.zeros(n, 1, 1, 1)
    torch.manual_seed(0)
    z = prior.sample_group(0, h, mu, sigma, 1.0)
    assert z.shape == mu.shape
    assert stats.kstest(z.flatten().numpy(), stats.norm(mean, math.sqrt(var)).cdf).pvalue > 0.01
    # The proposal itself fails the same test (so does the other temperature's target), and one proposal
    # leaves the draw to NVAE.
    assert stats.kstest((2 * torch.randn(n)).numpy(), stats.norm(mean, math.sqrt(var)).cdf).pvalue < 1e-6
    other_mean, other_var = (2 / 3, 4 / 3) if temperature == 1.0 else (0.8, 0.8)
    assert stats.kstest(z.flatten().numpy(), stats.norm(other_mean, math.sqrt(other_var)).cdf).pvalue < 1e-6
    assert NCPPrior(Tilt(), [0], sir_proposals=1).sample_group(0, h, mu, sigma, 1.0) is None
    assert prior.sample_group(1, h, mu, sigma, 1.0) is None


def test_ncp_sir_with_an_energy_set_uses_each_items_context():
    # The broadcasting path (EnergySet.conditioned) must pair proposal j of item i with h[i], exactly as
    # repeating h does: from the same random stream both paths then pick the same proposals.
    spec = GroupSpec(0, 0, 2, 2, 2, 3)
    energies = EnergySet([spec], [0], hidden=8)

    class Repeating(nn.Module):  # the same networks without the broadcasting path
        def forward(self, group, z, h):
            return energies(group, z, h)

    mu, sigma, h = torch.randn(4, 2, 2, 2), torch.rand(4, 2, 2, 2) + 0.5, torch.randn(4, 3, 2, 2) * 3
    draws = []
    for net in (energies, Repeating()):
        torch.manual_seed(1)
        draws.append(NCPPrior(net, [0], sir_proposals=9, sir_chunk=4).sample_group(0, h, mu, sigma, 1.0))
    torch.testing.assert_close(draws[0], draws[1])


@pytest.mark.parametrize("kind", ["langevin", "ncp"])
def test_baseline_resume_equals_uninterrupted_run(tmp_path, vae_checkpoint, kind):
    vae, vae_cfg, _ = load_trained_nvae(vae_checkpoint, torch.device("cpu"))
    make, train = {"langevin": (langevin_run_config, train_langevin), "ncp": (ncp_run_config, train_ncp)}[kind]
    run_cfg = make(str(vae_checkpoint), vae_fingerprint(vae), batch_size=8, max_steps=4, energy_hidden=8,
                   eval_batches=1, bn_readjust_batches=1, log_every=1, lr=1e-2, **(
                       {"langevin_steps": 3} if kind == "langevin" else {"sir_proposals": 3}))

    def run(run_dir, resume=None, stop=None):
        torch.manual_seed(0)
        with RunLogger(run_dir, True) as logger:
            return train(run_cfg, vae, vae_cfg, CPU, run_dir, logger, resume, stop)

    assert run(tmp_path / "full") == 0
    assert run(tmp_path / "split", stop=StopAt(2)) == PREEMPTED_EXIT_CODE
    torch.manual_seed(999)  # the resumed run must not depend on the process's fresh RNG
    assert run(tmp_path / "split", resume=tmp_path / "split" / "checkpoint.pt") == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt", kind)
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt", kind)
    assert full["step"] == split["step"] == 4
    fresh = load_checkpoint(tmp_path / "split" / "checkpoint_00000002.pt", kind)["task"]["energies"]
    for key, value in full["task"]["energies"].items():
        assert torch.equal(value, split["task"]["energies"][key]), key
    assert any(not torch.equal(v, fresh[k]) for k, v in full["task"]["energies"].items())  # steps 3-4 changed it
    # The frozen NVAE travels with the prior and is untouched.
    for key, value in vae.state_dict().items():
        assert torch.equal(value, full["task"]["vae"]["model"][key]), key


class _Labelled(nn.Module):
    """A classifier stand-in that scores calls by their order: hole_detector_accuracy scores the posterior
    draws first and the Gaussian draws second in every batch, so (pos, neg) logits are what it answers."""

    def __init__(self, logit_pos: float, logit_neg: float):
        super().__init__()
        self.logits, self.calls = (logit_pos, logit_neg), 0

    def forward(self, group: int, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        logit = self.logits[self.calls % 2]
        self.calls += 1
        return torch.full((z.shape[0],), -logit)  # energy = -logit


@pytest.mark.parametrize("logit_pos, logit_neg, expected", [(1.0, -1.0, 1.0), (1.0, 1.0, 0.5), (-1.0, 1.0, 0.0)])
def test_hole_detector_accuracy_is_balanced_over_posterior_and_gaussian_draws(prior_checkpoints, logit_pos, logit_neg,
                                                                             expected):
    trained = load_ncp(prior_checkpoints["ncp"], CPU.device)
    stub = _Labelled(logit_pos, logit_neg)
    trained = replace(trained, base=replace(trained.base, energies=stub))
    vae = trained.base.vae
    data = get_dataset(trained.base.vae_cfg.train.dataset, "test", trained.base.vae_cfg.train.data_root)
    out = hole_detector_accuracy(trained, vae, data, 10, 4, False, CPU.device)
    assert out["accuracy"] == expected and out["num_images"] == 10 and stub.calls == 2 * 3  # 3 batches of <= 4
