"""The NVAE's likelihood under an energy prior: log Z against closed forms, the ELBO's exact reductions."""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from evalp_prior.baselines.langevin import LangevinPrior
from evalp_prior.evaluation import format_report, likelihood_priors
from evalp_prior.metrics.nll import Normalisers, dataset_nll
from evalp_prior.prior import EVaLPPrior, SamplerDensity
from evalp_prior.sampler import SharedFlowSampler
from evalp_prior.sir import log_mean_weight
from evalp_prior.toy import CONTEXT, DIM, SPECS
from nvae.data.base import ArrayDataset, DatasetInfo
from nvae.model import NVAE
from tests.helpers import tiny_run_config


class Quadratic(nn.Module):
    """E(z) = a/2 ||z - c||^2 + offset, so p0 exp(-E) is Gaussian and Z has a closed form."""

    def __init__(self, a: float, c: float, offset: float = 0.0) -> None:
        super().__init__()
        self.a, self.c, self.offset = a, c, offset

    def forward(self, group: int, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.a * (z - self.c).square().flatten(1).sum(1) + self.offset


def _closed_form_log_z(a: float, c: float, mu: torch.Tensor, sigma: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """log of int N(z; mu, sigma^2) exp(-a/2 (z - c)^2 - offset) dz, summed over dimensions, per item."""
    s2 = sigma.double().square()
    per_dim = -0.5 * torch.log1p(a * s2) - a * (mu.double() - c).square() / (2 * (1 + a * s2))
    return per_dim.flatten(1).sum(1) - offset


def _base(n: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(n, DIM, 1, 1, generator=g)
    sigma = 0.5 + torch.rand(n, DIM, 1, 1, generator=g)
    return mu, sigma, torch.randn(n, CONTEXT, 1, 1, generator=g)


def _perturbed_sampler() -> SharedFlowSampler:
    """A sampler that is not p0 (random couplings), so the exact weights' log q and log-det matter."""
    torch.manual_seed(3)
    sampler = SharedFlowSampler(SPECS, [0], hidden=16, num_couplings=4)
    with torch.no_grad():
        for p in sampler.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sampler


@pytest.mark.parametrize("proposal", ["p0 (identity sampler)", "a trained-looking sampler", "p0 (Langevin prior)"])
def test_log_z_converges_to_the_closed_form(proposal):
    mu, sigma, h = _base()
    energy = Quadratic(a=0.8, c=0.7)
    exact = _closed_form_log_z(0.8, 0.7, mu, sigma)
    if proposal.startswith("p0 (Langevin"):
        prior = LangevinPrior(energy, [0])
    else:
        sampler = SharedFlowSampler(SPECS, [0], 16) if proposal.startswith("p0") else _perturbed_sampler()
        prior = EVaLPPrior(energy, sampler, [0])
    errors = []
    for num in (10, 30000):
        torch.manual_seed(1)
        log_z, rel_var = prior.log_normaliser(0, h, mu, sigma, num)
        assert log_z.shape == (3,) and bool((rel_var >= 0).all())
        errors.append(float((log_z - exact).abs().mean()))
    assert errors[1] < 0.02  # measured 0.001 to 0.004
    assert errors[1] < errors[0] / 3  # it converges as the proposal count grows


def test_log_mean_weight_is_the_log_of_the_mean_and_its_relative_variance():
    torch.manual_seed(0)
    log_w = torch.randn(50, 4, dtype=torch.float64)
    draws = iter(log_w.split(7))  # chunks of 7 proposals (the last one shorter)
    log_mean, rel_var = log_mean_weight(lambda k: next(draws), lambda lw: lw, 50, 7, 4)
    w = log_w.exp()
    torch.testing.assert_close(log_mean, w.mean(0).log())
    torch.testing.assert_close(rel_var, w.square().mean(0) / w.mean(0).square() - 1)


def test_one_proposal_leaves_the_relative_variance_and_the_bias_unknown():
    # One weight has sample relative variance 0, which would report the log of a single weight (biased low by
    # an unknown amount) as unbiased.
    log_w = torch.randn(1, 3, dtype=torch.float64)
    log_mean, rel_var = log_mean_weight(lambda k: log_w[:k], lambda lw: lw, 1, 4, 3)
    torch.testing.assert_close(log_mean, log_w[0])
    assert bool(rel_var.isnan().all())
    line = format_report({"checkpoint": "c", "description": "evalp", "dataset": "mnist", "metrics": {"nll": {
        "split": "test", "priors": {
        "evalp": {"num_samples": 10, "num_images": 5, "nats": 90.0, "bits_per_dim": 0.2, "elbo_nats": 95.0,
                  "log_z": [{"group": 0, "log_z": -1.0, "log_z_bias": -1e-4, "proposals": 100},
                            {"group": 1, "log_z": 2.0, "log_z_bias": None, "proposals": 1}]}}}}})
    assert "bias ~-0.0001, M=100" in line and "group 1 2.000 (bias unknown" in line


class Zero(nn.Module):
    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value = value

    def forward(self, group: int, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.full((z.shape[0],), self.value)


@pytest.mark.parametrize("constant", [0.0, 2.5])
def test_a_constant_energy_with_the_identity_sampler_leaves_the_elbo_exactly_gaussian(constant):
    """E = const: p_psi = p0 (log Z = -const exactly from p0 proposals), and the untrained sampler is p0, so
    every prior's NLL and ELBO equal the Gaussian prior's on the same posterior samples."""
    torch.manual_seed(0)
    vae = NVAE(tiny_run_config().model).eval()
    groups = [g for g, s in enumerate(vae.group_specs) if s.channels == vae.group_specs[0].channels]
    sampler = SharedFlowSampler(vae.group_specs, groups, 8)
    hook = EVaLPPrior(Zero(constant), sampler, groups)
    priors = likelihood_priors("evalp", hook)
    assert set(priors) == {"gaussian", "evalp", "evalp_sampler"} and isinstance(priors["evalp_sampler"], SamplerDensity)
    images = (torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    data = ArrayDataset(images, DatasetInfo("synthetic", 1, 32, False, "dmol", 0))
    torch.manual_seed(5)
    report = dataset_nll(vae, data, num_samples=3, num_images=4, binarize=False, batch_size=2, chunk=2,
                         priors=priors, normalisers=Normalisers(20, 5))
    for name in ("evalp", "evalp_sampler"):
        for key in ("nats", "elbo_nats"):
            assert report[name][key] == pytest.approx(report["gaussian"][key], abs=1e-9, rel=1e-12)
    z_report = report["evalp"]["log_z"]
    assert [r["group"] for r in z_report] == groups
    assert z_report[0]["shared_context"] and z_report[0]["proposals"] == 20  # the top group: one Z
    assert all(not r["shared_context"] and r["proposals"] == 5 for r in z_report[1:])
    assert all(r["log_z"] == pytest.approx(-constant, abs=1e-9) and r["rel_var"] == pytest.approx(0, abs=1e-9)
               for r in z_report)
    assert report["gaussian"]["elbo_nats"] >= report["gaussian"]["nats"]  # -ELBO >= -L_K


def test_an_energy_that_moves_mass_changes_the_likelihood_by_the_normalised_log_ratio():
    """Quadratic energy on the top group: each importance weight changes by exactly -E(z) - log Z, with the
    closed-form log Z, so the mean log-weight shift is mean(-E) - log Z over the posterior samples."""
    torch.manual_seed(0)
    vae = NVAE(tiny_run_config().model).eval()
    energy = Quadratic(a=0.5, c=0.2)
    hook = LangevinPrior(energy, [0])
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    data = ArrayDataset((images * 255).to(torch.uint8), DatasetInfo("synthetic", 1, 32, False, "dmol", 0))
    torch.manual_seed(4)
    report = dataset_nll(vae, data, num_samples=1, num_images=2, binarize=False, batch_size=2,
                         priors={"gaussian": None, "q": hook}, normalisers=Normalisers(200000, 5))
    torch.manual_seed(4)  # the same posterior draw dataset_nll made (its DataLoader draws a seed first)
    with torch.no_grad():
        top = vae.posterior(next(iter(DataLoader(data, batch_size=2)))).groups[0]
    exact_log_z = float(_closed_form_log_z(0.5, 0.2, top.mu_p[:1], top.sigma_p[:1]))
    assert report["q"]["log_z"][0]["log_z"] == pytest.approx(exact_log_z, abs=0.01)
    # -ELBO under p0 exp(-E) / Z = -ELBO under p0 + mean E(z) + log Z, on the same posterior samples.
    expected = report["gaussian"]["elbo_nats"] + float(energy(0, top.z, top.h).mean()) + exact_log_z
    assert report["q"]["elbo_nats"] == pytest.approx(expected, abs=0.01)
